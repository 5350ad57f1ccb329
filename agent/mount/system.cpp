#include "agent/mount/system.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

extern char** environ;

namespace vmsnap::mount::sys {

namespace fs = std::filesystem;

namespace {

std::string ReadSmallFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

// A temporary file, removed on destruction; its fd is closed on destruction too.
class TempCapture {
 public:
  TempCapture() {
    char tmpl[] = "/tmp/vmsnap-cmd-XXXXXX";
    fd_ = ::mkstemp(tmpl);
    if (fd_ >= 0) path_ = tmpl;
  }
  ~TempCapture() {
    if (fd_ >= 0) ::close(fd_);
    if (!path_.empty()) ::unlink(path_.c_str());
  }
  TempCapture(const TempCapture&) = delete;
  TempCapture& operator=(const TempCapture&) = delete;
  bool ok() const { return fd_ >= 0; }
  const std::string& path() const { return path_; }
  std::string Read() const { return ReadSmallFile(path_); }

 private:
  int fd_ = -1;
  std::string path_;
};

}  // namespace

Result<CommandResult> RunCommand(const std::vector<std::string>& argv, const std::string& package) {
  TempCapture out, err;
  if (!out.ok() || !err.ok()) return Status::FromErrno(errno, "create a temporary file in /tmp");
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, out.path().c_str(), O_WRONLY | O_TRUNC, 0);
  posix_spawn_file_actions_addopen(&fa, 2, err.path().c_str(), O_WRONLY | O_TRUNC, 0);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = ::posix_spawnp(&pid, args[0], &fa, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0)
    return Status::FromErrno(rc, "start " + argv[0],
                             package.empty() ? "" : "install it: apt-get install " + package);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  CommandResult r;
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.exit_code = 128 + WTERMSIG(status);
  r.out = out.Read();
  r.err = Trim(err.Read());
  return r;
}

namespace {
std::string DecodeMountInfoPath(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      int v = 0;
      bool ok = true;
      for (int k = 1; k <= 3; ++k) {
        char c = s[i + k];
        if (c < '0' || c > '7') ok = false;
        v = v * 8 + (c - '0');
      }
      if (ok) {
        out.push_back(static_cast<char>(v));
        i += 3;
        continue;
      }
    }
    out.push_back(s[i]);
  }
  return out;
}
}  // namespace

std::vector<std::string> MountPoints() {
  std::vector<std::string> out;
  std::istringstream in(ReadSmallFile("/proc/self/mountinfo"));
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    std::string id, parent, devno, root, point;
    if (fields >> id >> parent >> devno >> root >> point) out.push_back(DecodeMountInfoPath(point));
  }
  return out;
}

bool IsMountPoint(const std::string& path) {
  auto points = MountPoints();
  return std::find(points.begin(), points.end(), path) != points.end();
}

namespace {
std::string DeviceName(const std::string& device) {
  return fs::path(device).filename().string();
}
}  // namespace

std::string LoopBackingFile(const std::string& device) {
  return Trim(ReadSmallFile("/sys/block/" + DeviceName(device) + "/loop/backing_file"));
}

std::vector<Partition> LoopPartitions(const std::string& device, int wait_ms) {
  const std::string name = DeviceName(device);
  std::vector<Partition> parts;
  std::error_code ec;
  for (auto it = fs::directory_iterator("/sys/block/" + name, ec);
       !ec && it != fs::directory_iterator(); it.increment(ec)) {
    std::string entry = it->path().filename().string();
    if (entry.rfind(name + "p", 0) != 0) continue;
    std::string number = Trim(ReadSmallFile(it->path().string() + "/partition"));
    if (number.empty()) continue;
    parts.push_back({std::atoi(number.c_str()), "/dev/" + entry});
  }
  std::sort(parts.begin(), parts.end(),
            [](const Partition& a, const Partition& b) { return a.number < b.number; });
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
  for (const auto& p : parts)
    while (!fs::exists(p.device) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  return parts;
}

std::optional<uint64_t> ProcessStartTime(int pid) {
  if (pid <= 0) return std::nullopt;
  std::string stat = ReadSmallFile("/proc/" + std::to_string(pid) + "/stat");
  auto close = stat.rfind(')');
  if (close == std::string::npos) return std::nullopt;
  std::istringstream in(stat.substr(close + 2));
  std::string field;
  char state = close + 2 < stat.size() ? stat[close + 2] : 'X';
  if (state == 'Z' || state == 'X') return std::nullopt;  // exited, not yet reaped: gone
  // Fields after the command: state is field 3; starttime is field 22.
  for (int i = 3; i <= 22; ++i)
    if (!(in >> field)) return std::nullopt;
  return std::stoull(field);
}

int CurrentPid() {
  return static_cast<int>(::getpid());
}

Status MountReadOnly(const std::string& device, const std::string& target,
                     const std::string& fstype, const std::string& options) {
  if (::mount(device.c_str(), target.c_str(), fstype.c_str(), MS_RDONLY | MS_NOSUID | MS_NODEV,
              options.empty() ? nullptr : options.c_str()) != 0)
    return Status::FromErrno(errno,
                             "mount " + device + " (" + fstype + ", " + options + ") on " + target);
  return Status::Ok();
}

Status Unmount(const std::string& path, bool* lazy) {
  if (lazy) *lazy = false;
  if (!IsMountPoint(path)) return Status::Ok();
  if (::umount2(path.c_str(), UMOUNT_NOFOLLOW) == 0) return Status::Ok();
  int err = errno;
  if (err == EBUSY && ::umount2(path.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW) == 0) {
    if (lazy) *lazy = true;
    return Status::Ok();
  }
  if (err == EINVAL && !IsMountPoint(path)) return Status::Ok();
  return Status::FromErrno(
      err, "unmount " + path,
      "close programs using it (see `fuser -vm " + path + "`) and run `vmsnap umount` again");
}

Status ForceUnmountFuse(const std::string& path) {
  if (!IsMountPoint(path)) return Status::Ok();
  if (::umount2(path.c_str(), MNT_FORCE | UMOUNT_NOFOLLOW) == 0) return Status::Ok();
  if (::umount2(path.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW) == 0) return Status::Ok();
  int err = errno;
  if (!IsMountPoint(path)) return Status::Ok();
  return Status::FromErrno(err, "unmount the image filesystem at " + path,
                           "run `umount -l " + path + "` as root");
}

Status Terminate(int pid) {
  if (::kill(pid, SIGTERM) != 0 && errno != ESRCH)
    return Status::FromErrno(errno, "send SIGTERM to the mount process " + std::to_string(pid));
  return Status::Ok();
}

}  // namespace vmsnap::mount::sys

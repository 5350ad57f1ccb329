// Linux implementation of platform/quiesce.hpp: mountinfo + sysfs discovery, the freeze
// session around vmsnap-freeze-guard with the agent's own (second) thaw path, the frozen
// marker, and RunProcess (posix_spawn + pidfd + process-group kill).
#include "platform/quiesce.hpp"

#include "platform/linux/fd.hpp"

#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "platform/env.hpp"

extern char** environ;

namespace vmsnap::platform {
namespace fs = std::filesystem;
using json = nlohmann::json;

int64_t MonotonicNowUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

namespace {

Status MakePipe(Fd& read_end, Fd& write_end) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return Status::FromErrno(errno, "create pipe");
  read_end = Fd(p[0]);
  write_end = Fd(p[1]);
  return Status::Ok();
}

void SetNonBlocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

std::string ReadSmallFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return {};
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

// posix_spawn attributes shared by RunProcess and the guard start: default dispositions for
// the signals the agent may block or ignore, an empty mask, optionally a new session.
class SpawnAttr {
 public:
  explicit SpawnAttr(bool new_session) {
    ::posix_spawnattr_init(&attr_);
    sigset_t empty, defaults;
    sigemptyset(&empty);
    sigemptyset(&defaults);
    for (int s : {SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGCHLD, SIGALRM, SIGUSR1, SIGUSR2})
      sigaddset(&defaults, s);
    ::posix_spawnattr_setsigmask(&attr_, &empty);
    ::posix_spawnattr_setsigdefault(&attr_, &defaults);
    short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
    if (new_session) flags |= POSIX_SPAWN_SETSID;
    ::posix_spawnattr_setflags(&attr_, flags);
  }
  ~SpawnAttr() { ::posix_spawnattr_destroy(&attr_); }
  SpawnAttr(const SpawnAttr&) = delete;
  SpawnAttr& operator=(const SpawnAttr&) = delete;
  const posix_spawnattr_t* get() const { return &attr_; }

 private:
  posix_spawnattr_t attr_;
};

class SpawnFileActions {
 public:
  SpawnFileActions() { ::posix_spawn_file_actions_init(&fa_); }
  ~SpawnFileActions() { ::posix_spawn_file_actions_destroy(&fa_); }
  SpawnFileActions(const SpawnFileActions&) = delete;
  SpawnFileActions& operator=(const SpawnFileActions&) = delete;
  posix_spawn_file_actions_t* get() { return &fa_; }

 private:
  posix_spawn_file_actions_t fa_;
};

std::vector<char*> MakeArgv(std::vector<std::string>& storage) {
  std::vector<char*> argv;
  for (auto& s : storage) argv.push_back(s.data());
  argv.push_back(nullptr);
  return argv;
}

// write() that never raises SIGPIPE in this process (the reader may be dead): SIGPIPE is
// blocked in this thread for the call, and a pending one it caused is consumed.
ssize_t WriteNoSigpipe(int fd, const void* data, size_t size) {
  sigset_t pipe_set, old;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  sigset_t pending;
  sigemptyset(&pending);
  ::sigpending(&pending);
  const bool was_pending = sigismember(&pending, SIGPIPE);
  ::pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
  ssize_t n = ::write(fd, data, size);
  int err = errno;
  if (n < 0 && err == EPIPE && !was_pending) {
    struct timespec zero = {0, 0};
    while (::sigtimedwait(&pipe_set, nullptr, &zero) < 0 && errno == EINTR) {
    }
  }
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  errno = err;
  return n;
}

int PidfdOpen(pid_t pid) {
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}

// Waits up to `timeout` for the child to exit (pidfd readable). True when it has exited.
bool WaitPidfd(int pidfd, std::chrono::milliseconds timeout) {
  auto end = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        end - std::chrono::steady_clock::now());
    if (left.count() < 0) left = std::chrono::milliseconds(0);
    struct pollfd p = {pidfd, POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r > 0) return true;
    if (r == 0) return false;
    if (errno != EINTR) return false;
  }
}

void AppendTail(std::string& tail, const char* data, size_t n, size_t limit) {
  tail.append(data, n);
  if (tail.size() > limit) tail.erase(0, tail.size() - limit);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// RunProcess

std::string ProcessOutcome::Describe() const {
  if (timed_out)
    return "timed out after " + std::to_string(duration_ms) + " ms (process group killed)";
  if (term_signal > 0) return "killed by signal " + std::to_string(term_signal);
  return "exit code " + std::to_string(exit_code);
}

Result<ProcessOutcome> RunProcess(const ProcessSpec& spec) {
  if (spec.path.empty()) return Status::InvalidArgument("no program given");
  Fd out_r, out_w, err_r, err_w;
  VMSNAP_RETURN_IF_ERROR(MakePipe(out_r, out_w));
  VMSNAP_RETURN_IF_ERROR(MakePipe(err_r, err_w));
  SpawnFileActions fa;
  ::posix_spawn_file_actions_addopen(fa.get(), 0, "/dev/null", O_RDONLY, 0);
  ::posix_spawn_file_actions_adddup2(fa.get(), out_w.get(), 1);
  ::posix_spawn_file_actions_adddup2(fa.get(), err_w.get(), 2);
  SpawnAttr attr(/*new_session=*/true);
  std::vector<std::string> storage{spec.path};
  storage.insert(storage.end(), spec.args.begin(), spec.args.end());
  auto argv = MakeArgv(storage);
  const int64_t start_us = MonotonicNowUs();
  pid_t pid = -1;
  int rc = ::posix_spawn(&pid, spec.path.c_str(), fa.get(), attr.get(), argv.data(), environ);
  if (rc != 0)
    return Status::FromErrno(rc, "start " + spec.path,
                             "check that the file exists and is executable (chmod 0755)");
  out_w.Reset();
  err_w.Reset();
  Fd pidfd(PidfdOpen(pid));  // the child is unreaped, so its pid cannot be reused yet

  ProcessOutcome outcome;
  const auto deadline = std::chrono::steady_clock::now() + spec.timeout;
  bool exited = false;
  char buf[4096];
  auto drain = [&](Fd& fd, bool is_stdout) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n > 0) {
      AppendTail(outcome.output_tail, buf, static_cast<size_t>(n), spec.output_tail_bytes);
      if (is_stdout && outcome.stdout_text.size() < spec.stdout_limit_bytes)
        outcome.stdout_text.append(
            buf, std::min<size_t>(static_cast<size_t>(n),
                                  spec.stdout_limit_bytes - outcome.stdout_text.size()));
    } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
      fd.Reset();
    }
  };
  while (!exited) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      outcome.timed_out = true;
      break;
    }
    struct pollfd p[3];
    int n = 0;
    int out_i = -1, err_i = -1, pid_i = -1;
    if (out_r.valid()) p[out_i = n++] = {out_r.get(), POLLIN, 0};
    if (err_r.valid()) p[err_i = n++] = {err_r.get(), POLLIN, 0};
    if (pidfd.valid()) p[pid_i = n++] = {pidfd.get(), POLLIN, 0};
    int r =
        ::poll(p, static_cast<nfds_t>(n), static_cast<int>(std::min<int64_t>(left.count(), 200)));
    if (r < 0 && errno != EINTR) break;
    if (r <= 0) {
      if (!pidfd.valid()) {  // no pidfd (old kernel): poll the exit status
        int st = 0;
        if (::waitpid(pid, &st, WNOHANG) == pid) {
          exited = true;
          if (WIFEXITED(st)) outcome.exit_code = WEXITSTATUS(st);
          if (WIFSIGNALED(st)) outcome.term_signal = WTERMSIG(st);
          pid = -1;
        }
      }
      continue;
    }
    if (out_i >= 0 && p[out_i].revents) drain(out_r, true);
    if (err_i >= 0 && p[err_i].revents) drain(err_r, false);
    if (pid_i >= 0 && (p[pid_i].revents & POLLIN)) exited = true;
  }
  if (outcome.timed_out) {
    ::killpg(pid, SIGTERM);
    if (!pidfd.valid() || !WaitPidfd(pidfd.get(), std::chrono::milliseconds(1000)))
      ::killpg(pid, SIGKILL);
    // Members that outlived the leader (background children) go too.
    ::killpg(pid, SIGKILL);
  }
  if (pid > 0) {
    int st = 0;
    while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    if (!outcome.timed_out) {
      if (WIFEXITED(st)) outcome.exit_code = WEXITSTATUS(st);
      if (WIFSIGNALED(st)) outcome.term_signal = WTERMSIG(st);
    }
  }
  // Whatever is already in the pipes (background children may keep them open: don't wait).
  for (Fd* fd : {&out_r, &err_r}) {
    if (!fd->valid()) continue;
    SetNonBlocking(fd->get());
    while (fd->valid()) drain(*fd, fd == &out_r);
  }
  outcome.duration_ms = (MonotonicNowUs() - start_us) / 1000;
  return outcome;
}

Status CheckTrustedFile(const std::string& path, const std::string& what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    return Status::FromErrno(errno, what + " " + path).InPhase("check " + what);
  if (!S_ISREG(st.st_mode))
    return Status::Error(Code::kPermissionDenied, what + " " + path + " is not a regular file",
                         "replace it with a regular file")
        .InPhase("check " + what);
  if (st.st_uid != 0)
    return Status::Error(Code::kPermissionDenied,
                         what + " " + path + " is owned by uid " + std::to_string(st.st_uid) +
                             ", not root; refusing to run or read it",
                         "chown root:root " + path)
        .InPhase("check " + what);
  if (st.st_mode & (S_IWGRP | S_IWOTH))
    return Status::Error(
               Code::kPermissionDenied,
               what + " " + path + " is writable by group or others (mode " +
                   [&] {
                     char m[8];
                     std::snprintf(m, sizeof m, "%04o", st.st_mode & 07777);
                     return std::string(m);
                   }() +
                   "); refusing to run or read it",
               "chmod go-w " + path)
        .InPhase("check " + what);
  return Status::Ok();
}

bool IsProgramFile(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  return (st.st_mode & (S_IXUSR | S_IXGRP | S_IXOTH)) != 0;
}

// ---------------------------------------------------------------------------------------------
// Discovery

namespace {

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string UnescapeMountinfo(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() && std::isdigit(static_cast<unsigned char>(s[i + 1]))) {
      out.push_back(static_cast<char>(std::stoi(s.substr(i + 1, 3), nullptr, 8)));
      i += 3;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

struct MountinfoEntry {
  std::string root;
  std::string mount_point;
  std::string fs_type;
  std::string source;
  dev_t device = 0;
};

std::vector<MountinfoEntry> ParseMountinfo(const std::string& text) {
  std::vector<MountinfoEntry> entries;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream f(line);
    std::vector<std::string> fields;
    std::string w;
    while (f >> w) fields.push_back(w);
    auto sep = std::find(fields.begin(), fields.end(), "-");
    if (fields.size() < 7 || sep == fields.end() || fields.end() - sep < 3) continue;
    MountinfoEntry e;
    unsigned maj = 0, min = 0;
    if (std::sscanf(fields[2].c_str(), "%u:%u", &maj, &min) != 2) continue;
    e.device = makedev(maj, min);
    e.root = UnescapeMountinfo(fields[3]);
    e.mount_point = UnescapeMountinfo(fields[4]);
    e.fs_type = *(sep + 1);
    e.source = UnescapeMountinfo(*(sep + 2));
    // A mount's device: the source's block device when it names one (btrfs reports an
    // anonymous device number in field 3), else field 3.
    struct stat st {};
    if (!e.source.empty() && e.source[0] == '/' && ::stat(e.source.c_str(), &st) == 0 &&
        S_ISBLK(st.st_mode))
      e.device = st.st_rdev;
    entries.push_back(std::move(e));
  }
  return entries;
}

std::string DevString(dev_t d) {
  return std::to_string(major(d)) + ":" + std::to_string(minor(d));
}

// The device and its partitions (sysfs: /sys/dev/block/M:m/<part>/partition exists).
std::vector<dev_t> DeviceAndPartitions(dev_t dev, const std::string& sysfs_root) {
  std::vector<dev_t> devs{dev};
  std::error_code ec;
  fs::path dir = fs::path(sysfs_root) / "dev/block" / DevString(dev);
  for (const auto& child : fs::directory_iterator(dir, ec)) {
    std::error_code ec2;
    if (!fs::exists(child.path() / "partition", ec2)) continue;
    unsigned maj = 0, min = 0;
    if (std::sscanf(ReadSmallFile(child.path() / "dev").c_str(), "%u:%u", &maj, &min) == 2)
      devs.push_back(makedev(maj, min));
  }
  return devs;
}

bool IsFreezableType(const std::string& t) {
  return t == "ext3" || t == "ext4" || t == "xfs" || t == "btrfs";
}

size_t Depth(const std::string& mount_point) {
  if (mount_point == "/") return 0;
  return static_cast<size_t>(std::count(mount_point.begin(), mount_point.end(), '/'));
}

std::string Canonical(const std::string& p) {
  std::error_code ec;
  auto c = fs::weakly_canonical(p, ec);
  return ec ? p : c.string();
}

}  // namespace

Result<std::string> LoopBackingFile(const std::string& loop_device, const std::string& sysfs_root) {
  std::string name = fs::path(loop_device).filename().string();
  std::string backing = ReadSmallFile(sysfs_root + "/block/" + name + "/loop/backing_file");
  if (backing.empty())
    return Status::NotFound(loop_device + " is not a bound loop device (no backing file)");
  const std::string deleted = " (deleted)";
  if (backing.size() > deleted.size() &&
      backing.compare(backing.size() - deleted.size(), deleted.size(), deleted) == 0)
    return Status::NotFound("the backing file of " + loop_device + " was deleted: " + backing);
  return backing;
}

std::vector<std::string> LoopDevicesBackedBy(const std::string& image_file,
                                             const std::string& sysfs_root) {
  std::vector<std::string> loops;
  const std::string want = Canonical(image_file);
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(sysfs_root + "/block", ec)) {
    std::string name = e.path().filename().string();
    if (name.rfind("loop", 0) != 0) continue;
    auto backing = LoopBackingFile("/dev/" + name, sysfs_root);
    if (backing.ok() && Canonical(*backing) == want) loops.push_back("/dev/" + name);
  }
  std::sort(loops.begin(), loops.end());
  return loops;
}

Result<std::vector<MountedFilesystem>> DiscoverFilesystems(const std::vector<std::string>& disks,
                                                           const DiscoveryOptions& options) {
  // 1. The device ids of every disk, its partitions, or the loop devices behind an image.
  std::map<dev_t, std::string> disk_of_device;
  for (const auto& disk : disks) {
    struct stat st {};
    if (::stat(disk.c_str(), &st) != 0)
      return Status::NotFound("disk " + disk + ": " + std::strerror(errno),
                              "name an existing block device or disk image file")
          .InPhase("discover filesystems");
    std::vector<dev_t> roots;
    if (S_ISBLK(st.st_mode)) {
      roots.push_back(st.st_rdev);
    } else if (S_ISREG(st.st_mode)) {
      for (const auto& loop : LoopDevicesBackedBy(disk, options.sysfs_root)) {
        struct stat lst {};
        if (::stat(loop.c_str(), &lst) == 0 && S_ISBLK(lst.st_mode)) roots.push_back(lst.st_rdev);
      }
    } else {
      return Status::InvalidArgument("disk " + disk + " is neither a block device nor a file",
                                     "name a block device or a disk image file")
          .InPhase("discover filesystems");
    }
    for (dev_t root : roots)
      for (dev_t d : DeviceAndPartitions(root, options.sysfs_root)) disk_of_device[d] = disk;
  }

  // 2. Their mounts, one entry per device.
  auto text = Env::Default()->ReadFile(options.mountinfo_path);
  if (!text.ok()) return text.take_status().InPhase("discover filesystems");
  std::map<dev_t, MountedFilesystem> by_device;
  std::map<dev_t, std::string> chosen_root;
  for (const auto& e : ParseMountinfo(*text)) {
    auto it = disk_of_device.find(e.device);
    if (it == disk_of_device.end()) continue;
    auto [pos, inserted] = by_device.try_emplace(e.device);
    MountedFilesystem& m = pos->second;
    if (inserted) {
      m.mount_point = e.mount_point;
      m.fs_type = e.fs_type;
      m.source = e.source;
      m.disk = it->second;
      m.device = e.device;
      chosen_root[e.device] = e.root;
      continue;
    }
    // A bind mount (or second mount) of the same device: keep the mount of the filesystem's
    // root, else the shallowest; the rest are listed but not frozen again.
    bool better = (e.root == "/" && chosen_root[e.device] != "/") ||
                  ((e.root == "/") == (chosen_root[e.device] == "/") &&
                   Depth(e.mount_point) < Depth(m.mount_point));
    if (better) {
      m.other_mount_points.push_back(m.mount_point);
      m.mount_point = e.mount_point;
      chosen_root[e.device] = e.root;
    } else {
      m.other_mount_points.push_back(e.mount_point);
    }
  }

  std::vector<MountedFilesystem> result;
  for (auto& [dev, m] : by_device) {
    m.freezable = IsFreezableType(m.fs_type);
    if (!m.freezable)
      m.why_not_freezable = "filesystem type " + m.fs_type +
                            " is not frozen (only ext3, ext4, "
                            "xfs and btrfs are)";
    result.push_back(std::move(m));
  }
  std::sort(result.begin(), result.end(), [](const auto& a, const auto& b) {
    if (a.freezable != b.freezable) return a.freezable;
    if (Depth(a.mount_point) != Depth(b.mount_point))
      return Depth(a.mount_point) > Depth(b.mount_point);
    return a.mount_point < b.mount_point;
  });
  return result;
}

// ---------------------------------------------------------------------------------------------
// Freeze session

namespace {

std::vector<std::string> SplitColon(const char* s) {
  std::vector<std::string> out;
  if (!s) return out;
  std::string cur;
  for (const char* p = s;; ++p) {
    if (*p == ':' || *p == 0) {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
      if (*p == 0) break;
    } else {
      cur.push_back(*p);
    }
  }
  return out;
}

// Safety restriction for tests (see kFreezeOnlyUnderEnv).
Status CheckAllowedMountPoint(const std::string& mount_point, std::vector<std::string> only_under) {
  for (auto& d : SplitColon(std::getenv(kFreezeOnlyUnderEnv))) only_under.push_back(d);
  if (only_under.empty()) return Status::Ok();
  const std::string mp = Canonical(mount_point);
  if (mp == "/")
    return Status::Error(Code::kPermissionDenied,
                         "refusing to freeze / under the safety restriction",
                         "remove / from the filesystems to freeze");
  for (const auto& d : only_under) {
    std::string dir = Canonical(d);
    if (dir == "/" || dir.empty()) continue;
    if (mp.size() > dir.size() + 1 && mp.compare(0, dir.size(), dir) == 0 && mp[dir.size()] == '/')
      return Status::Ok();
  }
  return Status::Error(Code::kPermissionDenied,
                       "refusing to freeze " + mp + ": not below an allowed directory (" +
                           std::string(kFreezeOnlyUnderEnv) + " / only_under)",
                       "freeze only filesystems the caller mounted below its own directory");
}

class LinuxFreezeSession final : public FreezeSession {
 public:
  struct FsState {
    std::string mount_point;
    std::string fs_type;
    Fd fd;                  // the agent's own descriptor (second thaw path)
    bool reported = false;  // the guard said whether it froze this filesystem
    FilesystemFreezeReport report;
  };

  LinuxFreezeSession(FreezeOptions options, std::vector<FsState> fs)
      : options_(std::move(options)), fs_(std::move(fs)) {}

  ~LinuxFreezeSession() override { (void)Thaw(); }

  Status Begin() {
    deadline_ = std::chrono::steady_clock::now() + options_.deadline;
    const int64_t deadline_us = MonotonicNowUs() + options_.deadline.count() * 1000;
    VMSNAP_RETURN_IF_ERROR(WriteMarker());
    Fd cmd_r, status_w;
    VMSNAP_RETURN_IF_ERROR(MakePipe(cmd_r, cmd_w_));
    VMSNAP_RETURN_IF_ERROR(MakePipe(status_r_, status_w));
    VMSNAP_RETURN_IF_ERROR(MakePipe(wake_r_, wake_w_));
    SetNonBlocking(cmd_w_.get());  // never block on a stuck guard
    SetNonBlocking(wake_w_.get());

    SpawnFileActions fa;
    ::posix_spawn_file_actions_adddup2(fa.get(), cmd_r.get(), 0);
    ::posix_spawn_file_actions_adddup2(fa.get(), status_w.get(), 1);
    ::posix_spawn_file_actions_addopen(fa.get(), 2, "/dev/null", O_WRONLY, 0);
    SpawnAttr attr(/*new_session=*/false);
    std::vector<std::string> args{options_.guard_binary, "--deadline-at-us",
                                  std::to_string(deadline_us)};
    for (const auto& d : options_.only_under) {
      args.push_back("--only-under");
      args.push_back(d);
    }
    args.push_back("--");
    for (const auto& f : fs_) args.push_back(f.mount_point);
    auto argv = MakeArgv(args);
    pid_t pid = -1;
    int rc = ::posix_spawn(&pid, options_.guard_binary.c_str(), fa.get(), attr.get(), argv.data(),
                           environ);
    if (rc != 0) {
      RemoveMarker();
      return Status::FromErrno(rc, "start the freeze guard " + options_.guard_binary,
                               "install vmsnap-freeze-guard or set its path")
          .InPhase("freeze");
    }
    guard_pid_ = pid;
    guard_pidfd_ = Fd(PidfdOpen(pid));
    watcher_ = std::thread([this] { Watch(); });

    std::unique_lock lock(mu_);
    cv_.wait_until(lock, deadline_,
                   [&] { return freeze_done_ || guard_exited_ || !guard_error_.empty(); });
    if (freeze_done_ && guard_error_.empty()) return Status::Ok();
    std::string why = !guard_error_.empty() ? guard_error_
                      : guard_exited_       ? "the freeze guard exited before reporting"
                                            : "freezing did not finish before the deadline (" +
                                            std::to_string(options_.deadline.count()) + " ms)";
    lock.unlock();
    Status thaw = Thaw();
    Status err =
        Status::Error(freeze_done_ || guard_exited_ ? Code::kIoError : Code::kTimeout,
                      why + (thaw.ok() ? "; every filesystem was thawed" : "; " + thaw.ToString()),
                      "see the per-filesystem report; a busy filesystem is skipped");
    if (why.rfind("refusing", 0) == 0) err = Status::Error(Code::kPermissionDenied, why);
    return err.InPhase("freeze");
  }

  std::chrono::steady_clock::time_point deadline() const override { return deadline_; }

  Status Thaw() override {
    {
      std::unique_lock lock(mu_);
      if (thaw_done_) return thaw_status_;
      thaw_requested_ = true;
    }
    SendToGuard("thaw\n");
    {
      std::unique_lock lock(mu_);
      cv_.wait_for(lock, options_.thaw_confirm_wait,
                   [&] { return guard_thawed_ || guard_exited_; });
      AgentThawLocked();  // second path: harmless if the guard already thawed (EINVAL)
    }
    CloseGuardInput();  // the guard exits once it has thawed
    bool responsive;
    {
      std::lock_guard lock(mu_);
      responsive = guard_thawed_ || guard_exited_;
    }
    bool reaped = ReapGuard(responsive);
    {
      std::unique_lock lock(mu_);
      if (reaped) AgentThawLocked();  // nothing can freeze any more: make sure
      stopping_ = true;
    }
    if (wake_w_.valid()) (void)!::write(wake_w_.get(), "x", 1);
    if (watcher_.joinable()) watcher_.join();

    std::unique_lock lock(mu_);
    std::string problems;
    for (auto& f : fs_) {
      if (!f.report.frozen && f.report.thaw_error.empty()) continue;
      if (f.report.thawed_at_us == 0 && f.report.thaw_error.empty())
        f.report.thaw_error = "no thaw confirmed";
      if (!f.report.thaw_error.empty())
        problems += (problems.empty() ? "" : "; ") + f.mount_point + ": " + f.report.thaw_error;
    }
    if (!reaped)
      problems += std::string(problems.empty() ? "" : "; ") + "the freeze guard (pid " +
                  std::to_string(guard_pid_) + ") did not exit";
    for (auto& f : fs_) f.fd.Reset();
    thaw_done_ = true;
    if (problems.empty()) {
      RemoveMarker();
      thaw_status_ = Status::Ok();
    } else {
      thaw_status_ = Status::IoError("could not confirm the thaw: " + problems,
                                     "run `fsfreeze -u <mount point>`; the marker in " +
                                         options_.runtime_dir + " is kept for the next start")
                         .InPhase("thaw");
    }
    return thaw_status_;
  }

  std::vector<FilesystemFreezeReport> Filesystems() const override {
    std::lock_guard lock(mu_);
    std::vector<FilesystemFreezeReport> out;
    for (const auto& f : fs_) out.push_back(f.report);
    return out;
  }
  bool deadline_hit() const override {
    std::lock_guard lock(mu_);
    return deadline_hit_;
  }
  int64_t first_thaw_us() const override {
    std::lock_guard lock(mu_);
    int64_t first = 0;
    for (const auto& f : fs_)
      if (f.report.thawed_at_us > 0 && (first == 0 || f.report.thawed_at_us < first))
        first = f.report.thawed_at_us;
    return first;
  }
  int guard_pid() const override { return guard_pid_; }

 private:
  std::string MarkerPath() const { return options_.runtime_dir + "/" + kFrozenMarkerName; }

  Status WriteMarker() {
    std::error_code ec;
    fs::create_directories(options_.runtime_dir, ec);
    if (ec)
      return Status::IoError("create runtime dir " + options_.runtime_dir + ": " + ec.message(),
                             "create it (mkdir -p) or configure another runtime dir on /run")
          .InPhase("freeze");
    json marker = {{"version", 1},
                   {"agent_pid", ::getpid()},
                   {"started_unix_ms", std::chrono::duration_cast<std::chrono::milliseconds>(
                                           std::chrono::system_clock::now().time_since_epoch())
                                           .count()},
                   {"deadline_ms", options_.deadline.count()},
                   {"mount_points", json::array()}};
    for (const auto& f : fs_) marker["mount_points"].push_back(f.mount_point);
    Status s = Env::Default()->WriteFileAtomic(MarkerPath(), marker.dump(2) + "\n", 0600);
    return s.ok() ? s : std::move(s).InPhase("freeze: write marker");
  }

  void RemoveMarker() {
    std::error_code ec;
    fs::remove(MarkerPath(), ec);
  }

  void SendToGuard(const char* text) {
    std::lock_guard lock(cmd_mu_);
    if (cmd_w_.valid()) (void)WriteNoSigpipe(cmd_w_.get(), text, std::strlen(text));
  }
  void CloseGuardInput() {
    std::lock_guard lock(cmd_mu_);
    cmd_w_.Reset();
  }

  // Waits (bounded) for the guard to exit; kills it (by pid, it is our child) if it does not.
  bool ReapGuard(bool responsive) {
    if (guard_pid_ <= 0 || guard_reaped_) return true;
    auto try_reap = [&](std::chrono::milliseconds wait) {
      if (guard_pidfd_.valid()) WaitPidfd(guard_pidfd_.get(), wait);
      auto end = std::chrono::steady_clock::now() +
                 (guard_pidfd_.valid() ? std::chrono::milliseconds(0) : wait);
      do {
        int st = 0;
        if (::waitpid(guard_pid_, &st, WNOHANG) == guard_pid_) return true;
        if (std::chrono::steady_clock::now() >= end) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      } while (true);
      return false;
    };
    // A guard that did not confirm the thaw (stopped, stuck) is not waited for long.
    if (try_reap(std::chrono::milliseconds(responsive ? 2000 : 100))) return guard_reaped_ = true;
    ::kill(guard_pid_, SIGKILL);  // also ends a SIGSTOPped guard
    if (try_reap(std::chrono::milliseconds(2000))) return guard_reaped_ = true;
    return false;
  }

  // FITHAW through the agent's own descriptors, reverse order. Caller holds mu_.
  void AgentThawLocked() {
    for (auto it = fs_.rbegin(); it != fs_.rend(); ++it) {
      FsState& f = *it;
      if (!f.fd.valid()) continue;
      // Someone else's freeze (the guard saw EBUSY) is not ours to undo.
      if (f.reported && !f.report.frozen) continue;
      int rc = ::ioctl(f.fd.get(), FITHAW, 0);
      int err = errno;
      const int64_t now = MonotonicNowUs();
      if (rc == 0) {
        // It was frozen and nobody else had thawed it: this path did.
        f.report.frozen = true;
        if (f.report.frozen_at_us == 0) f.report.frozen_at_us = now;
        f.report.thawed_at_us = now;
        f.report.thawed_by = "agent";
        f.report.thaw_error.clear();
        f.report.why_not.clear();
      } else if (err == EINVAL) {
        // Not frozen (any more). If it was frozen and no thaw time arrived, the guard thawed
        // it without being able to say so: bound the time by now.
        if (f.report.frozen && f.report.thawed_at_us == 0) {
          f.report.thawed_at_us = now;
          f.report.thawed_by = "guard (unconfirmed)";
        }
      } else {
        f.report.thaw_error = std::string("FITHAW: ") + std::strerror(err);
      }
    }
  }

  void HandleLine(const std::string& line) {
    json m = json::parse(line, nullptr, false);
    if (m.is_discarded() || !m.is_object()) return;
    const std::string event = m.value("event", "");
    auto fs_at = [&]() -> FsState* {
      size_t i = m.value("index", size_t(-1));
      return i < fs_.size() ? &fs_[i] : nullptr;
    };
    if (event == "refused" || event == "open_failed" || event == "freeze_failed") {
      guard_error_ = m.value("error", event);
    } else if (event == "fs") {
      if (FsState* f = fs_at()) {
        f->reported = true;
        f->report.frozen = m.value("frozen", false);
        f->report.why_not = m.value("why_not", "");
        if (f->report.frozen) f->report.frozen_at_us = m.value("at_us", int64_t(0));
      }
    } else if (event == "frozen") {
      freeze_done_ = true;
    } else if (event == "thawing") {
      if (m.value("reason", "") == "deadline" && !thaw_requested_) deadline_hit_ = true;
    } else if (event == "thaw") {
      if (FsState* f = fs_at()) {
        if (m.value("ok", false)) {
          if (f->report.thawed_at_us == 0 || f->report.thawed_by != "agent") {
            f->report.thawed_at_us = m.value("at_us", int64_t(0));
            f->report.thawed_by = "guard";
          }
          f->report.thaw_error.clear();
        } else if (f->report.thawed_at_us == 0) {
          f->report.thaw_error = m.value("error", "guard could not thaw");
        }
      }
    } else if (event == "thawed") {
      guard_thawed_ = true;
    }
  }

  // The watchdog: reads the guard's reports, thaws through the agent's own descriptors at the
  // deadline or when the guard dies before confirming the thaw.
  void Watch() {
    std::string buffer;
    bool deadline_handled = false;
    bool thaw_sent = false;
    for (;;) {
      int timeout_ms = -1;
      {
        std::lock_guard lock(mu_);
        if (stopping_) return;
        if (!deadline_handled) {
          auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          deadline_ - std::chrono::steady_clock::now())
                          .count();
          if (left <= 0) {
            deadline_handled = true;
            if (!guard_thawed_) {
              if (!thaw_requested_) deadline_hit_ = true;
              AgentThawLocked();
            }
            cv_.notify_all();
            continue;
          }
          timeout_ms = static_cast<int>(left + 1);
        }
      }
      if (deadline_handled && !thaw_sent) {
        SendToGuard("thaw\n");
        thaw_sent = true;
      }
      struct pollfd p[2] = {{wake_r_.get(), POLLIN, 0}, {status_r_.get(), POLLIN, 0}};
      int n = status_r_.valid() ? 2 : 1;
      int r = ::poll(p, static_cast<nfds_t>(n), timeout_ms);
      if (r < 0 && errno != EINTR) return;
      if (r <= 0) continue;
      if (p[0].revents) {
        char b[64];
        (void)!::read(wake_r_.get(), b, sizeof b);
      }
      if (n == 2 && p[1].revents) {
        char b[4096];
        ssize_t got = ::read(status_r_.get(), b, sizeof b);
        std::lock_guard lock(mu_);
        if (got > 0) {
          buffer.append(b, static_cast<size_t>(got));
          size_t nl;
          while ((nl = buffer.find('\n')) != std::string::npos) {
            HandleLine(buffer.substr(0, nl));
            buffer.erase(0, nl + 1);
          }
        } else if (got == 0 || errno != EINTR) {
          status_r_.Reset();
          guard_exited_ = true;
          // The guard is gone (killed, crashed or finished): whatever it left frozen is
          // thawed now by this path, without waiting for the deadline.
          AgentThawLocked();
        }
        cv_.notify_all();
      }
    }
  }

  FreezeOptions options_;
  std::vector<FsState> fs_;
  std::chrono::steady_clock::time_point deadline_;
  pid_t guard_pid_ = -1;
  Fd guard_pidfd_;
  bool guard_reaped_ = false;
  std::mutex cmd_mu_;  // guards cmd_w_ (written by the watcher, closed by Thaw)
  Fd cmd_w_, status_r_, wake_r_, wake_w_;
  std::thread watcher_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool freeze_done_ = false;
  bool guard_exited_ = false;
  bool guard_thawed_ = false;
  bool thaw_requested_ = false;
  bool deadline_hit_ = false;
  bool stopping_ = false;
  bool thaw_done_ = false;
  std::string guard_error_;
  Status thaw_status_;
};

}  // namespace

Result<std::unique_ptr<FreezeSession>> FreezeSession::Start(
    const std::vector<MountedFilesystem>& filesystems, const FreezeOptions& options) {
  const char* phase = "freeze";
  if (options.guard_binary.empty())
    return Status::InvalidArgument("no freeze guard binary configured",
                                   "set the path of vmsnap-freeze-guard")
        .InPhase(phase);
  if (::access(options.guard_binary.c_str(), X_OK) != 0)
    return Status::FromErrno(errno, "freeze guard " + options.guard_binary,
                             "install vmsnap-freeze-guard or set its path")
        .InPhase(phase);
  if (options.deadline.count() <= 0 || options.deadline > kMaxFreezeDeadline)
    return Status::InvalidArgument("freeze deadline " + std::to_string(options.deadline.count()) +
                                       " ms is outside (0, 60000] ms",
                                   "configure a deadline between 1 and 60 seconds")
        .InPhase(phase);
  if (filesystems.empty())
    return Status::InvalidArgument("no filesystem to freeze",
                                   "skip the freeze when discovery "
                                   "finds no freezable filesystem")
        .InPhase(phase);
  std::vector<LinuxFreezeSession::FsState> states;
  std::set<std::string> seen;
  for (const auto& m : filesystems) {
    if (!m.freezable)
      return Status::InvalidArgument(m.mount_point + " (" + m.fs_type + ") cannot be frozen",
                                     "pass only freezable filesystems")
          .InPhase(phase);
    if (!seen.insert(m.mount_point).second)
      return Status::InvalidArgument(m.mount_point + " is listed twice").InPhase(phase);
    Status allowed = CheckAllowedMountPoint(m.mount_point, options.only_under);
    if (!allowed.ok()) return std::move(allowed).InPhase(phase);
    LinuxFreezeSession::FsState st;
    st.mount_point = m.mount_point;
    st.fs_type = m.fs_type;
    st.report.mount_point = m.mount_point;
    st.report.fs_type = m.fs_type;
    st.fd = Fd(::open(m.mount_point.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!st.fd.valid())
      return Status::FromErrno(errno, "open mount point " + m.mount_point).InPhase(phase);
    states.push_back(std::move(st));
  }
  auto session = std::make_unique<LinuxFreezeSession>(options, std::move(states));
  Status s = session->Begin();
  if (!s.ok()) return s;
  return std::unique_ptr<FreezeSession>(std::move(session));
}

RuntimeDirLock::RuntimeDirLock(RuntimeDirLock&& other) noexcept
    : handle_(std::exchange(other.handle_, -1)), why_not_(std::move(other.why_not_)) {}

RuntimeDirLock& RuntimeDirLock::operator=(RuntimeDirLock&& other) noexcept {
  if (this != &other) {
    if (handle_ >= 0) ::close(static_cast<int>(handle_));
    handle_ = std::exchange(other.handle_, -1);
    why_not_ = std::move(other.why_not_);
  }
  return *this;
}

RuntimeDirLock::~RuntimeDirLock() {
  if (handle_ >= 0) ::close(static_cast<int>(handle_));  // releases the flock
}

Result<RuntimeDirLock> LockRuntimeDir(const std::string& runtime_dir,
                                      std::chrono::milliseconds wait) {
  const char* phase = "lock runtime dir";
  RuntimeDirLock lock;
  auto no_permission = [](int err) { return err == EACCES || err == EPERM || err == EROFS; };
  std::error_code ec;
  fs::create_directories(runtime_dir, ec);
  if (ec && no_permission(ec.value())) {
    lock.why_not_ = "cannot create " + runtime_dir + ": " + ec.message();
    return lock;
  }
  if (ec)
    return Status::IoError("create runtime dir " + runtime_dir + ": " + ec.message(),
                           "create it (mkdir -p) or configure another runtime dir on /run")
        .InPhase(phase);
  const std::string path = runtime_dir + "/agent.lock";
  Fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!fd.valid()) {
    int err = errno;
    if (no_permission(err)) {
      lock.why_not_ = "cannot open " + path + ": " + std::strerror(err);
      return lock;
    }
    return Status::FromErrno(err, "open " + path).InPhase(phase);
  }
  const auto until = std::chrono::steady_clock::now() + wait;
  for (;;) {
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) == 0) break;
    if (errno != EWOULDBLOCK && errno != EINTR)
      return Status::FromErrno(errno, "lock " + path).InPhase(phase);
    if (std::chrono::steady_clock::now() >= until) {
      std::string holder;
      std::ifstream in(path);
      std::getline(in, holder);
      return Status::Error(Code::kConflict,
                           "another vmsnap agent" +
                               (holder.empty() ? std::string() : " (pid " + holder + ")") +
                               " is freezing filesystems with runtime dir " + runtime_dir +
                               " and did not finish within " + std::to_string(wait.count()) + " ms",
                           "wait for that backup to finish, or end that agent; a dead agent "
                           "releases the lock by itself")
          .InPhase(phase);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd.get(), 0) == 0) (void)!::pwrite(fd.get(), pid.data(), pid.size(), 0);
  lock.handle_ = fd.Release();
  return lock;
}

Result<LeftoverFreeze> RecoverLeftoverFreeze(const std::string& runtime_dir) {
  LeftoverFreeze out;
  out.marker_path = runtime_dir + "/" + kFrozenMarkerName;
  std::error_code ec;
  if (!fs::exists(out.marker_path, ec)) return out;
  out.found = true;
  auto text = Env::Default()->ReadFile(out.marker_path);
  if (!text.ok()) return text.take_status().InPhase("recover leftover freeze");
  out.marker_text = *text;
  json marker = json::parse(*text, nullptr, false);
  if (marker.is_discarded() || !marker.contains("mount_points") ||
      !marker["mount_points"].is_array())
    return Status::Corruption("marker " + out.marker_path + " is not valid JSON with mount_points",
                              "thaw by hand (fsfreeze -u <mount point>) and delete the marker")
        .InPhase("recover leftover freeze");
  bool all_ok = true;
  auto mps = marker["mount_points"];
  for (auto it = mps.rbegin(); it != mps.rend(); ++it) {  // thaw in reverse freeze order
    if (!it->is_string()) continue;
    LeftoverFreeze::Entry e;
    e.mount_point = it->get<std::string>();
    Fd fd(::open(e.mount_point.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!fd.valid()) {
      if (errno == ENOENT) {
        e.outcome = "mount point no longer exists";
      } else {
        e.outcome = std::string("open failed: ") + std::strerror(errno);
        all_ok = false;
      }
    } else if (::ioctl(fd.get(), FITHAW, 0) == 0) {
      e.outcome = "thawed";
    } else if (errno == EINVAL) {
      e.outcome = "not frozen";
    } else {
      e.outcome = std::string("FITHAW failed: ") + std::strerror(errno);
      all_ok = false;
    }
    out.filesystems.push_back(std::move(e));
  }
  if (all_ok) fs::remove(out.marker_path, ec);
  return out;
}

}  // namespace vmsnap::platform

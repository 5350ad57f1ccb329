// End-to-end tests of the consistency engine inside a backup (issue 3): the real vmsnap-agent
// binary against a real vmsnap-vault on loopback TLS, backing up real ext4/xfs/btrfs
// filesystems on loop devices this test creates. Their images sit on a btrfs "scratch"
// filesystem (itself a loop-mounted image) so that loop-reflink snapshots work.
//
// SAFETY: everything lives below one directory under /var/tmp created by this process. The
// environment variable VMSNAP_FREEZE_ONLY_UNDER is set to it (the agent and its freeze guard
// inherit it) and every agent call passes --freeze-only-under with it, so nothing outside can
// be frozen. Every mount, loop device, frozen filesystem and child process is undone by RAII
// (umount, `losetup -d` of exactly the device attached here, kill by pid).
#include <doctest/doctest.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tests/support/test_support.hpp"

namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using vmsnap::test::Agent;
using vmsnap::test::AgentBinary;
using vmsnap::test::Child;
using vmsnap::test::RunResult;
using vmsnap::test::Vault;
namespace fs = std::filesystem;

constexpr const char* kFreezeOnlyUnderEnv = "VMSNAP_FREEZE_ONLY_UNDER";

struct ShellResult {
  int rc = -1;
  std::string output;
};

// Runs a command line through /bin/sh, capturing stdout+stderr.
ShellResult Sh(const std::string& cmd) {
  ShellResult r;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  int st = ::pclose(p);
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

bool IsMountedBelow(const std::string& dir) {
  return Sh("grep -q ' " + dir + "' /proc/self/mountinfo").rc == 0;
}

// The one directory everything lives below; the freeze restriction points at it.
class PipelineRoot {
 public:
  PipelineRoot() {
    char tmpl[] = "/var/tmp/vmsnap-pipeline.XXXXXX";
    if (::mkdtemp(tmpl)) path_ = tmpl;
    ::setenv(kFreezeOnlyUnderEnv, path_.c_str(), 1);
  }
  ~PipelineRoot() {
    std::error_code ec;
    if (!path_.empty() && !IsMountedBelow(path_)) fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

const std::string& Root() {
  static PipelineRoot root;
  return root.path();
}

bool IsBelowRoot(const std::string& p) {
  const std::string& root = Root();
  return !root.empty() && p.size() > root.size() + 1 && p.compare(0, root.size(), root) == 0 &&
         p[root.size()] == '/';
}

// A fresh directory below Root(), removed at scope end (never while something is mounted).
class Dir {
 public:
  Dir() {
    std::string tmpl = Root() + "/t.XXXXXX";
    if (::mkdtemp(tmpl.data())) path_ = tmpl;
  }
  ~Dir() {
    std::error_code ec;
    if (!path_.empty() && !IsMountedBelow(path_)) fs::remove_all(path_, ec);
  }
  Dir(const Dir&) = delete;
  Dir& operator=(const Dir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// FITHAW of a mount below Root() (EINVAL when not frozen is fine). Refuses anything else.
void ThawForTest(const std::string& mount_point) {
  if (!IsBelowRoot(mount_point)) return;
  int fd = ::open(mount_point.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::ioctl(fd, FITHAW, 0);
  ::close(fd);
}

// FIFREEZE of a mount below Root(): simulates what a killed agent and guard leave behind.
bool FreezeForTest(const std::string& mount_point) {
  if (!IsBelowRoot(mount_point)) {
    FAIL("refusing to freeze " << mount_point << ": not a test mount");
    return false;
  }
  int fd = ::open(mount_point.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return false;
  int rc = ::ioctl(fd, FIFREEZE, 0);
  ::close(fd);
  return rc == 0;
}

// An image file, its loop device, a filesystem on it and its mount, all below `dir`.
class LoopFs {
 public:
  static std::unique_ptr<LoopFs> Create(const std::string& dir, const std::string& type,
                                        int size_mb, const std::string& name) {
    if (!IsBelowRoot(dir)) {
      FAIL("refusing to create a test filesystem outside the test root: " << dir);
      return nullptr;
    }
    auto f = std::unique_ptr<LoopFs>(new LoopFs());
    f->image_ = dir + "/" + name + ".img";
    f->mount_point_ = dir + "/" + name;
    f->type_ = type;
    fs::create_directories(f->mount_point_);
    const std::string mkfs = type == "ext4"    ? "mkfs.ext4 -q -F "
                             : type == "xfs"   ? "mkfs.xfs -q -f "
                             : type == "btrfs" ? "mkfs.btrfs -q -f "
                                               : "false ";
    auto m =
        Sh("truncate -s " + std::to_string(size_mb) + "M " + f->image_ + " && " + mkfs + f->image_);
    if (m.rc != 0) {
      FAIL("mkfs " << type << ": " << m.output);
      return nullptr;
    }
    auto l = Sh("losetup --find --show " + f->image_);
    if (l.rc != 0) {
      FAIL("losetup: " << l.output);
      return nullptr;
    }
    f->loop_ = l.output.substr(0, l.output.find('\n'));
    auto mo = Sh("mount -t " + type + " " + f->loop_ + " " + f->mount_point_);
    if (mo.rc != 0) {
      FAIL("mount: " << mo.output);
      return nullptr;
    }
    f->mounted_ = true;
    return f;
  }

  ~LoopFs() {
    ThawForTest(mount_point_);
    if (mounted_ && Sh("umount " + mount_point_).rc != 0) {
      ThawForTest(mount_point_);
      Sh("umount -l " + mount_point_);
    }
    if (!loop_.empty()) Sh("losetup -d " + loop_);  // exactly the device attached here
    std::error_code ec;
    fs::remove(image_, ec);
  }

  const std::string& image() const { return image_; }
  const std::string& loop() const { return loop_; }
  const std::string& mount_point() const { return mount_point_; }
  const std::string& type() const { return type_; }

 private:
  LoopFs() = default;
  std::string image_, loop_, mount_point_, type_;
  bool mounted_ = false;
};

// A restored image attached and mounted read-write below the test root (XFS replays its
// log, as a restore would); unmounted and detached on destruction.
class MountedImage {
 public:
  MountedImage(const std::string& image, const std::string& type, const std::string& at)
      : mount_point_(at) {
    if (!IsBelowRoot(at)) return;
    fs::create_directories(at);
    auto l = Sh("losetup --find --show " + image);
    if (l.rc != 0) return;
    loop_ = l.output.substr(0, l.output.find('\n'));
    const std::string opts = type == "xfs" ? "-o nouuid " : "";
    mounted_ = Sh("mount -t " + type + " " + opts + loop_ + " " + at).rc == 0;
  }
  ~MountedImage() { Unmount(); }
  bool ok() const { return mounted_; }
  std::string Read(const std::string& name) const {
    std::ifstream in(mount_point_ + "/" + name, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  void Unmount() {
    if (mounted_) mounted_ = Sh("umount " + mount_point_).rc != 0;
    if (!mounted_ && !loop_.empty()) {
      Sh("losetup -d " + loop_);
      loop_.clear();
    }
  }

 private:
  std::string mount_point_, loop_;
  bool mounted_ = false;
};

void WriteFile(const std::string& path, const std::string& text, int mode = 0644) {
  {
    std::ofstream out(path, std::ios::trunc);
    out << text;
  }
  ::chmod(path.c_str(), static_cast<mode_t>(mode));
}

std::string ReadFileText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Starts a write (create + write + fsync) of a probe file on another thread.
std::future<bool> WriteAsync(const std::string& path) {
  return std::async(std::launch::async, [path] {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return false;
    bool ok = ::write(fd, "data\n", 5) == 5 && ::fsync(fd) == 0;
    ::close(fd);
    return ok;
  });
}

// A write issued now completes within `within` (if not, the test thaws so nothing hangs).
bool WritableWithin(const std::string& mount_point, std::chrono::milliseconds within) {
  static std::atomic<int> n{0};
  auto w = WriteAsync(mount_point + "/probe-" + std::to_string(n++));
  if (w.wait_for(within) != std::future_status::ready) {
    ThawForTest(mount_point);
    w.wait();
    return false;
  }
  return w.get();
}

bool WaitForFile(const std::string& path, std::chrono::milliseconds within) {
  const auto end = std::chrono::steady_clock::now() + within;
  while (!fs::exists(path)) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(20ms);
  }
  return true;
}

bool RequirePrerequisites() {
  std::string missing;
  if (::geteuid() != 0) missing = "root (loop devices, mount, FIFREEZE, root-owned scripts)";
  for (const char* tool : {"mkfs.btrfs", "mkfs.xfs", "mkfs.ext4", "losetup", "e2fsck", "xfs_repair",
                           "btrfs", "debugfs"})
    if (missing.empty() && Sh(std::string("command -v ") + tool).rc != 0)
      missing = std::string("the tool ") + tool;
  if (missing.empty()) return true;
  if (vmsnap::test::InCi()) {
    FAIL("this test needs " << missing << "; CI=true so it fails instead of skipping");
  } else {
    MESSAGE("SKIPPED: this test needs " << missing);
  }
  return false;
}

// Appends fsync'ed sequence records ("%08d\n") to one file on each of several filesystems,
// record n to every file before record n+1 to any, until stopped. `acknowledged` is the
// number of records fsync'ed on every file.
class SequenceWriter {
 public:
  static constexpr size_t kRecord = 9;
  explicit SequenceWriter(std::vector<std::string> files) : files_(std::move(files)) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~SequenceWriter() { Stop(); }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  uint64_t acknowledged() const { return acknowledged_.load(); }
  bool failed() const { return failed_.load(); }
  // Waits until at least n records are acknowledged.
  bool WaitFor(uint64_t n, std::chrono::milliseconds within) {
    const auto end = std::chrono::steady_clock::now() + within;
    while (acknowledged() < n)
      if (std::chrono::steady_clock::now() > end)
        return false;
      else
        std::this_thread::sleep_for(5ms);
    return true;
  }

 private:
  void Loop() {
    std::vector<int> fds;
    for (const auto& f : files_)
      fds.push_back(::open(f.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    for (uint64_t n = 0; !stop_; ++n) {
      char rec[32];
      std::snprintf(rec, sizeof rec, "%08llu\n", static_cast<unsigned long long>(n));
      for (int fd : fds)
        if (fd < 0 || ::write(fd, rec, kRecord) != static_cast<ssize_t>(kRecord) ||
            ::fsync(fd) != 0) {
          failed_ = true;
          stop_ = true;
          break;
        }
      if (!stop_) acknowledged_ = n + 1;
      std::this_thread::sleep_for(1ms);
    }
    for (int fd : fds)
      if (fd >= 0) ::close(fd);
  }

  std::vector<std::string> files_;
  std::atomic<bool> stop_{false}, failed_{false};
  std::atomic<uint64_t> acknowledged_{0};
  std::thread thread_;
};

// The number of records in `text` if it is a gap-free prefix 0, 1, 2, ... of whole records;
// -1 otherwise.
long SequencePrefixLength(const std::string& text) {
  if (text.size() % SequenceWriter::kRecord != 0) return -1;
  const long n = static_cast<long>(text.size() / SequenceWriter::kRecord);
  for (long i = 0; i < n; ++i) {
    char want[32];
    std::snprintf(want, sizeof want, "%08ld\n", i);
    if (text.compare(static_cast<size_t>(i) * SequenceWriter::kRecord, SequenceWriter::kRecord,
                     want) != 0)
      return -1;
  }
  return n;
}

// One test's world: its directory, a vault, the btrfs scratch filesystem holding the disk
// images (reflink-capable), a hooks dir, a runtime dir, and a way to run backups.
struct World {
  Dir dir;
  std::unique_ptr<Vault> vault;
  std::unique_ptr<LoopFs> scratch;
  std::string hooks = dir / "hooks.d";
  std::string runtime = dir / "run";
  std::string hook_log = dir / "hook.log";
  std::string azure = dir / "azure.json";
  int freeze_deadline_s = 2;

  bool Build() {
    if (!RequirePrerequisites() || dir.path().empty()) return false;
    fs::create_directories(hooks);
    scratch = LoopFs::Create(dir.path(), "btrfs", 1024, "scratch");
    if (!scratch) return false;
    vault = std::make_unique<Vault>(dir / "vault");
    vault->Start();
    return true;
  }
  std::unique_ptr<LoopFs> Disk(const std::string& type, const std::string& name) const {
    const int mb = type == "xfs" ? 320 : type == "btrfs" ? 128 : 64;  // mkfs minimums
    return LoopFs::Create(scratch->mount_point(), type, mb, name);
  }
  // A hook that logs "NAME PHASE" and runs `on_freeze` at freeze, then exits with rc.
  void Hook(const std::string& name, const std::string& on_freeze, int rc = 0,
            int mode = 0755) const {
    WriteFile(hooks + "/" + name,
              "#!/bin/sh\necho \"" + name + " $1\" >> " + hook_log +
                  "\nif [ \"$1\" = freeze ]; then " + on_freeze + "; exit " + std::to_string(rc) +
                  "; fi\n",
              mode);
  }
  std::vector<std::string> BackupArgs(const std::vector<std::string>& disks,
                                      const std::vector<std::string>& extra) const {
    std::vector<std::string> args{"backup"};
    auto c = vault->conn();
    args.insert(args.end(), c.begin(), c.end());
    for (const auto& d : disks) args.insert(args.end(), {"--disk", d});
    args.insert(args.end(), {"--state-dir", dir / "state", "--item", "vm", "--hooks-dir", hooks,
                             "--azure-config", azure, "--runtime-dir", runtime, "--freeze-deadline",
                             std::to_string(freeze_deadline_s), "--freeze-only-under", Root()});
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }
  RunResult Backup(const std::vector<std::string>& disks,
                   const std::vector<std::string>& extra = {"--json"}) const {
    return Agent(BackupArgs(disks, extra));
  }
  json BackupOk(const std::vector<std::string>& disks) const {
    auto r = Backup(disks);
    INFO("stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    json j = r.json();
    REQUIRE(j.is_object());
    return j;
  }
  void Restore(const std::string& rp, const std::vector<std::string>& targets) const {
    std::vector<std::string> args{"restore"};
    auto c = vault->conn();
    args.insert(args.end(), c.begin(), c.end());
    args.insert(args.end(), {"--rp", rp});
    for (const auto& t : targets) args.insert(args.end(), {"--to", t});
    auto r = Agent(args);
    INFO("stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
  }
  size_t RecoveryPoints() const {
    auto c = vault->conn();
    std::vector<std::string> args{"list"};
    args.insert(args.end(), c.begin(), c.end());
    args.push_back("--json");
    auto r = Agent(args);
    REQUIRE(r.exit_code == 0);
    return r.json()["recovery_points"].size();
  }
  bool MarkerPresent() const { return fs::exists(runtime + "/frozen.json"); }
  // Snapshot clones the agent left next to the disk images (there should be none).
  size_t LeftoverClones() const {
    size_t n = 0;
    for (const auto& e : fs::directory_iterator(scratch->mount_point()))
      if (e.path().filename().string().find(".vmsnap-snap-") != std::string::npos) ++n;
    return n;
  }
};

// The contents of a file inside an ext4 image, read without mounting it (debugfs).
std::string ReadFromExt4Image(const std::string& image, const std::string& path) {
  return Sh("{ debugfs -R 'cat " + path + "' " + image + " 2>/dev/null; }").output;
}

// fsck that is valid for each type on a restored (and already mounted-and-unmounted for XFS
// and btrfs) image: 0 when clean.
int CheckFilesystem(const std::string& type, const std::string& image) {
  if (type == "ext4") return Sh("e2fsck -fn " + image).rc;
  if (type == "xfs") return Sh("xfs_repair -n -f " + image).rc;
  return Sh("btrfs check --readonly " + image).rc;
}

TEST_CASE("pipeline: a freeze hook's marker is in the restored image; level application") {
  World w;
  if (!w.Build()) return;
  auto disk = w.Disk("ext4", "app");
  REQUIRE(disk);
  const std::string app = disk->mount_point();
  w.Hook("10-app", "echo flushed > " + app + "/app-marker && sync");

  json j = w.BackupOk({disk->loop()});
  CHECK(j["consistency"] == "application");
  const json& ev = j["consistency_evidence"];
  CHECK(ev["level"] == "application");
  REQUIRE(ev["filesystems"].size() == 1);
  CHECK(ev["filesystems"][0]["mount_point"] == app);
  CHECK(ev["filesystems"][0]["frozen"] == true);
  CHECK(ev["filesystems"][0]["window_ms"].get<double>() > 0);
  CHECK(ev["freeze"]["deadline_hit"] == false);
  CHECK(ev["snapshot"]["completed_before_thaw"] == true);
  CHECK(ev["leftover_freeze"]["found"] == false);
  REQUIRE(ev["scripts"].size() == 2);
  CHECK(ev["scripts"][0]["phase"] == "freeze");
  CHECK(ev["scripts"][0]["exit_code"] == 0);
  CHECK(ev["scripts"][1]["phase"] == "thaw");
  const json& d0 = j["disks"][0];
  CHECK(d0["path"] == disk->loop());  // the key stays the disk as named
  CHECK(d0["provider"] == "loop-reflink");
  CHECK(d0["read_path"] != disk->loop());
  CHECK(ReadFileText(w.hook_log) == "10-app freeze\n10-app thaw\n");
  CHECK_FALSE(w.MarkerPresent());
  CHECK(w.LeftoverClones() == 0);  // the snapshot was deleted after the transfer
  CHECK(WritableWithin(app, 2s));

  w.Restore(j["recovery_point"], {w.dir / "restored.img"});
  CHECK(CheckFilesystem("ext4", w.dir / "restored.img") == 0);  // frozen: clean
  CHECK(ReadFromExt4Image(w.dir / "restored.img", "/app-marker") == "flushed\n");

  // The human report says the level and summarises the evidence; the second run is
  // incremental against the same disk key.
  auto human = w.Backup({disk->loop()}, {});
  INFO("stderr: " << human.err);
  REQUIRE(human.exit_code == 0);
  CHECK(human.out.find("consistency: application") != std::string::npos);
  CHECK(human.out.find("2/2 script runs ok, 1/1 filesystems frozen, freeze window ") !=
        std::string::npos);
  CHECK(human.out.find("incremental") != std::string::npos);
}

TEST_CASE("pipeline: failing pre script -> file-system with continue; fails cleanly without") {
  World w;
  if (!w.Build()) return;
  auto disk = w.Disk("ext4", "app");
  REQUIRE(disk);
  w.Hook("10-ok", "true");
  w.Hook("20-fails", "echo 'cannot flush' >&2", 4);

  json j = w.BackupOk({disk->loop()});
  CHECK(j["consistency"] == "file-system");
  const json& scripts = j["consistency_evidence"]["scripts"];
  REQUIRE(scripts.size() == 4);
  CHECK(scripts[1]["name"] == "20-fails");
  CHECK(scripts[1]["exit_code"] == 4);
  CHECK(scripts[1]["output_tail"].get<std::string>().find("cannot flush") != std::string::npos);
  CHECK(ReadFileText(w.hook_log) == "10-ok freeze\n20-fails freeze\n20-fails thaw\n10-ok thaw\n");
  CHECK(w.RecoveryPoints() == 1);

  // Native hooks that must succeed: the backup fails, every hook that froze gets its thaw.
  fs::remove(w.hook_log);
  auto r = w.Backup({disk->loop()}, {"--hook-failure", "fail"});
  CHECK(r.exit_code != 0);
  CHECK(r.err.find("pre scripts") != std::string::npos);
  CHECK(r.err.find("20-fails") != std::string::npos);
  CHECK(ReadFileText(w.hook_log) == "10-ok freeze\n20-fails freeze\n20-fails thaw\n10-ok thaw\n");
  CHECK(WritableWithin(disk->mount_point(), 2s));  // nothing stays frozen
  CHECK_FALSE(w.MarkerPresent());
  CHECK(w.RecoveryPoints() == 1);  // nothing committed

  // Azure config with continueBackupOnFailure false: same, and its post script runs.
  fs::remove(w.hook_log);
  fs::remove(w.hooks + "/10-ok");
  fs::remove(w.hooks + "/20-fails");
  const std::string pre = w.dir / "azure-pre.sh", post = w.dir / "azure-post.sh";
  WriteFile(pre, "#!/bin/sh\necho 'azure pre' >> " + w.hook_log + "\nexit 3\n", 0700);
  WriteFile(post, "#!/bin/sh\necho 'azure post' >> " + w.hook_log + "\n", 0700);
  WriteFile(w.azure,
            json{{"preScriptLocation", pre},
                 {"postScriptLocation", post},
                 {"preScriptNoOfRetries", 1},
                 {"timeoutInSeconds", 10},
                 {"continueBackupOnFailure", false}}
                .dump(),
            0600);
  r = w.Backup({disk->loop()}, {"--json"});
  CHECK(r.exit_code != 0);
  CHECK(r.json()["phase"] == "pre scripts");
  CHECK(r.err.find(pre) != std::string::npos);
  // The retry really re-ran the script; the post script ran once.
  CHECK(ReadFileText(w.hook_log) == "azure pre\nazure pre\nazure post\n");
  CHECK(WritableWithin(disk->mount_point(), 2s));
  CHECK(w.RecoveryPoints() == 1);
}

TEST_CASE("pipeline: a script with bad ownership or mode is refused with a clear error") {
  World w;
  if (!w.Build()) return;
  auto disk = w.Disk("ext4", "app");
  REQUIRE(disk);
  const std::string writable = w.hooks + "/10-writable";
  w.Hook("10-writable", "touch " + w.dir / "ran", 0, 0777);
  ::chmod(writable.c_str(), 0777);  // the umask must not soften it

  json j = w.BackupOk({disk->loop()});  // native hooks continue by default
  CHECK(j["consistency"] == "file-system");
  const json& s0 = j["consistency_evidence"]["scripts"][0];
  CHECK(s0["refused"] == true);
  CHECK(s0["error"].get<std::string>().find("chmod go-w " + writable) != std::string::npos);
  CHECK_FALSE(fs::exists(w.dir / "ran"));  // never executed

  auto r = w.Backup({disk->loop()}, {"--hook-failure", "fail"});
  CHECK(r.exit_code != 0);
  CHECK(r.err.find("writable by group or others") != std::string::npos);
  CHECK(r.err.find("chmod go-w " + writable) != std::string::npos);
  CHECK_FALSE(fs::exists(w.dir / "ran"));

  // Owned by another user.
  ::chmod(writable.c_str(), 0755);
  REQUIRE(::chown(writable.c_str(), 65534, 65534) == 0);
  r = w.Backup({disk->loop()}, {"--hook-failure", "fail"});
  CHECK(r.exit_code != 0);
  CHECK(r.err.find("not root") != std::string::npos);
  CHECK(r.err.find("chown root:root " + writable) != std::string::npos);
  CHECK_FALSE(fs::exists(w.dir / "ran"));
  CHECK(WritableWithin(disk->mount_point(), 2s));
}

// A `command` snapshot provider that records its pid and then hangs inside the freeze window.
std::string HangingSnapshotCommand(const World& w) {
  const std::string cmd = w.dir / "hanging-snapshot";
  WriteFile(cmd,
            "#!/bin/sh\necho $$ > " + w.dir / "snapshot.pid.tmp" + "\nmv " +
                w.dir / "snapshot.pid.tmp" + " " + w.dir / "snapshot.pid" + "\nexec sleep 30\n",
            0755);
  return cmd;
}

// Ends the hanging snapshot command (started by our agent) by its pid.
void EndSnapshotCommand(const World& w) {
  const std::string pid_file = w.dir / "snapshot.pid";
  std::string text = ReadFileText(pid_file);
  if (!text.empty()) {
    const pid_t pid = static_cast<pid_t>(std::stol(text));
    // Only if that pid is still our `sleep 30` (the agent may have ended it already).
    const std::string cmdline = ReadFileText("/proc/" + std::to_string(pid) + "/cmdline");
    if (pid > 1 && cmdline == std::string("sleep\0"
                                          "30\0",
                                          9))
      ::kill(pid, SIGKILL);
  }
  std::error_code ec;
  fs::remove(pid_file, ec);
}

TEST_CASE("pipeline: agent SIGKILLed or SIGSTOPped while frozen -> writable within deadline+1s") {
  World w;
  if (!w.Build()) return;
  auto disk = w.Disk("ext4", "app");
  REQUIRE(disk);
  const std::string cmd = HangingSnapshotCommand(w);
  const auto deadline = std::chrono::seconds(w.freeze_deadline_s);
  const auto args =
      w.BackupArgs({disk->loop()}, {"--snapshot", "command", "--snapshot-command", cmd, "--json"});
  std::vector<std::string> argv{AgentBinary()};
  argv.insert(argv.end(), args.begin(), args.end());

  {  // Not signalled: the hang is cut at the deadline and the backup fails, not consistent.
    auto r = Agent(args);
    CHECK(r.exit_code != 0);
    CHECK(r.err.find("freeze deadline") != std::string::npos);
    CHECK(r.json()["phase"] == "consistency");
    EndSnapshotCommand(w);  // already ended by the agent: this only removes the pid file
    CHECK_FALSE(w.MarkerPresent());
    CHECK(WritableWithin(disk->mount_point(), 1s));
  }
  for (int signal_to_send : {SIGKILL, SIGSTOP}) {
    for (int rep = 0; rep < 20; ++rep) {  // the issue asks for 20, no exception
      CAPTURE(signal_to_send);
      CAPTURE(rep);
      Child agent(argv, w.dir / "agent.out", w.dir / "agent.err");
      // The command runs inside the freeze window: the filesystem is frozen now.
      REQUIRE(WaitForFile(w.dir / "snapshot.pid", 20s));
      auto write = WriteAsync(disk->mount_point() + "/during-freeze");
      CHECK(write.wait_for(200ms) == std::future_status::timeout);  // really frozen
      agent.Signal(signal_to_send);
      const bool completed = write.wait_for(deadline + 1s) == std::future_status::ready;
      CHECK(completed);
      if (!completed) ThawForTest(disk->mount_point());
      CHECK(write.get());
      if (signal_to_send == SIGSTOP) {
        // Resumed, the agent finds the deadline passed: it fails, not consistent.
        agent.Signal(SIGCONT);
        CHECK(agent.Wait() != 0);
        const std::string err = ReadFileText(w.dir / "agent.err");
        CHECK(err.find("deadline") != std::string::npos);
        CHECK_FALSE(w.MarkerPresent());  // the agent confirmed the thaw itself
      } else {
        CHECK(agent.Wait() == 128 + SIGKILL);
        CHECK(w.MarkerPresent());  // left for the next start
      }
      EndSnapshotCommand(w);
      CHECK(WritableWithin(disk->mount_point(), 1s));
    }
  }
  CHECK(w.RecoveryPoints() == 0);
}

TEST_CASE("pipeline: a restarted agent finds the frozen marker, thaws and reports it") {
  World w;
  if (!w.Build()) return;
  auto disk = w.Disk("ext4", "app");
  REQUIRE(disk);
  // An agent killed inside the freeze window leaves its marker behind...
  const std::string cmd = HangingSnapshotCommand(w);
  const auto args =
      w.BackupArgs({disk->loop()}, {"--snapshot", "command", "--snapshot-command", cmd});
  std::vector<std::string> argv{AgentBinary()};
  argv.insert(argv.end(), args.begin(), args.end());
  {
    Child agent(argv, w.dir / "agent.out", w.dir / "agent.err");
    REQUIRE(WaitForFile(w.dir / "snapshot.pid", 20s));
    agent.Signal(SIGKILL);
    agent.Wait();
  }
  EndSnapshotCommand(w);
  REQUIRE(w.MarkerPresent());
  REQUIRE(WritableWithin(disk->mount_point(), 3s));  // its guard thawed (pipe closed)
  // ...and, as if its guard had died with it, the filesystem is still frozen.
  REQUIRE(FreezeForTest(disk->mount_point()));

  auto r = w.Backup({disk->loop()});
  INFO("stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.err.find("interrupted") != std::string::npos);
  json j = r.json();
  const json& leftover = j["consistency_evidence"]["leftover_freeze"];
  CHECK(leftover["found"] == true);
  CHECK(leftover["interrupted_backup"] == true);
  REQUIRE(leftover["filesystems"].size() == 1);
  CHECK(leftover["filesystems"][0]["mount_point"] == disk->mount_point());
  CHECK(leftover["filesystems"][0]["outcome"] == "thawed");
  CHECK(j["consistency"] == "file-system");  // and the backup itself froze and snapshotted
  CHECK_FALSE(w.MarkerPresent());
  CHECK(WritableWithin(disk->mount_point(), 1s));

  // The next start finds nothing.
  j = w.BackupOk({disk->loop()});
  CHECK(j["consistency_evidence"]["leftover_freeze"]["found"] == false);
}

TEST_CASE("pipeline: two disks frozen together, restored together, consistent with each other") {
  World w;
  if (!w.Build()) return;
  auto a = w.Disk("ext4", "a");
  auto b = w.Disk("xfs", "b");
  REQUIRE(a);
  REQUIRE(b);
  // Record n goes to A, then to B: at any instant A holds as many records as B or one more.
  SequenceWriter writer({a->mount_point() + "/seq", b->mount_point() + "/seq"});
  REQUIRE(writer.WaitFor(20, 10s));
  const uint64_t before = writer.acknowledged();
  json j = w.BackupOk({a->loop(), b->loop()});
  const uint64_t after = writer.acknowledged();
  writer.Stop();
  CHECK_FALSE(writer.failed());
  CHECK(j["consistency"] == "file-system");  // both frozen, snapshotted in the window
  CHECK(j["consistency_evidence"]["filesystems"].size() == 2);
  for (const auto& f : j["consistency_evidence"]["filesystems"]) CHECK(f["frozen"] == true);

  w.Restore(j["recovery_point"], {w.dir / "ra.img", w.dir / "rb.img"});
  CHECK(CheckFilesystem("ext4", w.dir / "ra.img") == 0);
  const long in_a = SequencePrefixLength(ReadFromExt4Image(w.dir / "ra.img", "/seq"));
  long in_b = -1;
  {
    MountedImage mb(w.dir / "rb.img", "xfs", w.dir / "mnt-b");
    REQUIRE(mb.ok());
    in_b = SequencePrefixLength(mb.Read("seq"));
  }
  CHECK(CheckFilesystem("xfs", w.dir / "rb.img") == 0);
  CAPTURE(in_a);
  CAPTURE(in_b);
  CHECK(in_a >= static_cast<long>(before));
  CHECK(in_b >= static_cast<long>(before));
  CHECK(in_a <= static_cast<long>(after) + 1);
  CHECK((in_a == in_b || in_a == in_b + 1));  // one instant across both disks
}

TEST_CASE("pipeline: an fsync'ing writer during backups; ext4, xfs, btrfs restore clean") {
  World w;
  if (!w.Build()) return;
  std::vector<std::unique_ptr<LoopFs>> disks;
  for (const std::string type : {"ext4", "xfs", "btrfs"}) {
    disks.push_back(w.Disk(type, type));
    REQUIRE(disks.back());
  }
  std::vector<std::string> files, loops;
  for (const auto& d : disks) {
    files.push_back(d->mount_point() + "/seq");
    loops.push_back(d->loop());
  }
  w.Hook("10-app", "true");
  struct Point {
    std::string rp;
    uint64_t before, after;
  };
  std::vector<Point> points;
  {
    SequenceWriter writer(files);
    for (int i = 0; i < 2; ++i) {  // a full backup, then an incremental, while it writes
      REQUIRE(writer.WaitFor(writer.acknowledged() + 20, 10s));
      const uint64_t before = writer.acknowledged();
      json j = w.BackupOk(loops);
      CHECK(j["consistency"] == "application");
      CHECK(j["disks"][0]["mode"] == (i == 0 ? "full" : "incremental"));
      points.push_back({j["recovery_point"], before, writer.acknowledged()});
    }
    writer.Stop();
    CHECK_FALSE(writer.failed());
  }
  // The originals go away first: a restored btrfs has the same fsid and must not meet it.
  disks.clear();

  for (size_t p = 0; p < points.size(); ++p) {
    CAPTURE(p);
    std::vector<std::string> targets;
    for (const std::string type : {"ext4", "xfs", "btrfs"})
      targets.push_back(w.dir / ("r" + std::to_string(p) + "-" + type + ".img"));
    w.Restore(points[p].rp, targets);
    size_t i = 0;
    for (const std::string type : {"ext4", "xfs", "btrfs"}) {
      CAPTURE(type);
      const std::string& image = targets[i++];
      long records = -1;
      {
        MountedImage m(image, type, w.dir / ("mnt-" + type));
        REQUIRE(m.ok());
        records = SequencePrefixLength(m.Read("seq"));
      }
      CHECK(CheckFilesystem(type, image) == 0);
      CAPTURE(records);
      CHECK(records >= static_cast<long>(points[p].before));  // every acknowledged record
      CHECK(records <= static_cast<long>(points[p].after) + 1);
    }
  }
}

}  // namespace

// Integration tests of `vmsnap mount`, `vmsnap umount`, `vmsnap restore-files` and whole-VM
// restore, against a real vmsnap-vault, the real vmsnap-agent, real loop devices, ext4 and xfs.
//
// Tests that need root (loop devices, mount) skip with a message when not root, and FAIL when
// CI=true. Every loop device, mount and process a test creates is its own (under a TempDir)
// and is released by RAII, also when an assertion fails.
#include <arpa/inet.h>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "agent/mount/image_source.hpp"
#include "tests/support/test_support.hpp"

using namespace vmsnap::test;
using nlohmann::json;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

constexpr uint64_t kBlock = 64 * 1024;

// Skips (or, under CI=true, fails) a test that needs root and /dev/fuse.
#define VMSNAP_REQUIRE_ROOT_OR_SKIP()                                                     \
  do {                                                                                    \
    if (!IsRoot() || !fs::exists("/dev/fuse")) {                                          \
      if (InCi()) FAIL("this test needs root and /dev/fuse (loop devices, mount, FUSE)"); \
      MESSAGE("skipped: needs root and /dev/fuse (loop devices, mount, FUSE)");           \
      return;                                                                             \
    }                                                                                     \
  } while (0)

std::string AdminBinary() {
  return VMSNAP_ADMIN_BINARY;
}

RunResult Admin(const std::vector<std::string>& args) {
  std::vector<std::string> argv{AdminBinary()};
  argv.insert(argv.end(), args.begin(), args.end());
  return Run(argv);
}

// Runs a system tool, found in the usual sbin/bin directories (Run does not search PATH).
RunResult RunTool(std::vector<std::string> argv) {
  if (argv[0].find('/') == std::string::npos)
    for (const char* d : {"/usr/sbin/", "/usr/bin/", "/sbin/", "/bin/"})
      if (fs::exists(d + argv[0])) {
        argv[0] = d + argv[0];
        break;
      }
  return Run(argv);
}

RunResult Must(const std::vector<std::string>& argv) {
  auto r = RunTool(argv);
  INFO(argv[0] << " stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  return r;
}

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

std::vector<std::string> MountPointsUnder(const std::string& prefix) {
  std::vector<std::string> out;
  std::ifstream in("/proc/self/mountinfo");
  for (std::string line; std::getline(in, line);) {
    std::istringstream f(line);
    std::string a, b, c, d, point;
    f >> a >> b >> c >> d >> point;
    if (point.rfind(prefix, 0) == 0) out.push_back(point);
  }
  return out;
}

// Loop devices (from `losetup -l`) whose backing file lies under prefix.
std::vector<std::string> LoopsUnder(const std::string& prefix) {
  std::vector<std::string> out;
  auto r = RunTool({"losetup", "-l", "-n", "-O", "NAME,BACK-FILE"});
  std::istringstream in(r.out);
  for (std::string line; std::getline(in, line);) {
    std::istringstream f(line);
    std::string name, back;
    f >> name >> back;
    if (back.rfind(prefix, 0) == 0) out.push_back(name);
  }
  return out;
}

// A loop device attached by this test, detached by name on destruction.
class Loop {
 public:
  explicit Loop(const std::string& image) {
    device_ = Trim(Must({"losetup", "--partscan", "--find", "--show", image}).out);
    REQUIRE(device_.rfind("/dev/loop", 0) == 0);
    // Some kernels have no partition table parsers: add the partitions from user space.
    if (!fs::exists("/sys/block/" + fs::path(device_).filename().string() + "/" +
                    fs::path(device_).filename().string() + "p1"))
      RunTool({"partx", "--add", device_});
  }
  ~Loop() { RunTool({"losetup", "-d", device_}); }
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;
  std::string part(int n) const {
    std::string p = device_ + "p" + std::to_string(n);
    for (int i = 0; i < 250 && !fs::exists(p); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return p;
  }

 private:
  std::string device_;
};

// A filesystem mounted by this test, unmounted on destruction.
class ScopedMount {
 public:
  ScopedMount(const std::string& device, const std::string& dir) : dir_(dir) {
    fs::create_directories(dir);
    Must({"mount", device, dir});
  }
  ~ScopedMount() { RunTool({"umount", dir_}); }
  ScopedMount(const ScopedMount&) = delete;
  ScopedMount& operator=(const ScopedMount&) = delete;

 private:
  std::string dir_;
};

void WriteRandomFile(const std::string& path, size_t size, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string data(size, '\0');
  for (size_t i = 0; i + 8 <= size; i += 8) {
    uint64_t v = rng();
    std::memcpy(&data[i], &v, 8);
  }
  std::ofstream(path, std::ios::binary) << data;
}

constexpr timespec kOldTime{1000000000, 123456789};  // 2001-09-09, with nanoseconds

void SetTimes(const std::string& path) {
  timespec t[2] = {kOldTime, kOldTime};
  REQUIRE(::utimensat(AT_FDCWD, path.c_str(), t, AT_SYMLINK_NOFOLLOW) == 0);
}

// A 400 MiB sparse image with a GPT: partition 1 ext4 (64 MiB), partition 2 xfs (300 MiB).
struct PartitionedDisk {
  std::string image;
  std::map<std::string, std::string> sha;  // "disk0/part1/big1.bin" -> SHA-256

  explicit PartitionedDisk(const TempDir& dir) : image(dir / "disk.img") {
    CreateSparseFile(image, 400ull << 20);
    std::ofstream(dir / "layout.sfdisk") << "label: gpt\n,64MiB,L\n,300MiB,L\n";
    Must({"sh", "-c", "sfdisk -q '" + image + "' < '" + (dir / "layout.sfdisk") + "'"});
    Loop loop(image);
    Must({"mkfs.ext4", "-q", "-F", loop.part(1)});
    Must({"mkfs.xfs", "-q", "-f", loop.part(2)});
    {
      ScopedMount ext4(loop.part(1), dir / "src1");
      std::string r = dir / "src1";
      WriteRandomFile(r + "/big1.bin", 1 << 20, 1);
      WriteRandomFile(r + "/filler.bin", 24 << 20, 2);
      fs::create_directories(r + "/tree/sub");
      std::ofstream(r + "/tree/a.txt") << "hello from the recovery point\n";
      WriteRandomFile(r + "/tree/sub/b.bin", 200 * 1024, 3);
      REQUIRE(::symlink("a.txt", (r + "/tree/link").c_str()) == 0);
      REQUIRE(::symlink("/etc/passwd", (r + "/tree/abs-link").c_str()) == 0);
      REQUIRE(::setxattr((r + "/tree/a.txt").c_str(), "user.vmsnap", "kept", 4, 0) == 0);
      REQUIRE(::chown((r + "/tree/a.txt").c_str(), 1234, 5678) == 0);
      REQUIRE(::chmod((r + "/tree/a.txt").c_str(), 0640) == 0);
      REQUIRE(::chmod((r + "/tree/sub/b.bin").c_str(), 0600) == 0);
      REQUIRE(::chown((r + "/tree/sub").c_str(), 1001, 1002) == 0);
      REQUIRE(::chmod((r + "/tree/sub").c_str(), 0750) == 0);
      REQUIRE(::lchown((r + "/tree/link").c_str(), 4321, 8765) == 0);
      for (const char* p : {"/tree/a.txt", "/tree/sub/b.bin", "/tree/link", "/tree/sub"})
        SetTimes(r + p);
      for (const char* f : {"big1.bin", "filler.bin", "tree/a.txt", "tree/sub/b.bin"})
        sha[std::string("disk0/part1/") + f] = FileSha256(r + "/" + f);
    }
    {
      ScopedMount xfs(loop.part(2), dir / "src2");
      std::string r = dir / "src2";
      fs::create_directories(r + "/data");
      WriteRandomFile(r + "/data/c.bin", 2 << 20, 4);
      WriteRandomFile(r + "/data/d.bin", 2 << 20, 5);
      for (const char* f : {"data/c.bin", "data/d.bin"})
        sha[std::string("disk0/part2/") + f] = FileSha256(r + "/" + f);
    }
  }
};

std::string BackupDisks(const Vault& v, const TempDir& dir, const std::vector<std::string>& disks) {
  std::vector<std::string> args{"backup"};
  auto c = v.conn();
  args.insert(args.end(), c.begin(), c.end());
  for (const auto& d : disks) args.insert(args.end(), {"--disk", d});
  // Block counts and cache sizes in these tests are in 64 KiB blocks (kBlock).
  args.insert(args.end(), {"--state-dir", dir / "agent-state", "--item", "test-vm", "--json",
                           "--block-size", "64K"});
  auto r = Agent(args);
  INFO("backup stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  return r.json()["recovery_point"];
}

// `vmsnap mount` running in the background. On destruction: `vmsnap umount`, then the child is
// killed and reaped if it is still there.
class MountProcess {
 public:
  MountProcess(const TempDir& dir, const std::vector<std::string>& conn, const std::string& rp,
               std::string mountpoint)
      : mountpoint_(std::move(mountpoint)),
        state_dir_(dir / "mount-state"),
        out_(dir / "mount.out"),
        err_(dir / "mount.err") {
    std::vector<std::string> argv{AdminBinary(), "mount",       rp,        mountpoint_,
                                  "--json",      "--state-dir", state_dir_};
    argv.insert(argv.end(), conn.begin(), conn.end());
    child_ = std::make_unique<Child>(argv, out_, err_);
    for (int i = 0; i < 1200; ++i) {
      report_ = json::parse(ReadWhole(out_), nullptr, false);
      if (report_.is_object()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (::kill(child_->pid(), 0) != 0) break;
    }
    INFO("mount stderr: " << ReadWhole(err_));
    FAIL("vmsnap mount did not report a mount");
  }
  ~MountProcess() {
    if (fs::exists(state_dir_) && !fs::is_empty(state_dir_)) Umount();
  }
  MountProcess(const MountProcess&) = delete;
  MountProcess& operator=(const MountProcess&) = delete;

  RunResult Umount() {
    auto r = Admin({"umount", mountpoint_, "--state-dir", state_dir_, "--json"});
    if (child_->running()) {
      int rc = child_->Wait();  // a clean teardown (and, under ASan, no leak report)
      CHECK_MESSAGE(rc == 0, "vmsnap mount log: " << log());
    }
    return r;
  }
  json Stats() const { return json::parse(ReadWhole(mountpoint_ + "/images/stats.json")); }
  Child& child() { return *child_; }
  const json& report() const { return report_; }
  std::string log() const { return ReadWhole(err_); }
  const std::string& state_dir() const { return state_dir_; }

 private:
  std::string mountpoint_, state_dir_, out_, err_;
  std::unique_ptr<Child> child_;
  json report_;
};

void CheckNothingLeft(const std::string& mountpoint, const std::string& state_dir) {
  CHECK(MountPointsUnder(mountpoint).empty());
  CHECK(LoopsUnder(mountpoint).empty());
  CHECK((!fs::exists(state_dir) || fs::is_empty(state_dir)));
}

// A vault on a fixed port, so that a restart keeps its URL (test_support's Vault picks a new
// port at each start).
class FixedPortVault {
 public:
  explicit FixedPortVault(std::string data) : data_(std::move(data)) {
    int s = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    socklen_t len = sizeof a;
    ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    ::close(s);
  }
  void Start() {
    fs::create_directories(data_);
    fs::remove(data_ + "/vault.json");
    child_ = std::make_unique<Child>(
        std::vector<std::string>{VaultBinary(), "serve", "--data", data_, "--listen",
                                 "127.0.0.1:" + std::to_string(port_)},
        data_ + "/../fixed-vault.out", data_ + "/../fixed-vault.err");
    for (int i = 0; i < 300; ++i) {
      auto info = json::parse(ReadWhole(data_ + "/vault.json"), nullptr, false);
      if (info.is_object() && info.value("pid", 0) == child_->pid()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    FAIL("vault did not start: " << ReadWhole(data_ + "/../fixed-vault.err"));
  }
  void Stop() {
    child_->Signal(SIGTERM);
    child_->Wait();
  }
  std::string url() const { return "https://127.0.0.1:" + std::to_string(port_); }
  std::vector<std::string> conn() const {
    return {"--vault", url(), "--ca", data_ + "/tls/ca.pem", "--token-file", data_ + "/token"};
  }
  vmsnap::ClientOptions client() const {
    vmsnap::ClientOptions o;
    o.url = url();
    o.ca_file = data_ + "/tls/ca.pem";
    o.token = Trim(ReadWhole(data_ + "/token"));
    o.max_attempts = 2;
    return o;
  }

 private:
  std::string data_;
  int port_ = 0;
  std::unique_ptr<Child> child_;
};

// Reads a whole file with read(2); returns errno of the first failure (0 on success).
int ReadAllErrno(const std::string& path, std::string* content = nullptr) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return errno;
  std::string data;
  char buf[65536];
  int err = 0;
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      err = errno;
      break;
    }
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  if (content) *content = std::move(data);
  return err;
}

}  // namespace

TEST_CASE("mount: files read back identical, reads are lazy, umount leaves nothing") {
  VMSNAP_REQUIRE_ROOT_OR_SKIP();
  TempDir dir;
  PartitionedDisk disk(dir);
  Vault vault(dir / "vault");
  vault.Start();
  std::string rp = BackupDisks(vault, dir, {disk.image});
  std::string mp = dir / "mnt";
  {
    MountProcess m(dir, {"--vault-config", vault.data() + "/vault.json"}, rp, mp);
    INFO("mount log: " << m.log());
    const json& rep = m.report();
    CHECK(rep["recovery_point"] == rp);
    CHECK(rep["consistency"] == "crash");
    REQUIRE(rep["disks"].size() == 1);
    const json& fss = rep["disks"][0]["filesystems"];
    REQUIRE(fss.size() == 2);
    CHECK(fss[0]["name"] == "part1");
    CHECK(fss[0]["type"] == "ext4");
    CHECK(fss[0]["path"] == mp + "/disk0/part1");
    CHECK(fss[1]["name"] == "part2");
    CHECK(fss[1]["type"] == "xfs");
    CHECK(fss[1]["path"] == mp + "/disk0/part2");
    CHECK(fs::file_size(mp + "/images/disk0.img") == 400ull << 20);
    CHECK(LoopsUnder(mp + "/images/").size() == 1);

    // Laziness: reading one 1 MiB file fetches about what the file occupies.
    json before = m.Stats();
    CHECK(FileSha256(mp + "/disk0/part1/big1.bin") == disk.sha["disk0/part1/big1.bin"]);
    json after = m.Stats();
    uint64_t fetched =
        after["blocks_fetched"].get<uint64_t>() - before["blocks_fetched"].get<uint64_t>();
    MESSAGE("blocks fetched for a 1 MiB file: " << fetched << "; total so far "
                                                << after["blocks_fetched"]);
    CHECK(fetched <= (1u << 20) / kBlock + 24);  // 16 data blocks + metadata and read-ahead
    // The disk holds > 25 MiB of data (> 400 blocks); far less than that was fetched.
    CHECK(after["blocks_fetched"].get<uint64_t>() < 120);
    CHECK(after["cache_bytes"].get<uint64_t>() <= after["cache_capacity_bytes"].get<uint64_t>());

    // Every file of both filesystems reads back identical.
    for (const auto& [rel, sha] : disk.sha) CHECK_MESSAGE(FileSha256(mp + "/" + rel) == sha, rel);
    // A second read of the same file is served from caches: no new fetches.
    json again = m.Stats();
    CHECK(FileSha256(mp + "/disk0/part1/big1.bin") == disk.sha["disk0/part1/big1.bin"]);
    CHECK(m.Stats()["blocks_fetched"] == again["blocks_fetched"]);
    // The image file itself: the partition table region matches the original image.
    {
      std::ifstream a(disk.image, std::ios::binary), b(mp + "/images/disk0.img", std::ios::binary);
      std::string x(1 << 20, '\0'), y(1 << 20, '\0');
      a.read(x.data(), x.size());
      b.read(y.data(), y.size());
      CHECK(x == y);
    }
    // Read-only everywhere.
    CHECK(::open((mp + "/disk0/part1/new").c_str(), O_WRONLY | O_CREAT, 0644) < 0);
    CHECK(::open((mp + "/images/disk0.img").c_str(), O_WRONLY) < 0);

    auto u = m.Umount();
    INFO("umount stderr: " << u.err);
    CHECK(u.exit_code == 0);
    CHECK(u.json()["stopped_process"] == true);
    CheckNothingLeft(mp, m.state_dir());
    CHECK(fs::is_empty(mp));
  }
}

TEST_CASE("kill -9 of the mount process: vmsnap umount cleans up loop devices and mounts") {
  VMSNAP_REQUIRE_ROOT_OR_SKIP();
  TempDir dir;
  PartitionedDisk disk(dir);
  Vault vault(dir / "vault");
  vault.Start();
  std::string rp = BackupDisks(vault, dir, {disk.image});
  std::string mp = dir / "mnt";
  MountProcess m(dir, {"--vault-config", vault.data() + "/vault.json"}, rp, mp);
  REQUIRE(MountPointsUnder(mp).size() == 3);  // images, part1, part2
  REQUIRE(LoopsUnder(mp).size() == 1);
  m.child().Signal(SIGKILL);
  CHECK(m.child().Wait() == 128 + SIGKILL);
  CHECK(MountPointsUnder(mp).size() == 3);  // the crash left everything behind

  // A new mount on the same mount point is refused until it is cleaned up.
  auto again = Admin({"mount", rp, mp, "--vault-config", vault.data() + "/vault.json",
                      "--state-dir", m.state_dir()});
  CHECK(again.exit_code != 0);
  CHECK(again.err.find("vmsnap umount") != std::string::npos);

  auto u = m.Umount();
  INFO("umount stderr: " << u.err);
  CHECK(u.exit_code == 0);
  json j = u.json();
  CHECK(j["stopped_process"] == false);
  CHECK(j["unmounted"].size() == 3);
  CHECK(j["detached"].size() == 1);
  CheckNothingLeft(mp, m.state_dir());
  // Nothing recorded any more.
  auto twice = Admin({"umount", mp, "--state-dir", m.state_dir()});
  CHECK(twice.exit_code == 6);
  CHECK(twice.err.find("no vmsnap mount is recorded") != std::string::npos);
}

TEST_CASE("restore-files keeps modes, owners, timestamps, symlinks and xattrs; no overwrite") {
  VMSNAP_REQUIRE_ROOT_OR_SKIP();
  TempDir dir;
  PartitionedDisk disk(dir);
  Vault vault(dir / "vault");
  vault.Start();
  std::string rp = BackupDisks(vault, dir, {disk.image});
  std::vector<std::string> conn{"--vault",  vault.url(),    "--ca",
                                vault.ca(), "--token-file", vault.data() + "/token"};
  std::string to = dir / "restored";
  auto restore = [&](std::vector<std::string> extra) {
    std::vector<std::string> args{
        "restore-files", rp, "--path", "disk0/part1/tree", "--path",   "disk0/part2/data/c.bin",
        "--to",          to, "--json", "--state-dir",      dir / "st", "--work-dir",
        dir.path()};
    args.insert(args.end(), conn.begin(), conn.end());
    args.insert(args.end(), extra.begin(), extra.end());
    return Admin(args);
  };
  auto r = restore({});
  INFO("stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  json j = r.json();
  CHECK(j["consistency"] == "crash");
  CHECK(j["files"] == 3);        // a.txt, sub/b.bin, c.bin
  CHECK(j["directories"] == 2);  // tree, tree/sub
  CHECK(j["symlinks"] == 2);
  CHECK(j["bytes"] == 30 + 200 * 1024 + (2 << 20));
  CHECK(FileSha256(to + "/tree/a.txt") == disk.sha["disk0/part1/tree/a.txt"]);
  CHECK(FileSha256(to + "/tree/sub/b.bin") == disk.sha["disk0/part1/tree/sub/b.bin"]);
  CHECK(FileSha256(to + "/c.bin") == disk.sha["disk0/part2/data/c.bin"]);
  struct stat st {};
  REQUIRE(::lstat((to + "/tree/a.txt").c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0640);
  CHECK(st.st_uid == 1234);
  CHECK(st.st_gid == 5678);
  CHECK(st.st_mtim.tv_sec == kOldTime.tv_sec);
  CHECK(st.st_mtim.tv_nsec == kOldTime.tv_nsec);
  REQUIRE(::lstat((to + "/tree/sub").c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0750);
  CHECK(st.st_uid == 1001);
  CHECK(st.st_mtim.tv_sec == kOldTime.tv_sec);
  REQUIRE(::lstat((to + "/tree/sub/b.bin").c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0600);
  REQUIRE(::lstat((to + "/tree/link").c_str(), &st) == 0);
  CHECK(S_ISLNK(st.st_mode));
  CHECK(st.st_uid == 4321);
  CHECK(fs::read_symlink(to + "/tree/link") == "a.txt");
  CHECK(fs::read_symlink(to + "/tree/abs-link") == "/etc/passwd");  // copied, not followed
  char value[16] = {};
  CHECK(::getxattr((to + "/tree/a.txt").c_str(), "user.vmsnap", value, sizeof value) == 4);
  CHECK(std::string(value) == "kept");
  // Nothing is left mounted or attached, and the temporary mount point is gone.
  CHECK(MountPointsUnder(dir.path()).empty());
  CHECK(LoopsUnder(dir.path()).empty());
  CHECK(fs::is_empty(dir / "st"));

  // Again without --overwrite: refused, nothing changed.
  std::ofstream(to + "/tree/a.txt") << "changed locally";
  r = restore({});
  CHECK(r.exit_code == 1);
  CHECK(r.json()["code"] == "ALREADY_EXISTS");
  CHECK(r.err.find("--overwrite") != std::string::npos);
  CHECK(ReadWhole(to + "/tree/a.txt") == "changed locally");
  CHECK(MountPointsUnder(dir.path()).empty());
  CHECK(LoopsUnder(dir.path()).empty());
  // With --overwrite: replaced.
  r = restore({"--overwrite"});
  CHECK(r.exit_code == 0);
  CHECK(FileSha256(to + "/tree/a.txt") == disk.sha["disk0/part1/tree/a.txt"]);

  // Bad paths: clear errors, nothing left behind.
  std::vector<std::string> base{"restore-files", rp,         "--to",       to,
                                "--state-dir",   dir / "st", "--work-dir", dir.path()};
  base.insert(base.end(), conn.begin(), conn.end());
  auto bad = base;
  bad.insert(bad.end(), {"--path", "disk0/part1/../../etc"});
  r = Admin(bad);
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("disk<N>/part<M>") != std::string::npos);
  bad = base;
  bad.insert(bad.end(), {"--path", "disk0/part1/no-such-file"});
  r = Admin(bad);
  CHECK(r.exit_code == 6);
  CHECK(r.err.find("does not exist") != std::string::npos);
  bad = base;
  bad.insert(bad.end(), {"--path", "disk0/part1/tree/abs-link/x"});  // through a host symlink
  r = Admin(bad);
  CHECK(r.exit_code == 6);
  bad = base;
  bad.insert(bad.end(), {"--path", "disk0/part7/x"});
  r = Admin(bad);
  CHECK(r.exit_code == 6);
  CHECK(r.err.find("available: disk0/part1, disk0/part2") != std::string::npos);
  CHECK(MountPointsUnder(dir.path()).empty());
  CHECK(LoopsUnder(dir.path()).empty());

  // A whole filesystem goes to DIR/part<M>.
  std::vector<std::string> whole{"restore-files", rp,         "--path",      "disk0/part2",
                                 "--to",          dir / "w",  "--state-dir", dir / "st",
                                 "--work-dir",    dir.path(), "--json"};
  whole.insert(whole.end(), conn.begin(), conn.end());
  r = Admin(whole);
  INFO("stderr: " << r.err);
  CHECK(r.exit_code == 0);
  CHECK(FileSha256(dir / "w/part2/data/d.bin") == disk.sha["disk0/part2/data/d.bin"]);
  CHECK(r.json()["files"] == 2);
}

TEST_CASE("vault down while mounted: reads fail with EIO in bounded time and recover") {
  VMSNAP_REQUIRE_ROOT_OR_SKIP();
  TempDir dir;
  PartitionedDisk disk(dir);
  FixedPortVault vault(dir / "vault");
  vault.Start();
  {
    std::vector<std::string> args{"backup"};
    auto c = vault.conn();
    args.insert(args.end(), c.begin(), c.end());
    args.insert(args.end(),
                {"--disk", disk.image, "--state-dir", dir / "as", "--json", "--block-size", "64K"});
    auto r = Agent(args);
    REQUIRE(r.exit_code == 0);
    std::string rp = r.json()["recovery_point"];
    std::string mp = dir / "mnt";
    MountProcess m(dir, vault.conn(), rp, mp);
    CHECK(FileSha256(mp + "/disk0/part2/data/d.bin") == disk.sha["disk0/part2/data/d.bin"]);

    vault.Stop();
    auto t0 = Clock::now();
    int err = ReadAllErrno(mp + "/disk0/part2/data/c.bin");
    double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    CHECK(err == EIO);
    CHECK(secs < 30);  // does not hang
    std::string log = m.log();
    CHECK(log.find("answering EIO") != std::string::npos);
    CHECK(log.find("unreachable") != std::string::npos);
    CHECK(m.Stats()["fetch_errors"].get<uint64_t>() > 0);

    vault.Start();
    std::string content;
    CHECK(ReadAllErrno(mp + "/disk0/part2/data/c.bin", &content) == 0);
    CHECK(vmsnap::Sha256Hex(content) == disk.sha["disk0/part2/data/c.bin"]);
    CHECK(m.log().find("the vault answers again") != std::string::npos);
    CHECK(m.Umount().exit_code == 0);
    CheckNothingLeft(mp, m.state_dir());
  }
  vault.Stop();
}

TEST_CASE("image reads without root: identical bytes, zero blocks cost nothing, vault outage") {
  TempDir dir;
  FixedPortVault vault(dir / "vault");
  vault.Start();
  std::string img = dir / "disk.img";
  CreateSparseFile(img, 8 * kBlock + 5000);  // a short last block
  WriteRandomBlocks(img, kBlock, {1, 2, 3, 6}, 7);
  {
    int fd = ::open(img.c_str(), O_WRONLY);
    REQUIRE(::pwrite(fd, "tail", 4, 8 * kBlock + 100) == 4);
    ::close(fd);
  }
  std::vector<std::string> args{"backup"};
  auto c = vault.conn();
  args.insert(args.end(), c.begin(), c.end());
  args.insert(args.end(),
              {"--disk", img, "--state-dir", dir / "as", "--json", "--block-size", "64K"});
  auto r = Agent(args);
  REQUIRE(r.exit_code == 0);

  vmsnap::mount::ImageOptions o;
  o.control = vault.client();
  o.fetch = vmsnap::mount::ShortFetchOptions(vault.client());
  o.recovery_point = r.json()["recovery_point"];
  o.cache_bytes = 3 * kBlock;  // smaller than the data: eviction happens
  o.map_page_entries = 2;      // the map of 5 data blocks read in pages of 2, 2 and 1
  auto images = vmsnap::mount::RecoveryPointImages::Open(o);
  REQUIRE(images.ok());
  auto& im = **images;
  REQUIRE(im.disks().size() == 1);
  CHECK(im.disks()[0].size_bytes == 8 * kBlock + 5000);
  CHECK(im.disks()[0].data_blocks == 5);
  CHECK(im.consistency() == "crash");
  std::string want = ReadWhole(img);

  // Zero blocks need no request.
  std::vector<std::byte> buf(kBlock);
  REQUIRE(im.Read(0, 4 * kBlock, buf).ok());
  CHECK(im.StatsJson()["blocks_fetched"] == 0);
  CHECK(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0}; }));

  // Reads at odd offsets and sizes, across block borders and the short last block.
  std::mt19937_64 rng(1);
  for (int i = 0; i < 200; ++i) {
    uint64_t off = rng() % want.size();
    size_t len = 1 + rng() % (3 * kBlock);
    std::vector<std::byte> out(len);
    auto n = im.Read(0, off, out);
    REQUIRE(n.ok());
    size_t expect = std::min<uint64_t>(len, want.size() - off);
    REQUIRE(*n == expect);
    CHECK(std::memcmp(out.data(), want.data() + off, expect) == 0);
  }
  auto past = im.Read(0, want.size(), buf);
  REQUIRE(past.ok());
  CHECK(*past == 0);
  json s = im.StatsJson();
  CHECK(s["cache_hits"].get<uint64_t>() > 0);
  CHECK(s["cache_bytes"].get<uint64_t>() <= 3 * kBlock);

  // Vault down: an uncached read fails fast with a retryable status, then recovers.
  std::vector<std::byte> one(kBlock);
  vault.Stop();
  auto t0 = Clock::now();
  bool failed = false;
  for (uint64_t b : {1, 2, 3, 6, 8}) {  // at least one is not cached (the cache holds 3)
    auto n = im.Read(0, b * kBlock, one);
    if (!n.ok()) {
      failed = true;
      CHECK(n.status().retryable());
      break;
    }
  }
  CHECK(failed);
  CHECK(std::chrono::duration<double>(Clock::now() - t0).count() < 30);
  vault.Start();
  for (uint64_t b : {1, 2, 3, 6}) {
    auto n = im.Read(0, b * kBlock, one);
    REQUIRE(n.ok());
    CHECK(std::memcmp(one.data(), want.data() + b * kBlock, kBlock) == 0);
  }
  vault.Stop();
}

TEST_CASE("whole-VM restore of a three-disk recovery point gives three identical disks") {
  TempDir dir;
  Vault vault(dir / "vault");
  vault.Start();
  std::vector<std::string> disks;
  for (int i = 0; i < 3; ++i) {
    std::string p = dir / ("vm-disk" + std::to_string(i) + ".img");
    CreateSparseFile(p, (16u + 8u * i) << 20);
    WriteRandomBlocks(p, kBlock, {0, 3, 17, static_cast<uint64_t>(100 + i)}, 10 + i);
    disks.push_back(p);
  }
  std::string rp = BackupDisks(vault, dir, disks);
  std::vector<std::string> args{"restore"};
  auto c = vault.conn();
  args.insert(args.end(), c.begin(), c.end());
  args.insert(args.end(),
              {"--rp", rp, "--json", "--to", dir / "a", "--to", dir / "b", "--to", dir / "c"});
  auto r = Agent(args);
  INFO("stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  json j = r.json();
  CHECK(j["consistency"] == "crash");
  REQUIRE(j["disks"].size() == 3);
  const char* names[] = {"a", "b", "c"};
  for (int i = 0; i < 3; ++i) {
    CHECK(fs::file_size(dir / names[i]) == fs::file_size(disks[i]));
    CHECK(FileSha256(dir / names[i]) == FileSha256(disks[i]));
    CHECK(j["disks"][i]["blocks_data"] == 4);
  }
}

TEST_CASE("bad input to vmsnap: clear errors, nothing mounted") {
  TempDir dir;
  Vault vault(dir / "vault");
  vault.Start();
  std::string cfg = vault.data() + "/vault.json";
  auto r = Admin({"mount", "20990101T000000000Z-0000", dir / "mnt", "--vault-config", cfg,
                  "--state-dir", dir / "st", "--json"});
  CHECK(r.exit_code == 6);
  CHECK(r.json()["phase"] == "find recovery point");
  CHECK(r.err.find("vmsnap-agent list") != std::string::npos);
  CHECK(MountPointsUnder(dir.path()).empty());
  r = Admin({"umount", dir / "nothing", "--state-dir", dir / "st"});
  CHECK(r.exit_code == 6);
  r = Admin({"mount", "x", dir / "mnt", "--state-dir", dir / "st"});
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("--vault-config") != std::string::npos);
  r = Admin({"mount", "x", dir / "mnt", "--vault-config", dir / "missing.json"});
  CHECK(r.exit_code != 0);
  CHECK(r.err.find("read vault config") != std::string::npos);
  r = Admin({"restore-files", "x", "--path", "/etc", "--to", dir / "out", "--vault-config", cfg});
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("relative to the mount layout") != std::string::npos);
}

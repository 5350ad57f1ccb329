// Test fixtures for the consistency engine: real filesystems on loop devices created from
// image files in the test's own temporary directory, with RAII clean-up (thaw, umount,
// losetup -d of exactly the device we attached, remove the image).
//
// SAFETY: everything lives below TestRoot() (/var/tmp/vmsnap-ctest.XXXXXX). TestRoot() sets
// VMSNAP_FREEZE_ONLY_UNDER to it, so the guard and FreezeSession refuse any mount point not
// below it (and "/"). FreezeForTest() refuses the same.
#pragma once

#include <doctest/doctest.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <string>
#include <thread>

#include "platform/quiesce.hpp"

namespace vmsnap::test {

namespace fs = std::filesystem;

struct ShellResult {
  int rc = -1;
  std::string output;
};

// Runs a command line through /bin/sh, capturing stdout+stderr.
inline ShellResult Sh(const std::string& cmd) {
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

inline bool InCi() {
  const char* ci = std::getenv("CI");
  return ci && std::string(ci) == "true";
}

// Root-only tests: skip with a reason, but fail under CI=true.
inline bool RequireRoot() {
  if (::geteuid() == 0) return true;
  if (InCi()) {
    FAIL(
        "this test needs root (loop devices, mount, FIFREEZE, root-owned scripts); CI=true "
        "so it fails instead of skipping");
  } else {
    MESSAGE("SKIPPED: needs root (loop devices, mount, FIFREEZE, root-owned scripts)");
  }
  return false;
}

inline bool RequireTool(const std::string& tool) {
  if (Sh("command -v " + tool).rc == 0) return true;
  if (InCi()) {
    FAIL("tool " << tool << " is missing; CI=true so this fails instead of skipping");
  } else {
    MESSAGE("SKIPPED: tool " << tool << " is missing");
  }
  return false;
}

// The per-process root of everything the tests create; removed at exit.
class TestRootDir {
 public:
  TestRootDir() {
    char tmpl[] = "/var/tmp/vmsnap-ctest.XXXXXX";
    if (::mkdtemp(tmpl)) path_ = tmpl;
    ::setenv(platform::kFreezeOnlyUnderEnv, path_.c_str(), 1);
  }
  ~TestRootDir() {
    std::error_code ec;
    if (!path_.empty() && Sh("grep -q ' " + path_ + "' /proc/self/mountinfo").rc != 0)
      fs::remove_all(path_, ec);  // never recurse into something still mounted
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline const std::string& TestRoot() {
  static TestRootDir root;
  return root.path();
}

inline bool IsBelowTestRoot(const std::string& p) {
  const std::string& root = TestRoot();
  return !root.empty() && p.size() > root.size() + 1 && p.compare(0, root.size(), root) == 0 &&
         p[root.size()] == '/';
}

// A fresh directory below TestRoot(), removed (if nothing is mounted in it) at scope end.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = TestRoot() + "/t.XXXXXX";
    if (::mkdtemp(tmpl.data())) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty() && Sh("grep -q ' " + path_ + "' /proc/self/mountinfo").rc != 0)
      fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// FITHAW a test mount (EINVAL: not frozen). Refuses anything not below TestRoot().
inline void ThawForTest(const std::string& mount_point) {
  if (!IsBelowTestRoot(mount_point)) return;
  int fd = ::open(mount_point.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::ioctl(fd, FITHAW, 0);
  ::close(fd);
}

// FIFREEZE a test mount directly (simulates a leftover freeze). Refuses anything else.
inline bool FreezeForTest(const std::string& mount_point) {
  if (!IsBelowTestRoot(mount_point) || mount_point == "/") {
    FAIL("refusing to freeze " << mount_point << ": not a test mount");
    return false;
  }
  int fd = ::open(mount_point.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return false;
  int rc = ::ioctl(fd, FIFREEZE, 0);
  ::close(fd);
  return rc == 0;
}

// An image file + loop device + filesystem + mount point, all below `dir` (a TempDir).
class LoopFs {
 public:
  // type: "ext4", "xfs", "btrfs". Returns null (after a FAIL/MESSAGE) when it cannot be built.
  static std::unique_ptr<LoopFs> Create(const std::string& dir, const std::string& type,
                                        int size_mb, const std::string& name = "fs") {
    if (!IsBelowTestRoot(dir)) {
      FAIL("refusing to create a test filesystem outside the test root: " << dir);
      return nullptr;
    }
    auto f = std::unique_ptr<LoopFs>(new LoopFs());
    f->image_ = dir + "/" + name + ".img";
    f->mount_point_ = dir + "/" + name;
    fs::create_directories(f->mount_point_);
    auto t = Sh("truncate -s " + std::to_string(size_mb) + "M " + f->image_);
    if (t.rc != 0) {
      FAIL("truncate: " << t.output);
      return nullptr;
    }
    std::string mkfs = type == "ext4"    ? "mkfs.ext4 -q -F "
                       : type == "xfs"   ? "mkfs.xfs -q -f "
                       : type == "btrfs" ? "mkfs.btrfs -q -f "
                                         : "false ";
    auto m = Sh(mkfs + f->image_);
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
    f->type_ = type;
    return f;
  }

  ~LoopFs() {
    ThawForTest(mount_point_);
    for (const auto& b : bind_mounts_) Sh("umount " + b);
    if (mounted_ && Sh("umount " + mount_point_).rc != 0) {
      ThawForTest(mount_point_);
      Sh("umount -l " + mount_point_);
    }
    if (!loop_.empty()) Sh("losetup -d " + loop_);  // exactly the device we attached
    std::error_code ec;
    fs::remove(image_, ec);
  }

  // A bind mount of this filesystem at `target` (below the test root), undone first.
  bool BindAt(const std::string& target) {
    if (!IsBelowTestRoot(target)) return false;
    fs::create_directories(target);
    if (Sh("mount --bind " + mount_point_ + " " + target).rc != 0) return false;
    bind_mounts_.insert(bind_mounts_.begin(), target);
    return true;
  }

  const std::string& image() const { return image_; }
  const std::string& loop() const { return loop_; }
  const std::string& mount_point() const { return mount_point_; }
  const std::string& type() const { return type_; }

 private:
  LoopFs() = default;
  std::string image_, loop_, mount_point_, type_;
  std::vector<std::string> bind_mounts_;
  bool mounted_ = false;
};

// Starts a write (create + write + fsync) of `path` on another thread.
inline std::future<bool> WriteAsync(const std::string& path) {
  return std::async(std::launch::async, [path] {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return false;
    bool ok = ::write(fd, "data\n", 5) == 5 && ::fsync(fd) == 0;
    ::close(fd);
    return ok;
  });
}

// Writes a file with a mode (root-owned when run as root).
inline void WriteFile(const std::string& path, const std::string& text, int mode = 0644) {
  {
    std::ofstream out(path, std::ios::trunc);
    out << text;
  }
  ::chmod(path.c_str(), static_cast<mode_t>(mode));
}

inline std::string ReadFileText(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A mount point is writable when a write issued now completes within `within`.
inline bool WritableWithin(const std::string& mount_point, std::chrono::milliseconds within) {
  auto w = WriteAsync(mount_point + "/probe-" + std::to_string(::getpid()));
  if (w.wait_for(within) != std::future_status::ready) {
    ThawForTest(mount_point);  // don't leave the blocked writer hanging the test
    w.wait();
    return false;
  }
  return w.get();
}

}  // namespace vmsnap::test

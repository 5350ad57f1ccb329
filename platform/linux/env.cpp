// Linux implementation of platform/env.hpp.
#include "platform/env.hpp"

#include "platform/linux/fd.hpp"

#include <fcntl.h>
#include <linux/fs.h>
#include <malloc.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

namespace vmsnap::platform {
namespace {

int64_t ToNs(const struct timespec& ts) {
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

Result<FileIdentity> IdentityOf(int fd, const std::string& path) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Status::FromErrno(errno, "stat " + path);
  FileIdentity id;
  id.device = st.st_dev;
  id.inode = st.st_ino;
  id.size = static_cast<uint64_t>(st.st_size);
  id.mtime_ns = ToNs(st.st_mtim);
  id.ctime_ns = ToNs(st.st_ctim);
  if (S_ISBLK(st.st_mode)) {
    uint64_t bytes = 0;
    if (::ioctl(fd, BLKGETSIZE64, &bytes) == 0) id.size = bytes;
  }
  return id;
}

// Writes all n bytes at offset; returns 0, or the errno of the write that failed.
int PwriteAll(int fd, const char* p, size_t n, uint64_t offset) {
  while (n > 0) {
    ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    p += w;
    n -= static_cast<size_t>(w);
    offset += static_cast<uint64_t>(w);
  }
  return 0;
}

Status WriteAll(int fd, const char* p, size_t n, uint64_t offset, const std::string& path) {
  const int err = PwriteAll(fd, p, n, offset);
  return err == 0 ? Status::Ok() : Status::FromErrno(err, "write " + path);
}

// Positioned reads that zero-fill what lies beyond the end of the file.
Status ReadAllAt(int fd, std::span<std::byte> buf, uint64_t offset, const std::string& path) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t r =
        ::pread(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno,
                               "read " + path + " at offset " + std::to_string(offset + done));
    }
    if (r == 0) break;  // end of file
    done += static_cast<size_t>(r);
  }
  if (done < buf.size()) std::memset(buf.data() + done, 0, buf.size() - done);
  return Status::Ok();
}

class LinuxDiskReader final : public DiskReader {
 public:
  // An image file (which may have holes) is read without the kernel's readahead; WillRead
  // asks for its data ranges instead (see DiskReader::WillRead). A block device has no holes
  // and keeps the kernel's readahead.
  LinuxDiskReader(std::string path, Fd fd, uint64_t size, bool block_device)
      : path_(std::move(path)), fd_(std::move(fd)), size_(size), block_device_(block_device) {
    if (!block_device_) (void)::posix_fadvise(fd_.get(), 0, 0, POSIX_FADV_RANDOM);
  }

  const std::string& path() const override { return path_; }
  uint64_t size() const override { return size_; }
  bool is_block_device() const override { return block_device_; }

  Status ReadAt(uint64_t offset, std::span<std::byte> buf) override {
    return ReadAllAt(fd_.get(), buf, offset, path_);
  }

  Result<std::optional<ByteRange>> NextData(uint64_t offset) override {
    if (offset >= size_) return std::optional<ByteRange>();
    if (block_device_) return std::optional<ByteRange>(ByteRange{offset, size_});
    off_t data = ::lseek(fd_.get(), static_cast<off_t>(offset), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) return std::optional<ByteRange>();  // only a hole follows
      if (errno == EINVAL || errno == EOPNOTSUPP)
        return std::optional<ByteRange>(ByteRange{offset, size_});
      return Status::FromErrno(errno, "seek data in " + path_);
    }
    off_t hole = ::lseek(fd_.get(), data, SEEK_HOLE);
    if (hole < 0) return Status::FromErrno(errno, "seek hole in " + path_);
    uint64_t end = std::min<uint64_t>(static_cast<uint64_t>(hole), size_);
    if (static_cast<uint64_t>(data) >= end) return std::optional<ByteRange>();
    return std::optional<ByteRange>(ByteRange{static_cast<uint64_t>(data), end});
  }

  Result<FileIdentity> Identity() override { return IdentityOf(fd_.get(), path_); }

  void WillRead(uint64_t offset, uint64_t length) override {
    if (!block_device_ && length > 0)
      (void)::posix_fadvise(fd_.get(), static_cast<off_t>(offset), static_cast<off_t>(length),
                            POSIX_FADV_WILLNEED);
  }

 private:
  std::string path_;
  Fd fd_;
  uint64_t size_;
  bool block_device_;
};

class LinuxDiskWriter final : public DiskWriter {
 public:
  // Also opens the target a second time with O_DIRECT for aligned writes: large direct writes
  // run at about twice the speed of buffered writes plus fsync (docs/PERFORMANCE.md). Where
  // the filesystem refuses O_DIRECT (tmpfs), every write is buffered.
  LinuxDiskWriter(std::string path, Fd fd, uint64_t size, bool zeroed)
      : path_(std::move(path)), fd_(std::move(fd)), size_(size), zeroed_(zeroed) {
    direct_fd_ = Fd(::open(path_.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC));
    direct_ok_ = direct_fd_.valid();
  }
  uint64_t size() const override { return size_; }
  bool starts_zeroed() const override { return zeroed_; }
  Status WriteAt(uint64_t offset, std::span<const std::byte> data) override {
    const auto* p = reinterpret_cast<const char*>(data.data());
    const bool aligned = offset % kDirectAlignment == 0 && data.size() % kDirectAlignment == 0 &&
                         reinterpret_cast<uintptr_t>(p) % kDirectAlignment == 0;
    if (aligned && direct_ok_.load(std::memory_order_relaxed)) {
      ssize_t w = ::pwrite(direct_fd_.get(), p, data.size(), static_cast<off_t>(offset));
      if (w == static_cast<ssize_t>(data.size())) return Status::Ok();
      const int err = w < 0 ? errno : 0;
      if (err != 0 && err != EINVAL && err != EINTR)
        return Status::FromErrno(err, "write " + path_);
      // EINVAL (a filesystem without direct I/O) or a short write: buffered from now on. In
      // every case the buffered write below rewrites the whole range.
      if (err != EINTR) direct_ok_ = false;
    }
    const int err = PwriteAll(fd_.get(), p, data.size(), offset);
    return err == 0 ? Status::Ok() : Status::FromErrno(err, "write " + path_);
  }
  bool PunchHole(uint64_t offset, uint64_t length) override {
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
    return ::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       static_cast<off_t>(offset), static_cast<off_t>(length)) == 0;
  }
  Status Sync() override {
    if (::fsync(fd_.get()) != 0) return Status::FromErrno(errno, "fsync " + path_);
    return Status::Ok();
  }

 private:
  std::string path_;
  Fd fd_;
  Fd direct_fd_;
  std::atomic<bool> direct_ok_{false};
  uint64_t size_;
  bool zeroed_;
};

Status SyncDirectory(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return Status::FromErrno(errno, "open directory " + path);
  if (::fsync(fd.get()) != 0) return Status::FromErrno(errno, "fsync directory " + path);
  return Status::Ok();
}

class LinuxScratchFile final : public ScratchFile {
 public:
  LinuxScratchFile(const std::string& dir, Fd fd)
      : what_("scratch file in " + dir), fd_(std::move(fd)) {}
  Status WriteAt(uint64_t offset, std::span<const std::byte> data) override {
    return WriteAll(fd_.get(), reinterpret_cast<const char*>(data.data()), data.size(), offset,
                    what_);
  }
  Status ReadAt(uint64_t offset, std::span<std::byte> data) override {
    return ReadAllAt(fd_.get(), data, offset, what_);
  }

 private:
  std::string what_;
  Fd fd_;
};

class LinuxAtomicFileWriter final : public AtomicFileWriter {
 public:
  LinuxAtomicFileWriter(std::string path, std::string tmp, Fd fd, int mode)
      : path_(std::move(path)), tmp_(std::move(tmp)), fd_(std::move(fd)), mode_(mode) {}
  ~LinuxAtomicFileWriter() override {
    if (!committed_) {
      fd_.Reset();
      ::unlink(tmp_.c_str());
    }
  }
  Status Append(std::string_view data) override {
    VMSNAP_RETURN_IF_ERROR(WriteAll(fd_.get(), data.data(), data.size(), offset_, tmp_));
    offset_ += data.size();
    return Status::Ok();
  }
  Status Commit() override {
    if (::fchmod(fd_.get(), static_cast<mode_t>(mode_)) != 0)
      return Status::FromErrno(errno, "chmod " + tmp_);
    if (::fsync(fd_.get()) != 0) return Status::FromErrno(errno, "fsync " + tmp_);
    fd_.Reset();
    if (::rename(tmp_.c_str(), path_.c_str()) != 0)
      return Status::FromErrno(errno, "rename " + tmp_ + " to " + path_);
    committed_ = true;
    const auto parent = std::filesystem::path(path_).parent_path();
    return SyncDirectory(parent.empty() ? "." : parent.string());
  }

 private:
  std::string path_, tmp_;
  Fd fd_;
  int mode_;
  uint64_t offset_ = 0;
  bool committed_ = false;
};

class LinuxEnv final : public Env {
 public:
  Result<std::unique_ptr<DiskReader>> OpenDiskForRead(const std::string& path) override {
    Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) {
      int err = errno;
      if (err == ENOENT)
        return Status::NotFound("disk " + path + " does not exist",
                                "pass the path of an existing block device or image file");
      return Status::FromErrno(err, "open disk " + path,
                               "check the path and that the agent runs as root");
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return Status::FromErrno(errno, "stat " + path);
    bool blk = S_ISBLK(st.st_mode);
    if (!blk && !S_ISREG(st.st_mode))
      return Status::InvalidArgument(path + " is neither a block device nor a regular file",
                                     "pass a disk device (e.g. /dev/vdb) or a disk image file");
    auto id = IdentityOf(fd.get(), path);
    if (!id.ok()) return id.take_status();
    return std::unique_ptr<DiskReader>(
        std::make_unique<LinuxDiskReader>(path, std::move(fd), id->size, blk));
  }

  Result<std::unique_ptr<DiskWriter>> OpenDiskForWrite(const std::string& path,
                                                       uint64_t size) override {
    Fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    if (!fd.valid()) return Status::FromErrno(errno, "open restore target " + path);
    auto id = IdentityOf(fd.get(), path);
    if (!id.ok()) return id.take_status();
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return Status::FromErrno(errno, "stat " + path);
    bool blk = S_ISBLK(st.st_mode);
    if (!blk && !S_ISREG(st.st_mode))
      return Status::InvalidArgument("restore target " + path +
                                     " is neither a block device nor a regular file");
    if (!blk && id->size == 0) {
      if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
        return Status::FromErrno(errno, "size restore target " + path,
                                 "free space on the target filesystem");
      return std::unique_ptr<DiskWriter>(
          std::make_unique<LinuxDiskWriter>(path, std::move(fd), size, true));
    }
    if (id->size < size) return RestoreTargetTooSmall(path, id->size, size);
    return std::unique_ptr<DiskWriter>(
        std::make_unique<LinuxDiskWriter>(path, std::move(fd), id->size, false));
  }

  Status WriteFileUnsynced(const std::string& path, std::string_view data, int mode) override {
    Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode));
    if (!fd.valid()) return Status::FromErrno(errno, "create " + path);
    return WriteAll(fd.get(), data.data(), data.size(), 0, path);
  }

  Result<std::unique_ptr<AtomicFileWriter>> CreateFileAtomic(const std::string& path,
                                                             int mode) override {
    thread_local std::mt19937_64 rng(std::random_device{}());
    std::string tmp = path + ".tmp." + std::to_string(rng());
    Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode));
    if (!fd.valid()) return Status::FromErrno(errno, "create " + tmp);
    return std::unique_ptr<AtomicFileWriter>(
        std::make_unique<LinuxAtomicFileWriter>(path, std::move(tmp), std::move(fd), mode));
  }

  Result<std::unique_ptr<ScratchFile>> CreateScratchFile(const std::string& dir) override {
    Fd fd(::open(dir.c_str(), O_RDWR | O_TMPFILE | O_CLOEXEC, 0600));
    if (!fd.valid() && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
      // A filesystem without O_TMPFILE: a unique name, unlinked at once.
      std::string name = dir + "/.vmsnap-scratch-XXXXXX";
      fd = Fd(::mkostemp(name.data(), O_CLOEXEC));
      if (fd.valid()) ::unlink(name.c_str());
    }
    if (!fd.valid())
      return Status::FromErrno(errno, "create a scratch file in " + dir,
                               "make the directory writable, or free space on its filesystem");
    return std::unique_ptr<ScratchFile>(std::make_unique<LinuxScratchFile>(dir, std::move(fd)));
  }

  Status SyncFilesystem(const std::string& path) override {
    Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) return Status::FromErrno(errno, "open " + path);
    if (::syncfs(fd.get()) != 0) return Status::FromErrno(errno, "syncfs " + path);
    return Status::Ok();
  }

  Status SyncDir(const std::string& path) override { return SyncDirectory(path); }

  Result<std::string> ReadFile(const std::string& path) override {
    Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) {
      int err = errno;
      if (err == ENOENT) return Status::NotFound(path + " does not exist");
      return Status::FromErrno(err, "open " + path);
    }
    std::string out;
    char buf[65536];
    for (;;) {
      ssize_t r = ::read(fd.get(), buf, sizeof buf);
      if (r < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "read " + path);
      }
      if (r == 0) break;
      out.append(buf, static_cast<size_t>(r));
    }
    return out;
  }

  Result<StorageInfo> StorageOf(const std::string& path) override {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      if (errno == ENOENT) return Status::NotFound(path + " does not exist");
      return Status::FromErrno(errno, "stat " + path);
    }
    StorageInfo info;
    info.filesystem = static_cast<uint64_t>(st.st_dev);
    info.regular_file = S_ISREG(st.st_mode);
    info.allocated_bytes = static_cast<uint64_t>(st.st_blocks) * 512;  // POSIX: 512-byte units
    return info;
  }

  std::vector<std::string> LocalDisks() override {
    std::vector<std::string> out;
    std::error_code ec;
    for (auto it = std::filesystem::directory_iterator("/sys/block", ec);
         !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
      std::string name = it->path().filename().string();
      for (const char* skip : {"loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd"})
        if (name.rfind(skip, 0) == 0) name.clear();
      if (name.empty()) continue;
      auto size = ReadFile(it->path().string() + "/size");
      if (!size.ok() || std::atoll(size->c_str()) == 0) continue;
      out.push_back("/dev/" + name);
    }
    std::sort(out.begin(), out.end());
    return out;
  }

  std::string HostName() override {
    char buf[256] = {};
    if (::gethostname(buf, sizeof buf - 1) != 0) return "localhost";
    return buf;
  }
};

}  // namespace

std::vector<std::string> CommandLineArguments(int argc, char** argv) {
  return std::vector<std::string>(argv, argv + argc);
}

void TuneAllocatorForLargeBuffers() {
#ifdef __GLIBC__
  // Fixed values also turn off glibc's dynamic threshold, which would otherwise start at
  // 128 KiB and hand every upload batch a fresh mapping until the first one is freed.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 32 << 20);
#endif
}

uint64_t PeakResidentBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtoull(line.c_str() + 6, nullptr, 10) * 1024;
  return 0;
}

const AgentPaths& DefaultAgentPaths() {
  static const AgentPaths paths{"/etc/vmsnap/agent.json", "/var/lib/vmsnap", "/etc/vmsnap/hooks.d",
                                "/run/vmsnap", "/etc/azure/VMSnapshotScriptPluginConfig.json"};
  return paths;
}

Env* Env::Default() {
  static LinuxEnv env;
  return &env;
}

}  // namespace vmsnap::platform

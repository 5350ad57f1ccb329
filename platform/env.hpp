// The platform interface: everything OS-specific that the agent and the vault need for disks
// and durable files, in the spirit of leveldb's Env. Exactly one implementation is compiled:
// platform/linux/env.cpp or platform/windows/env.cpp (chosen once in cmake/Settings.cmake).
//
// No OS header is included here. Paths are UTF-8 strings. Every function returns a Status or
// Result; none throws. All functions are thread-safe unless a comment says otherwise.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.hpp"

namespace vmsnap::platform {

// What the OS says about a file or device at one moment. Two equal identities taken before
// and after a read prove (as far as the OS can tell) that nothing wrote the file in between:
// every write updates the change time with nanosecond resolution.
struct FileIdentity {
  uint64_t device = 0;
  uint64_t inode = 0;
  uint64_t size = 0;
  int64_t mtime_ns = 0;
  int64_t ctime_ns = 0;
  bool operator==(const FileIdentity&) const = default;
};

// Where an existing path's bytes are stored (the restore's space check).
struct StorageInfo {
  // Equal for two paths on the same filesystem (volume) while it stays mounted.
  uint64_t filesystem = 0;
  // An existing regular file (not a device or directory), and the bytes its filesystem has
  // allocated to it: less than its size where it is sparse.
  bool regular_file = false;
  uint64_t allocated_bytes = 0;
};

// A half-open byte range [begin, end).
struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;
};

// A disk opened for reading: a block device or a (possibly sparse) disk image file.
// Owns its descriptor; closes it on destruction. ReadAt and NextData may be called from
// several threads at once (positional reads, no shared offset).
class DiskReader {
 public:
  virtual ~DiskReader() = default;
  virtual const std::string& path() const = 0;
  virtual uint64_t size() const = 0;
  virtual bool is_block_device() const = 0;
  // Reads buf.size() bytes at offset. Bytes past the end of the disk read as zero.
  virtual Status ReadAt(uint64_t offset, std::span<std::byte> buf) = 0;
  // The first range holding data at or after offset, or nullopt when only holes follow.
  // Devices and filesystems without hole reporting return [offset, size).
  virtual Result<std::optional<ByteRange>> NextData(uint64_t offset) = 0;
  // The current identity of the underlying file or device.
  virtual Result<FileIdentity> Identity() = 0;
  // A hint that [offset, offset + length) is read soon, so the system may start reading it
  // now. Callers pass data ranges from NextData: on Linux an image file is opened without the
  // kernel's own readahead, which would run past a data range into the hole after it (the
  // kernel zeroes a page cache page for every page of hole it reads ahead), and this hint
  // (posix_fadvise WILLNEED) reads ahead exactly the data instead. Never fails; a no-op by
  // default. Thread-safe.
  virtual void WillRead(uint64_t offset, uint64_t length) {
    (void)offset;
    (void)length;
  }
};

// A restore target opened for writing. WriteAt may be called from several threads at once
// for disjoint ranges. Sync makes everything written durable. A failed WriteAt or Sync is
// kResourceExhausted when the target's filesystem is full (or its quota is), kIoError (or
// kPermissionDenied...) otherwise; its cause names the target, and it carries no fix: the
// caller says what to do.
class DiskWriter {
 public:
  virtual ~DiskWriter() = default;
  virtual uint64_t size() const = 0;
  // True when the target was created empty by OpenDiskForWrite: unwritten ranges read as
  // zero, so zero blocks need not be written.
  virtual bool starts_zeroed() const = 0;
  // Thread-safe (positioned writes). A write whose offset, length and buffer address are all
  // multiples of kDirectAlignment may bypass the page cache (Linux: O_DIRECT, when the
  // filesystem supports it): callers that write much pass large aligned runs. Sync() makes
  // every write durable either way.
  virtual Status WriteAt(uint64_t offset, std::span<const std::byte> data) = 0;
  // Makes [offset, offset + length) read as zeros by giving its space back, where the target
  // can (Linux: a regular file on a filesystem with hole punching). Returns false where it
  // cannot (devices, Windows, other filesystems): the caller then writes zeros. Thread-safe.
  virtual bool PunchHole(uint64_t offset, uint64_t length) = 0;
  virtual Status Sync() = 0;
  static constexpr size_t kDirectAlignment = 4096;
};

// A temporary file for data too large to hold in memory (the agent's block hashes and manifest
// entries during a backup: 16 B per block of the disk and 57 B per changed block). It has no
// name that outlives it: Linux creates it with O_TMPFILE (or unlinks it at once), Windows
// deletes it when its handle closes, so even a killed agent leaves nothing behind on Linux.
// ReadAt and WriteAt are positioned and may be called from several threads at once for
// disjoint ranges; bytes never written (holes, beyond the end) read as zero.
class ScratchFile {
 public:
  virtual ~ScratchFile() = default;
  virtual Status WriteAt(uint64_t offset, std::span<const std::byte> data) = 0;
  virtual Status ReadAt(uint64_t offset, std::span<std::byte> data) = 0;
};

// A file written in pieces and then published at its path atomically, like WriteFileAtomic:
// a temporary name in the same directory, flushed, renamed over the path, directory synced.
// One thread at a time. Destroyed before Commit() (or after a failed one), it removes its
// temporary file and the path keeps its old content.
class AtomicFileWriter {
 public:
  virtual ~AtomicFileWriter() = default;
  // Appends at the end of what was written so far.
  virtual Status Append(std::string_view data) = 0;
  // Flushes, renames over the path and makes the rename durable. Call once.
  virtual Status Commit() = 0;
};

// The error OpenDiskForWrite returns on every platform when an existing target (a device, or a
// file that is not empty) holds fewer bytes than the disk to restore.
inline Status RestoreTargetTooSmall(const std::string& path, uint64_t have, uint64_t need) {
  return Status::InvalidArgument("restore target " + path +
                                     " is too small: " + std::to_string(have) +
                                     " bytes, the disk needs " + std::to_string(need) + " bytes",
                                 "restore to a device or file of at least " + std::to_string(need) +
                                     " bytes, or to a new file path");
}

// Where the agent keeps its files by default on this platform.
struct AgentPaths {
  std::string config_file;  // Linux /etc/vmsnap/agent.json; Windows %ProgramData%\vmsnap\agent.json
  std::string state_dir;    // /var/lib/vmsnap; %ProgramData%\vmsnap\state
  std::string hooks_dir;    // /etc/vmsnap/hooks.d; %ProgramData%\vmsnap\hooks.d
  std::string runtime_dir;  // /run/vmsnap; %ProgramData%\vmsnap\run
  std::string azure_config;  // /etc/azure/VMSnapshotScriptPluginConfig.json; "" (Linux only)
};
// Computed once (Windows: the ProgramData known folder, default C:\ProgramData); thread-safe.
const AgentPaths& DefaultAgentPaths();

// The program's arguments as UTF-8, argv[0] first. Linux: argv as given. Windows: from the
// UTF-16 command line (main's argv there is in the ANSI code page, which loses characters).
std::vector<std::string> CommandLineArguments(int argc, char** argv);

// Makes the heap keep freed memory for reuse instead of returning it to the kernel at once:
// the agent and the vault allocate and free multi-MiB buffers per batch and request, and a
// fresh mapping each time costs a page fault per 4 KiB page (on virtualised machines the
// largest part of their system time). Call once at the start of main, before other threads
// exist. Linux (glibc): blocks up to 32 MiB come from the heap, which is trimmed only above
// 32 MiB free at its top (larger values kept too much: restore RSS 249 instead of 140-190 MiB).
// Windows: nothing (its heap already keeps freed blocks).
void TuneAllocatorForLargeBuffers();

// The largest resident memory of this process so far, in bytes (Linux: VmHWM of
// /proc/self/status, which unlike getrusage's ru_maxrss does not include the memory of the
// process that spawned it before exec; Windows: the peak working set). 0 if unknown.
uint64_t PeakResidentBytes();

class Env {
 public:
  virtual ~Env() = default;

  // The process-wide Env of this platform. Never null; lives until exit.
  static Env* Default();

  virtual Result<std::unique_ptr<DiskReader>> OpenDiskForRead(const std::string& path) = 0;

  // Opens `path` for restore. An existing block device or non-empty file must be at least
  // `size` bytes (else kInvalidArgument naming both sizes). A missing or empty regular file
  // is created/extended sparse to exactly `size` bytes and reports starts_zeroed().
  virtual Result<std::unique_ptr<DiskWriter>> OpenDiskForWrite(const std::string& path,
                                                               uint64_t size) = 0;

  // Writes data to `path` durably: a temporary name in the same directory, fsync, rename
  // over `path`, fsync of the directory. A crash leaves either the old or the new content.
  Status WriteFileAtomic(const std::string& path, std::string_view data, int mode = 0644) {
    auto writer = CreateFileAtomic(path, mode);
    if (!writer.ok()) return writer.take_status();
    Status st = (*writer)->Append(data);
    return st.ok() ? (*writer)->Commit() : st;
  }

  // The same for content produced in pieces (see AtomicFileWriter). `mode` as for open(2);
  // Windows: a mode without group/other bits gets a DACL for SYSTEM, Administrators and the
  // owner only.
  virtual Result<std::unique_ptr<AtomicFileWriter>> CreateFileAtomic(const std::string& path,
                                                                     int mode = 0644) = 0;

  // A ScratchFile in directory `dir` (which must exist).
  virtual Result<std::unique_ptr<ScratchFile>> CreateScratchFile(const std::string& dir) = 0;

  // Writes data to `path` without syncing (the caller batches durability with
  // SyncFilesystem). Creates or truncates.
  virtual Status WriteFileUnsynced(const std::string& path, std::string_view data,
                                   int mode = 0644) = 0;

  // Flushes every dirty page and directory entry of the filesystem holding `path`.
  virtual Status SyncFilesystem(const std::string& path) = 0;

  // fsync of a directory, making renames/creations inside it durable.
  virtual Status SyncDir(const std::string& path) = 0;

  virtual Result<std::string> ReadFile(const std::string& path) = 0;

  // StorageInfo of an existing file, device or directory; kNotFound when `path` does not
  // exist. Linux: stat(2) (the device number, st_blocks); Windows: the volume's serial number
  // and GetCompressedFileSize.
  virtual Result<StorageInfo> StorageOf(const std::string& path) = 0;

  virtual std::string HostName() = 0;

  // The machine's local whole disks (e.g. /dev/vda, /dev/nvme0n1): no partitions, loop, RAM,
  // optical or device-mapper devices. The default set an enrolled agent protects.
  virtual std::vector<std::string> LocalDisks() = 0;
};

}  // namespace vmsnap::platform

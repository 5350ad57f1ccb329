// Windows implementation of platform/env.hpp (and of the helpers in win_util.hpp).
//
// Paths are UTF-8 and converted to UTF-16 for the W functions. Disks are image files or
// devices (\\.\PhysicalDriveN, \\.\C:, a shadow copy device); reads and writes are positioned
// (OVERLAPPED offsets on synchronous handles), so several threads may use one handle at once.
#include "platform/env.hpp"

#include <windows.h>
// after windows.h
#include <knownfolders.h>
#include <psapi.h>
#include <sddl.h>
#include <shellapi.h>
#include <shlobj.h>
#include <winioctl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <random>

#include "platform/windows/win_util.hpp"

namespace vmsnap::platform {

// ---------------------------------------------------------------------------------------------
// win_util.hpp

namespace win {

std::wstring Widen(const std::string& utf8) {
  if (utf8.empty()) return {};
  int n = ::MultiByteToWideChar(CP_UTF8, 0, utf8.data(), static_cast<int>(utf8.size()), nullptr, 0);
  std::wstring out(static_cast<size_t>(n), L'\0');
  ::MultiByteToWideChar(CP_UTF8, 0, utf8.data(), static_cast<int>(utf8.size()), out.data(), n);
  return out;
}

std::string Narrow(const std::wstring& utf16) {
  if (utf16.empty()) return {};
  int n = ::WideCharToMultiByte(CP_UTF8, 0, utf16.data(), static_cast<int>(utf16.size()), nullptr,
                                0, nullptr, nullptr);
  std::string out(static_cast<size_t>(n), '\0');
  ::WideCharToMultiByte(CP_UTF8, 0, utf16.data(), static_cast<int>(utf16.size()), out.data(), n,
                        nullptr, nullptr);
  return out;
}

std::string ErrorText(DWORD error) {
  wchar_t* buf = nullptr;
  DWORD n = ::FormatMessageW(
      FORMAT_MESSAGE_ALLOCATE_BUFFER | FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS,
      nullptr, error, 0, reinterpret_cast<wchar_t*>(&buf), 0, nullptr);
  std::string text;
  if (n > 0 && buf != nullptr) text = Narrow(std::wstring(buf, n));
  if (buf != nullptr) ::LocalFree(buf);
  while (!text.empty() &&
         (text.back() == '\n' || text.back() == '\r' || text.back() == ' ' || text.back() == '.'))
    text.pop_back();
  if (text.empty()) text = "Windows error";
  return text + " (error " + std::to_string(error) + ")";
}

Status FromWin32(DWORD error, const std::string& what, std::string fix) {
  Code code = Code::kIoError;
  switch (error) {
    case ERROR_FILE_NOT_FOUND:
    case ERROR_PATH_NOT_FOUND:
    case ERROR_INVALID_DRIVE:
    case ERROR_BAD_NETPATH:
      code = Code::kNotFound;
      break;
    case ERROR_ACCESS_DENIED:
    case ERROR_PRIVILEGE_NOT_HELD:
      code = Code::kPermissionDenied;
      break;
    case ERROR_SHARING_VIOLATION:
    case ERROR_LOCK_VIOLATION:
      code = Code::kUnavailable;
      break;
    case ERROR_FILE_EXISTS:
    case ERROR_ALREADY_EXISTS:
      code = Code::kAlreadyExists;
      break;
    case ERROR_DISK_FULL:
    case ERROR_HANDLE_DISK_FULL:
      code = Code::kResourceExhausted;
      break;
    default:
      break;
  }
  return Status::Error(code, what + ": " + ErrorText(error), std::move(fix));
}

}  // namespace win

namespace {

using win::FromWin32;
using win::Handle;
using win::Widen;

// 100 ns ticks since 1601-01-01 -> ns since 1970-01-01.
int64_t FileTimeToUnixNs(int64_t ticks) {
  return (ticks - 116444736000000000LL) * 100;
}

// \\.\PhysicalDriveN, \\.\C:, \\?\GLOBALROOT\Device\HarddiskVolumeShadowCopyN, ...: a device,
// not a file. "\\?\C:\dir\file" is a file.
bool IsDevicePath(const std::string& path) {
  if (path.rfind("\\\\.\\", 0) == 0) return true;
  return path.rfind("\\\\?\\GLOBALROOT\\", 0) == 0;
}

Result<uint64_t> DeviceSize(HANDLE h, const std::string& path) {
  GET_LENGTH_INFORMATION info{};
  DWORD got = 0;
  if (!::DeviceIoControl(h, IOCTL_DISK_GET_LENGTH_INFO, nullptr, 0, &info, sizeof info, &got,
                         nullptr))
    return FromWin32(::GetLastError(), "size of device " + path,
                     "pass a disk (\\\\.\\PhysicalDriveN) or volume (\\\\.\\C:) device");
  return static_cast<uint64_t>(info.Length.QuadPart);
}

Result<FileIdentity> IdentityOf(HANDLE h, const std::string& path, bool device) {
  FileIdentity id;
  if (device) {
    auto size = DeviceSize(h, path);
    if (!size.ok()) return size.take_status();
    id.size = *size;
    return id;  // devices have no file index or times; the size is all there is
  }
  BY_HANDLE_FILE_INFORMATION info{};
  if (!::GetFileInformationByHandle(h, &info))
    return FromWin32(::GetLastError(), "file information of " + path);
  FILE_BASIC_INFO basic{};
  if (!::GetFileInformationByHandleEx(h, FileBasicInfo, &basic, sizeof basic))
    return FromWin32(::GetLastError(), "times of " + path);
  id.device = info.dwVolumeSerialNumber;
  id.inode = (static_cast<uint64_t>(info.nFileIndexHigh) << 32) | info.nFileIndexLow;
  id.size = (static_cast<uint64_t>(info.nFileSizeHigh) << 32) | info.nFileSizeLow;
  id.mtime_ns = FileTimeToUnixNs(basic.LastWriteTime.QuadPart);
  id.ctime_ns = FileTimeToUnixNs(basic.ChangeTime.QuadPart);
  return id;
}

OVERLAPPED At(uint64_t offset) {
  OVERLAPPED ov{};
  ov.Offset = static_cast<DWORD>(offset & 0xffffffffu);
  ov.OffsetHigh = static_cast<DWORD>(offset >> 32);
  return ov;
}

constexpr size_t kMaxIo = 1u << 30;  // one ReadFile/WriteFile moves at most this much

Status WriteAll(HANDLE h, const char* p, size_t n, uint64_t offset, const std::string& path) {
  while (n > 0) {
    OVERLAPPED ov = At(offset);
    DWORD wrote = 0;
    if (!::WriteFile(h, p, static_cast<DWORD>(std::min(n, kMaxIo)), &wrote, &ov))
      return FromWin32(::GetLastError(), "write " + path + " at offset " + std::to_string(offset));
    if (wrote == 0) return Status::IoError("write " + path + ": no progress");
    p += wrote;
    n -= wrote;
    offset += wrote;
  }
  return Status::Ok();
}

class WindowsDiskReader final : public DiskReader {
 public:
  WindowsDiskReader(std::string path, Handle h, uint64_t size, bool device)
      : path_(std::move(path)), h_(std::move(h)), size_(size), device_(device) {}

  const std::string& path() const override { return path_; }
  uint64_t size() const override { return size_; }
  bool is_block_device() const override { return device_; }

  Status ReadAt(uint64_t offset, std::span<std::byte> buf) override {
    size_t done = 0;
    while (done < buf.size() && offset + done < size_) {
      OVERLAPPED ov = At(offset + done);
      DWORD got = 0;
      const size_t want = std::min<uint64_t>({buf.size() - done, kMaxIo, size_ - (offset + done)});
      if (!::ReadFile(h_.get(), buf.data() + done, static_cast<DWORD>(want), &got, &ov)) {
        DWORD err = ::GetLastError();
        if (err == ERROR_HANDLE_EOF) break;
        return FromWin32(err, "read " + path_ + " at offset " + std::to_string(offset + done));
      }
      if (got == 0) break;  // end of file
      done += got;
    }
    if (done < buf.size()) std::memset(buf.data() + done, 0, buf.size() - done);
    return Status::Ok();
  }

  Result<std::optional<ByteRange>> NextData(uint64_t offset) override {
    if (offset >= size_) return std::optional<ByteRange>();
    if (device_ || !ranges_supported_.load())
      return std::optional<ByteRange>(ByteRange{offset, size_});
    FILE_ALLOCATED_RANGE_BUFFER query{};
    query.FileOffset.QuadPart = static_cast<LONGLONG>(offset);
    query.Length.QuadPart = static_cast<LONGLONG>(size_ - offset);
    FILE_ALLOCATED_RANGE_BUFFER ranges[16];
    DWORD got = 0;
    if (!::DeviceIoControl(h_.get(), FSCTL_QUERY_ALLOCATED_RANGES, &query, sizeof query, ranges,
                           sizeof ranges, &got, nullptr)) {
      DWORD err = ::GetLastError();
      if (err != ERROR_MORE_DATA) {
        // No hole reporting on this filesystem (FAT, some network shares): all data.
        if (err == ERROR_INVALID_FUNCTION || err == ERROR_NOT_SUPPORTED ||
            err == ERROR_INVALID_PARAMETER) {
          ranges_supported_ = false;
          return std::optional<ByteRange>(ByteRange{offset, size_});
        }
        return FromWin32(err, "query allocated ranges of " + path_);
      }
    }
    const size_t n = got / sizeof(FILE_ALLOCATED_RANGE_BUFFER);
    for (size_t i = 0; i < n; ++i) {
      const uint64_t begin = static_cast<uint64_t>(ranges[i].FileOffset.QuadPart);
      const uint64_t end = std::min<uint64_t>(begin + ranges[i].Length.QuadPart, size_);
      if (end <= offset || begin >= end) continue;
      return std::optional<ByteRange>(ByteRange{std::max(begin, offset), end});
    }
    return std::optional<ByteRange>();  // only holes follow
  }

  Result<FileIdentity> Identity() override { return IdentityOf(h_.get(), path_, device_); }

 private:
  std::string path_;
  Handle h_;
  uint64_t size_;
  bool device_;
  std::atomic<bool> ranges_supported_{true};
};

class WindowsDiskWriter final : public DiskWriter {
 public:
  WindowsDiskWriter(std::string path, Handle h, uint64_t size, bool zeroed)
      : path_(std::move(path)), h_(std::move(h)), size_(size), zeroed_(zeroed) {}
  uint64_t size() const override { return size_; }
  bool starts_zeroed() const override { return zeroed_; }
  Status WriteAt(uint64_t offset, std::span<const std::byte> data) override {
    return WriteAll(h_.get(), reinterpret_cast<const char*>(data.data()), data.size(), offset,
                    path_);
  }
  bool PunchHole(uint64_t, uint64_t) override { return false; }  // zeros are written instead
  Status Sync() override {
    if (!::FlushFileBuffers(h_.get())) return FromWin32(::GetLastError(), "flush " + path_);
    return Status::Ok();
  }

 private:
  std::string path_;
  Handle h_;
  uint64_t size_;
  bool zeroed_;
};

// Positioned reads that zero-fill what lies beyond the end of the file.
Status ReadAllAt(HANDLE h, std::span<std::byte> buf, uint64_t offset, const std::string& path) {
  size_t done = 0;
  while (done < buf.size()) {
    OVERLAPPED ov = At(offset + done);
    DWORD got = 0;
    const size_t want = std::min<uint64_t>(buf.size() - done, kMaxIo);
    if (!::ReadFile(h, buf.data() + done, static_cast<DWORD>(want), &got, &ov)) {
      DWORD err = ::GetLastError();
      if (err == ERROR_HANDLE_EOF) break;
      return FromWin32(err, "read " + path + " at offset " + std::to_string(offset + done));
    }
    if (got == 0) break;  // end of file
    done += got;
  }
  if (done < buf.size()) std::memset(buf.data() + done, 0, buf.size() - done);
  return Status::Ok();
}

class WindowsScratchFile final : public ScratchFile {
 public:
  WindowsScratchFile(std::string name, Handle h) : name_(std::move(name)), h_(std::move(h)) {}
  Status WriteAt(uint64_t offset, std::span<const std::byte> data) override {
    return WriteAll(h_.get(), reinterpret_cast<const char*>(data.data()), data.size(), offset,
                    name_);
  }
  Status ReadAt(uint64_t offset, std::span<std::byte> data) override {
    return ReadAllAt(h_.get(), data, offset, name_);
  }

 private:
  std::string name_;
  Handle h_;
};

class WindowsAtomicFileWriter final : public AtomicFileWriter {
 public:
  WindowsAtomicFileWriter(std::string path, std::string tmp, Handle h)
      : path_(std::move(path)), tmp_(std::move(tmp)), h_(std::move(h)) {}
  ~WindowsAtomicFileWriter() override {
    if (!committed_) {
      h_.Reset();
      ::DeleteFileW(Widen(tmp_).c_str());
    }
  }
  Status Append(std::string_view data) override {
    VMSNAP_RETURN_IF_ERROR(WriteAll(h_.get(), data.data(), data.size(), offset_, tmp_));
    offset_ += data.size();
    return Status::Ok();
  }
  Status Commit() override {
    if (!::FlushFileBuffers(h_.get())) return FromWin32(::GetLastError(), "flush " + tmp_);
    h_.Reset();
    if (!::MoveFileExW(Widen(tmp_).c_str(), Widen(path_).c_str(),
                       MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH))
      return FromWin32(::GetLastError(), "rename " + tmp_ + " to " + path_);
    committed_ = true;
    return Status::Ok();
  }

 private:
  std::string path_, tmp_;
  Handle h_;
  uint64_t offset_ = 0;
  bool committed_ = false;
};

// Files written with a mode without group/other bits (0600: credentials, state) get a
// protected DACL: full control for SYSTEM, Administrators and the file's owner only.
class PrivateSecurity {
 public:
  explicit PrivateSecurity(int mode) {
    if ((mode & 077) != 0) return;
    if (::ConvertStringSecurityDescriptorToSecurityDescriptorW(
            L"D:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;FA;;;OW)", SDDL_REVISION_1, &sd_, nullptr)) {
      sa_.nLength = sizeof sa_;
      sa_.lpSecurityDescriptor = sd_;
      sa_.bInheritHandle = FALSE;
    }
  }
  ~PrivateSecurity() {
    if (sd_ != nullptr) ::LocalFree(sd_);
  }
  PrivateSecurity(const PrivateSecurity&) = delete;
  PrivateSecurity& operator=(const PrivateSecurity&) = delete;
  SECURITY_ATTRIBUTES* get() { return sd_ != nullptr ? &sa_ : nullptr; }

 private:
  PSECURITY_DESCRIPTOR sd_ = nullptr;
  SECURITY_ATTRIBUTES sa_{};
};

class WindowsEnv final : public Env {
 public:
  Result<std::unique_ptr<DiskReader>> OpenDiskForRead(const std::string& path) override {
    const bool device = IsDevicePath(path);
    Handle h(::CreateFileW(Widen(path).c_str(), GENERIC_READ,
                           FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE, nullptr,
                           OPEN_EXISTING, FILE_FLAG_BACKUP_SEMANTICS, nullptr));
    if (!h.valid()) {
      DWORD err = ::GetLastError();
      if (err == ERROR_FILE_NOT_FOUND || err == ERROR_PATH_NOT_FOUND)
        return Status::NotFound("disk " + path + " does not exist",
                                "pass the path of an existing disk (\\\\.\\PhysicalDriveN) or "
                                "image file");
      return FromWin32(err, "open disk " + path,
                       "check the path and that the agent runs as Administrator or SYSTEM");
    }
    if (!device) {
      BY_HANDLE_FILE_INFORMATION info{};
      if (!::GetFileInformationByHandle(h.get(), &info))
        return FromWin32(::GetLastError(), "file information of " + path);
      if (info.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY)
        return Status::InvalidArgument(path + " is neither a disk device nor a regular file",
                                       "pass a disk device (\\\\.\\PhysicalDrive1) or a disk "
                                       "image file");
    }
    auto id = IdentityOf(h.get(), path, device);
    if (!id.ok()) return id.take_status();
    return std::unique_ptr<DiskReader>(
        std::make_unique<WindowsDiskReader>(path, std::move(h), id->size, device));
  }

  Result<std::unique_ptr<DiskWriter>> OpenDiskForWrite(const std::string& path,
                                                       uint64_t size) override {
    const bool device = IsDevicePath(path);
    Handle h(::CreateFileW(Widen(path).c_str(), GENERIC_READ | GENERIC_WRITE,
                           FILE_SHARE_READ | FILE_SHARE_WRITE, nullptr,
                           device ? OPEN_EXISTING : OPEN_ALWAYS, FILE_ATTRIBUTE_NORMAL, nullptr));
    if (!h.valid()) return FromWin32(::GetLastError(), "open restore target " + path);
    if (!device) {
      BY_HANDLE_FILE_INFORMATION info{};
      if (!::GetFileInformationByHandle(h.get(), &info))
        return FromWin32(::GetLastError(), "file information of " + path);
      if (info.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY)
        return Status::InvalidArgument("restore target " + path +
                                       " is neither a disk device nor a regular file");
    }
    auto id = IdentityOf(h.get(), path, device);
    if (!id.ok()) return id.take_status();
    if (!device && id->size == 0) {
      // Sparse where the filesystem can (NTFS): unwritten ranges take no space.
      DWORD ignored = 0;
      (void)::DeviceIoControl(h.get(), FSCTL_SET_SPARSE, nullptr, 0, nullptr, 0, &ignored, nullptr);
      FILE_END_OF_FILE_INFO eof{};
      eof.EndOfFile.QuadPart = static_cast<LONGLONG>(size);
      if (!::SetFileInformationByHandle(h.get(), FileEndOfFileInfo, &eof, sizeof eof))
        return FromWin32(::GetLastError(), "size restore target " + path,
                         "free space on the target volume");
      return std::unique_ptr<DiskWriter>(
          std::make_unique<WindowsDiskWriter>(path, std::move(h), size, true));
    }
    if (id->size < size) return RestoreTargetTooSmall(path, id->size, size);
    return std::unique_ptr<DiskWriter>(
        std::make_unique<WindowsDiskWriter>(path, std::move(h), id->size, false));
  }

  Status WriteFileUnsynced(const std::string& path, std::string_view data, int mode) override {
    PrivateSecurity security(mode);
    Handle h(::CreateFileW(Widen(path).c_str(), GENERIC_WRITE, 0, security.get(), CREATE_ALWAYS,
                           FILE_ATTRIBUTE_NORMAL, nullptr));
    if (!h.valid()) return FromWin32(::GetLastError(), "create " + path);
    return WriteAll(h.get(), data.data(), data.size(), 0, path);
  }

  // Temporary file in the same directory, flushed, then MoveFileExW over `path` with
  // MOVEFILE_WRITE_THROUGH (returns once the rename is on disk; NTFS journals the metadata,
  // there is no directory fsync to do).
  Result<std::unique_ptr<AtomicFileWriter>> CreateFileAtomic(const std::string& path,
                                                             int mode) override {
    thread_local std::mt19937_64 rng(std::random_device{}());
    std::string tmp = path + ".tmp." + std::to_string(rng());
    PrivateSecurity security(mode);
    Handle h(::CreateFileW(Widen(tmp).c_str(), GENERIC_WRITE, 0, security.get(), CREATE_NEW,
                           FILE_ATTRIBUTE_NORMAL, nullptr));
    if (!h.valid()) return FromWin32(::GetLastError(), "create " + tmp);
    return std::unique_ptr<AtomicFileWriter>(
        std::make_unique<WindowsAtomicFileWriter>(path, std::move(tmp), std::move(h)));
  }

  // A unique name in `dir`, opened exclusively with FILE_FLAG_DELETE_ON_CLOSE: the file goes
  // away with its handle (after a crash too, when the process's handles are closed).
  Result<std::unique_ptr<ScratchFile>> CreateScratchFile(const std::string& dir) override {
    thread_local std::mt19937_64 rng(std::random_device{}());
    const std::string name = dir + "\\.vmsnap-scratch-" + std::to_string(rng());
    PrivateSecurity security(0600);
    Handle h(::CreateFileW(Widen(name).c_str(), GENERIC_READ | GENERIC_WRITE, 0, security.get(),
                           CREATE_NEW, FILE_ATTRIBUTE_TEMPORARY | FILE_FLAG_DELETE_ON_CLOSE,
                           nullptr));
    if (!h.valid())
      return FromWin32(::GetLastError(), "create a scratch file in " + dir,
                       "make the directory writable, or free space on its volume");
    return std::unique_ptr<ScratchFile>(std::make_unique<WindowsScratchFile>(name, std::move(h)));
  }

  // Windows has no syncfs for an unprivileged caller; flushing the volume needs
  // Administrator rights. Without them, the files written must be flushed one by one (the
  // agent writes durable files with WriteFileAtomic only).
  Status SyncFilesystem(const std::string& path) override {
    wchar_t volume[MAX_PATH + 1] = {};
    if (!::GetVolumePathNameW(Widen(path).c_str(), volume, MAX_PATH))
      return FromWin32(::GetLastError(), "volume of " + path);
    std::wstring device = L"\\\\.\\" + std::wstring(volume);
    while (!device.empty() && device.back() == L'\\') device.pop_back();
    Handle h(::CreateFileW(device.c_str(), GENERIC_READ | GENERIC_WRITE,
                           FILE_SHARE_READ | FILE_SHARE_WRITE, nullptr, OPEN_EXISTING, 0, nullptr));
    if (!h.valid())
      return FromWin32(::GetLastError(), "open volume of " + path + " to flush it",
                       "run as Administrator or SYSTEM");
    if (!::FlushFileBuffers(h.get())) return FromWin32(::GetLastError(), "flush volume of " + path);
    return Status::Ok();
  }

  // NTFS journals directory entries; renames are made durable by MOVEFILE_WRITE_THROUGH.
  // Checks only that the directory exists.
  Status SyncDir(const std::string& path) override {
    DWORD attrs = ::GetFileAttributesW(Widen(path).c_str());
    if (attrs == INVALID_FILE_ATTRIBUTES)
      return FromWin32(::GetLastError(), "open directory " + path);
    if (!(attrs & FILE_ATTRIBUTE_DIRECTORY))
      return Status::InvalidArgument(path + " is not a directory");
    return Status::Ok();
  }

  Result<std::string> ReadFile(const std::string& path) override {
    Handle h(::CreateFileW(Widen(path).c_str(), GENERIC_READ,
                           FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE, nullptr,
                           OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, nullptr));
    if (!h.valid()) {
      DWORD err = ::GetLastError();
      if (err == ERROR_FILE_NOT_FOUND || err == ERROR_PATH_NOT_FOUND)
        return Status::NotFound(path + " does not exist");
      return FromWin32(err, "open " + path);
    }
    std::string out;
    char buf[65536];
    for (;;) {
      DWORD got = 0;
      if (!::ReadFile(h.get(), buf, sizeof buf, &got, nullptr)) {
        DWORD err = ::GetLastError();
        if (err == ERROR_HANDLE_EOF || err == ERROR_BROKEN_PIPE) break;
        return FromWin32(err, "read " + path);
      }
      if (got == 0) break;
      out.append(buf, got);
    }
    return out;
  }

  Result<StorageInfo> StorageOf(const std::string& path) override {
    const std::wstring wide = Widen(path);
    StorageInfo info;
    if (IsDevicePath(path)) return info;  // a device: no filesystem of its own to share
    const DWORD attrs = ::GetFileAttributesW(wide.c_str());
    if (attrs == INVALID_FILE_ATTRIBUTES) {
      const DWORD err = ::GetLastError();
      if (err == ERROR_FILE_NOT_FOUND || err == ERROR_PATH_NOT_FOUND)
        return Status::NotFound(path + " does not exist");
      return FromWin32(err, "attributes of " + path);
    }
    wchar_t volume[MAX_PATH + 1] = {};
    DWORD serial = 0;
    if (!::GetVolumePathNameW(wide.c_str(), volume, MAX_PATH) ||
        !::GetVolumeInformationW(volume, nullptr, 0, &serial, nullptr, nullptr, nullptr, 0))
      return FromWin32(::GetLastError(), "volume of " + path);
    info.filesystem = serial;
    info.regular_file = !(attrs & FILE_ATTRIBUTE_DIRECTORY);
    if (info.regular_file) {
      DWORD high = 0;
      const DWORD low = ::GetCompressedFileSizeW(wide.c_str(), &high);
      if (low == INVALID_FILE_SIZE && ::GetLastError() != NO_ERROR)
        return FromWin32(::GetLastError(), "allocated size of " + path);
      info.allocated_bytes = (static_cast<uint64_t>(high) << 32) | low;
    }
    return info;
  }

  std::string HostName() override {
    wchar_t buf[256] = {};
    DWORD n = 255;
    if (!::GetComputerNameExW(ComputerNameDnsHostname, buf, &n) || n == 0) return "localhost";
    return win::Narrow(std::wstring(buf, n));
  }

  // \\.\PhysicalDrive0 .. 63 that exist and report a non-zero length. Opening with no access
  // rights needs no privilege; the length query does not either.
  std::vector<std::string> LocalDisks() override {
    std::vector<std::string> out;
    for (int i = 0; i < 64; ++i) {
      const std::string path = "\\\\.\\PhysicalDrive" + std::to_string(i);
      Handle h(::CreateFileW(Widen(path).c_str(), 0, FILE_SHARE_READ | FILE_SHARE_WRITE, nullptr,
                             OPEN_EXISTING, 0, nullptr));
      if (!h.valid()) continue;
      auto size = DeviceSize(h.get(), path);
      if (size.ok() && *size > 0) out.push_back(path);
    }
    return out;
  }
};

}  // namespace

void TuneAllocatorForLargeBuffers() {}  // the Windows heap keeps freed blocks itself

uint64_t PeakResidentBytes() {
  PROCESS_MEMORY_COUNTERS counters{};
  if (!::K32GetProcessMemoryInfo(::GetCurrentProcess(), &counters, sizeof counters)) return 0;
  return counters.PeakWorkingSetSize;
}

std::vector<std::string> CommandLineArguments(int argc, char** argv) {
  int n = 0;
  wchar_t** wide = ::CommandLineToArgvW(::GetCommandLineW(), &n);
  if (wide == nullptr || n != argc) {  // should not happen; keep what the C runtime parsed
    if (wide != nullptr) ::LocalFree(wide);
    return std::vector<std::string>(argv, argv + argc);
  }
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) out.push_back(win::Narrow(wide[i]));
  ::LocalFree(wide);
  return out;
}

const AgentPaths& DefaultAgentPaths() {
  static const AgentPaths paths = [] {
    // The known folder, not %ProgramData%: a service's environment may lack it or (Wine) point
    // it elsewhere, and the installer, the CLI and the service must agree on one directory.
    std::string base = "C:\\ProgramData";
    PWSTR known = nullptr;
    if (SUCCEEDED(::SHGetKnownFolderPath(FOLDERID_ProgramData, KF_FLAG_DEFAULT, nullptr, &known)) &&
        known != nullptr && known[0] != L'\0') {
      base = win::Narrow(known);
    }
    if (known != nullptr) ::CoTaskMemFree(known);
    base += "\\vmsnap";
    return AgentPaths{base + "\\agent.json", base + "\\state", base + "\\hooks.d", base + "\\run",
                      ""};
  }();
  return paths;
}

Env* Env::Default() {
  static WindowsEnv env;
  return &env;
}

}  // namespace vmsnap::platform

// The VSS requester's COM side (issue 8): IVssBackupComponents behind the VssBackupComponents
// interface of platform/vss.hpp, and the volumes of a physical disk. The sequence itself is
// platform/vss_requester.cpp.
//
// COM: each WinVssBackupComponents initializes COM on its thread (multithreaded apartment) and
// uninitializes it after releasing the VSS object. Process-wide COM security is set once
// (packet privacy, identify, dynamic cloaking, as the VSS requester samples do); "too late"
// (someone set it already) is fine.
#include <windows.h>
// windows.h first: the COM and VSS headers depend on it.
#include <objbase.h>
#include <oleauto.h>
#include <vsbackup.h>
#include <vss.h>
#include <vswriter.h>
#include <winioctl.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "platform/vss.hpp"
#include "platform/windows/win_util.hpp"

namespace vmsnap::platform {
namespace {

// The platform-neutral enum mirrors VSS_WRITER_STATE value by value.
static_assert(static_cast<int>(VssWriterState::kStable) == VSS_WS_STABLE);
static_assert(static_cast<int>(VssWriterState::kWaitingForBackupComplete) ==
              VSS_WS_WAITING_FOR_BACKUP_COMPLETE);
static_assert(static_cast<int>(VssWriterState::kFailedAtIdentify) == VSS_WS_FAILED_AT_IDENTIFY);
static_assert(static_cast<int>(VssWriterState::kFailedAtPrepareSnapshot) ==
              VSS_WS_FAILED_AT_PREPARE_SNAPSHOT);
static_assert(static_cast<int>(VssWriterState::kFailedAtBackupShutdown) ==
              VSS_WS_FAILED_AT_BACKUPSHUTDOWN);
// And the HRESULTs the requester and its tests rely on.
static_assert(vss_hr::kSnapshotSetInProgress ==
              static_cast<uint32_t>(VSS_E_SNAPSHOT_SET_IN_PROGRESS));
static_assert(vss_hr::kBadState == static_cast<uint32_t>(VSS_E_BAD_STATE));
static_assert(vss_hr::kHoldWritesTimeout == static_cast<uint32_t>(VSS_E_HOLD_WRITES_TIMEOUT));
static_assert(vss_hr::kFlushWritesTimeout == static_cast<uint32_t>(VSS_E_FLUSH_WRITES_TIMEOUT));
static_assert(vss_hr::kWriterErrorRetryable == static_cast<uint32_t>(VSS_E_WRITERERROR_RETRYABLE));
static_assert(vss_hr::kInsufficientStorage == static_cast<uint32_t>(VSS_E_INSUFFICIENT_STORAGE));
static_assert(vss_hr::kNotImpl == static_cast<uint32_t>(E_NOTIMPL));
static_assert(vss_hr::kAccessDenied == static_cast<uint32_t>(E_ACCESSDENIED));

uint32_t Hr(HRESULT hr) {
  return static_cast<uint32_t>(hr);
}

// Owns one reference to a COM interface.
template <class T>
class ComPtr {
 public:
  ComPtr() = default;
  explicit ComPtr(T* p) : p_(p) {}
  ComPtr(const ComPtr&) = delete;
  ComPtr& operator=(const ComPtr&) = delete;
  ~ComPtr() { Reset(); }
  T* get() const { return p_; }
  T* operator->() const { return p_; }
  T** Out() {
    Reset();
    return &p_;
  }
  void Reset() {
    if (p_) p_->Release();
    p_ = nullptr;
  }

 private:
  T* p_ = nullptr;
};

// Owns a BSTR.
class Bstr {
 public:
  Bstr() = default;
  Bstr(const Bstr&) = delete;
  Bstr& operator=(const Bstr&) = delete;
  ~Bstr() {
    if (b_) ::SysFreeString(b_);
  }
  BSTR* Out() { return &b_; }
  std::string Utf8() const { return b_ ? win::Narrow(std::wstring(b_, ::SysStringLen(b_))) : ""; }

 private:
  BSTR b_ = nullptr;
};

// CoInitializeEx/CoUninitialize for the owner's lifetime (only when the init succeeded).
class ComApartment {
 public:
  ComApartment() {
    const HRESULT hr = ::CoInitializeEx(nullptr, COINIT_MULTITHREADED);
    initialized_ = SUCCEEDED(hr);  // S_FALSE: already initialized, still needs CoUninitialize
    // RPC_E_CHANGED_MODE: the thread is single-threaded already; VSS works there too.
    ok_ = initialized_ || hr == RPC_E_CHANGED_MODE;
    hr_ = hr;
  }
  ComApartment(const ComApartment&) = delete;
  ComApartment& operator=(const ComApartment&) = delete;
  ~ComApartment() {
    if (initialized_) ::CoUninitialize();
  }
  bool ok() const { return ok_; }
  HRESULT hr() const { return hr_; }

 private:
  bool initialized_ = false;
  bool ok_ = false;
  HRESULT hr_ = S_OK;
};

std::string GuidText(const GUID& g) {
  wchar_t buf[64] = {};
  if (::StringFromGUID2(g, buf, 64) <= 0) return {};
  return win::Narrow(buf);
}

Result<GUID> ParseGuid(const std::string& text, const std::string& what) {
  GUID g{};
  std::wstring w = win::Widen(text);
  if (FAILED(::IIDFromString(w.c_str(), &g)))
    return Status::InvalidArgument(what + " \"" + text + "\" is not a GUID",
                                   "write ids as {xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}");
  return g;
}

// Waits for an IVssAsync (owned: released here) at most `timeout`; past it, cancels the
// operation and reports kTimeout.
Status WaitAsync(IVssAsync* raw, const std::string& call, std::chrono::milliseconds timeout) {
  ComPtr<IVssAsync> async(raw);
  if (!async.get()) return Status::Internal(call + " returned no IVssAsync");
  const DWORD ms = static_cast<DWORD>(
      std::clamp<int64_t>(timeout.count(), 1, static_cast<int64_t>(INFINITE) - 1));
  HRESULT hr = async->Wait(ms);
  if (FAILED(hr)) return StatusFromVssHresult(Hr(hr), call + " (IVssAsync::Wait)");
  HRESULT result = S_OK;
  hr = async->QueryStatus(&result, nullptr);
  if (FAILED(hr)) return StatusFromVssHresult(Hr(hr), call + " (IVssAsync::QueryStatus)");
  if (result == VSS_S_ASYNC_PENDING) {
    (void)async->Cancel();
    return Status::Error(Code::kTimeout,
                         call + " did not finish within " + std::to_string(timeout.count()) +
                             " ms; it was cancelled",
                         "retry when the machine is less busy; `vssadmin list writers` shows "
                         "writers that do not respond")
        .InPhase("vss " + call);
  }
  if (result == VSS_S_ASYNC_CANCELLED)
    return Status::Error(Code::kCancelled, call + " was cancelled").InPhase("vss " + call);
  if (FAILED(result)) return StatusFromVssHresult(Hr(result), call);
  return Status::Ok();
}

void SetProcessComSecurityOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Errors (RPC_E_TOO_LATE when the process set it already) leave the existing settings.
    (void)::CoInitializeSecurity(nullptr, -1, nullptr, nullptr, RPC_C_AUTHN_LEVEL_PKT_PRIVACY,
                                 RPC_C_IMP_LEVEL_IDENTIFY, nullptr, EOAC_DYNAMIC_CLOAKING, nullptr);
  });
}

class WinVssBackupComponents final : public VssBackupComponents {
 public:
  // Takes ownership of `com` (declared first: destroyed last, after the VSS object).
  WinVssBackupComponents(std::unique_ptr<ComApartment> com, IVssBackupComponents* vss)
      : com_(std::move(com)), vss_(vss) {}

  Status InitializeForBackup() override {
    return Check(vss_->InitializeForBackup(nullptr), "InitializeForBackup");
  }

  Status SetBackupState(VssBackupType type) override {
    VMSNAP_RETURN_IF_ERROR(Check(vss_->SetContext(VSS_CTX_BACKUP), "SetContext"));
    return Check(vss_->SetBackupState(
                     false, true, type == VssBackupType::kFull ? VSS_BT_FULL : VSS_BT_COPY, false),
                 "SetBackupState");
  }

  Status DisableWriterClasses(const std::vector<std::string>& writer_ids) override {
    std::vector<VSS_ID> ids;
    for (const auto& text : writer_ids) {
      auto g = ParseGuid(text, "writer id");
      if (!g.ok()) return g.take_status().InPhase("vss DisableWriterClasses");
      ids.push_back(*g);
    }
    if (ids.empty()) return Status::Ok();
    return Check(vss_->DisableWriterClasses(ids.data(), static_cast<UINT>(ids.size())),
                 "DisableWriterClasses");
  }

  Result<std::vector<VssWriterInfo>> GatherWriterMetadata(
      std::chrono::milliseconds timeout) override {
    IVssAsync* async = nullptr;
    VMSNAP_RETURN_IF_ERROR(Check(vss_->GatherWriterMetadata(&async), "GatherWriterMetadata"));
    VMSNAP_RETURN_IF_ERROR(WaitAsync(async, "GatherWriterMetadata", timeout));
    UINT count = 0;
    VMSNAP_RETURN_IF_ERROR(Check(vss_->GetWriterMetadataCount(&count), "GetWriterMetadataCount"));
    std::vector<VssWriterInfo> writers;
    Status failed;
    for (UINT i = 0; i < count && failed.ok(); ++i) {
      VSS_ID instance{};
      ComPtr<IVssExamineWriterMetadata> meta;
      failed = Check(vss_->GetWriterMetadata(i, &instance, meta.Out()), "GetWriterMetadata");
      if (!failed.ok()) break;
      VSS_ID id_instance{}, id_writer{};
      Bstr name;
      VSS_USAGE_TYPE usage{};
      VSS_SOURCE_TYPE source{};
      failed = Check(meta->GetIdentity(&id_instance, &id_writer, name.Out(), &usage, &source),
                     "IVssExamineWriterMetadata::GetIdentity");
      if (!failed.ok()) break;
      VssWriterInfo w{name.Utf8(), GuidText(id_writer), GuidText(id_instance), {}};
      UINT includes = 0, excludes = 0, components = 0;
      failed = Check(meta->GetFileCounts(&includes, &excludes, &components),
                     "IVssExamineWriterMetadata::GetFileCounts");
      for (UINT c = 0; c < components && failed.ok(); ++c) {
        ComPtr<IVssWMComponent> component;
        failed = Check(meta->GetComponent(c, component.Out()), "GetComponent");
        if (!failed.ok()) break;
        PVSSCOMPONENTINFO info = nullptr;
        failed = Check(component->GetComponentInfo(&info), "GetComponentInfo");
        if (!failed.ok()) break;
        auto text = [](BSTR b) {
          return b ? win::Narrow(std::wstring(b, ::SysStringLen(b))) : std::string();
        };
        const std::string path = text(info->bstrLogicalPath);
        const std::string cname = text(info->bstrComponentName);
        w.components.push_back(path.empty() ? cname : path + "\\" + cname);
        (void)component->FreeComponentInfo(info);
      }
      writers.push_back(std::move(w));
    }
    // Components are not selected (volume-level backup): the metadata is not needed later.
    (void)vss_->FreeWriterMetadata();
    if (!failed.ok()) return failed;
    return writers;
  }

  Result<std::string> StartSnapshotSet() override {
    VSS_ID set{};
    VMSNAP_RETURN_IF_ERROR(Check(vss_->StartSnapshotSet(&set), "StartSnapshotSet"));
    return GuidText(set);
  }

  Result<std::string> AddToSnapshotSet(const std::string& volume) override {
    std::wstring w = win::Widen(volume);
    VSS_ID snapshot{};
    VMSNAP_RETURN_IF_ERROR(Check(vss_->AddToSnapshotSet(w.data(), GUID_NULL, &snapshot),
                                 "AddToSnapshotSet " + volume));
    return GuidText(snapshot);
  }

  Status PrepareForBackup(std::chrono::milliseconds timeout) override {
    IVssAsync* async = nullptr;
    VMSNAP_RETURN_IF_ERROR(Check(vss_->PrepareForBackup(&async), "PrepareForBackup"));
    return WaitAsync(async, "PrepareForBackup", timeout);
  }

  Status DoSnapshotSet(std::chrono::milliseconds timeout) override {
    IVssAsync* async = nullptr;
    VMSNAP_RETURN_IF_ERROR(Check(vss_->DoSnapshotSet(&async), "DoSnapshotSet"));
    return WaitAsync(async, "DoSnapshotSet", timeout);
  }

  Result<std::vector<VssWriterStatus>> GatherWriterStatus(
      std::chrono::milliseconds timeout) override {
    IVssAsync* async = nullptr;
    VMSNAP_RETURN_IF_ERROR(Check(vss_->GatherWriterStatus(&async), "GatherWriterStatus"));
    VMSNAP_RETURN_IF_ERROR(WaitAsync(async, "GatherWriterStatus", timeout));
    UINT count = 0;
    Status failed = Check(vss_->GetWriterStatusCount(&count), "GetWriterStatusCount");
    std::vector<VssWriterStatus> statuses;
    for (UINT i = 0; i < count && failed.ok(); ++i) {
      VSS_ID instance{}, writer{};
      Bstr name;
      VSS_WRITER_STATE state = VSS_WS_UNKNOWN;
      HRESULT failure = S_OK;
      failed = Check(vss_->GetWriterStatus(i, &instance, &writer, name.Out(), &state, &failure),
                     "GetWriterStatus");
      if (!failed.ok()) break;
      statuses.push_back({name.Utf8(), GuidText(writer), GuidText(instance),
                          static_cast<VssWriterState>(state), Hr(failure)});
    }
    (void)vss_->FreeWriterStatus();
    if (!failed.ok()) return failed;
    return statuses;
  }

  Result<VssSnapshotProperties> GetSnapshotProperties(const std::string& snapshot_id) override {
    auto id = ParseGuid(snapshot_id, "snapshot id");
    if (!id.ok()) return id.take_status();
    VSS_SNAPSHOT_PROP prop{};
    VMSNAP_RETURN_IF_ERROR(Check(vss_->GetSnapshotProperties(*id, &prop), "GetSnapshotProperties"));
    auto text = [](VSS_PWSZ p) { return p ? win::Narrow(p) : std::string(); };
    VssSnapshotProperties out{GuidText(prop.m_SnapshotId), GuidText(prop.m_SnapshotSetId),
                              text(prop.m_pwszOriginalVolumeName),
                              text(prop.m_pwszSnapshotDeviceObject)};
    ::VssFreeSnapshotProperties(&prop);
    return out;
  }

  Status BackupComplete(std::chrono::milliseconds timeout) override {
    IVssAsync* async = nullptr;
    VMSNAP_RETURN_IF_ERROR(Check(vss_->BackupComplete(&async), "BackupComplete"));
    return WaitAsync(async, "BackupComplete", timeout);
  }

  Status AbortBackup() override { return Check(vss_->AbortBackup(), "AbortBackup"); }

  Result<int> DeleteSnapshots(const std::string& snapshot_set_id) override {
    auto id = ParseGuid(snapshot_set_id, "snapshot set id");
    if (!id.ok()) return id.take_status();
    LONG deleted = 0;
    VSS_ID not_deleted{};
    const HRESULT hr =
        vss_->DeleteSnapshots(*id, VSS_OBJECT_SNAPSHOT_SET, TRUE, &deleted, &not_deleted);
    if (FAILED(hr)) {
      Status s = StatusFromVssHresult(Hr(hr), "DeleteSnapshots");
      return Status::Error(
                 s.code(), s.cause() + " (snapshot " + GuidText(not_deleted) + " was not deleted)",
                 "delete it with `vssadmin delete shadows /shadow=" + GuidText(not_deleted) + "`")
          .InPhase("vss DeleteSnapshots");
    }
    return static_cast<int>(deleted);
  }

 private:
  static Status Check(HRESULT hr, const std::string& call) {
    return FAILED(hr) ? StatusFromVssHresult(Hr(hr), call) : Status::Ok();
  }

  std::unique_ptr<ComApartment> com_;
  ComPtr<IVssBackupComponents> vss_;
};

}  // namespace

Result<std::unique_ptr<VssBackupComponents>> OpenSystemVss() {
  auto com = std::make_unique<ComApartment>();
  if (!com->ok())
    return Status::Unavailable("COM could not be initialized: " + VssHresultText(Hr(com->hr())),
                               "run the agent on Windows with COM available")
        .InPhase("vss open");
  SetProcessComSecurityOnce();
  IVssBackupComponents* raw = nullptr;
  const HRESULT hr = ::CreateVssBackupComponents(&raw);
  if (FAILED(hr) || !raw) {
    Status s = StatusFromVssHresult(Hr(hr), "CreateVssBackupComponents");
    return Status::Error(s.code(), "VSS is not available: " + s.cause(), s.fix())
        .InPhase("vss open");
  }
  return std::unique_ptr<VssBackupComponents>(
      std::make_unique<WinVssBackupComponents>(std::move(com), raw));
}

namespace {

// True when VSS can snapshot the volume ("\\?\Volume{...}\"): its file system is NTFS or
// ReFS. FAT, FAT32 (the EFI system partition), exFAT, RAW (unformatted, or a BitLocker volume
// that is locked) and volumes whose file system cannot be queried are not: adding one to a
// snapshot set fails it (VSS_E_VOLUME_NOT_SUPPORTED), so they are read from the disk instead.
bool SnapshottableFileSystem(const std::wstring& volume) {
  wchar_t fs[MAX_PATH + 1] = {};
  if (!::GetVolumeInformationW(volume.c_str(), nullptr, 0, nullptr, nullptr, nullptr, fs,
                               MAX_PATH + 1))
    return false;
  return ::lstrcmpiW(fs, L"NTFS") == 0 || ::lstrcmpiW(fs, L"ReFS") == 0;
}

}  // namespace

Result<std::vector<VssDiskVolume>> VolumesOnDisk(const std::string& disk) {
  if (!IsPhysicalDrivePath(disk))
    return Status::InvalidArgument(disk + " is not a physical drive",
                                   "name it as \\\\.\\PhysicalDriveN")
        .InPhase("vss volumes");
  const DWORD disk_number = static_cast<DWORD>(std::stoul(disk.substr(4 + 13)));
  wchar_t name[MAX_PATH + 1] = {};
  HANDLE find = ::FindFirstVolumeW(name, MAX_PATH);
  if (find == INVALID_HANDLE_VALUE)
    return win::FromWin32(::GetLastError(), "FindFirstVolume").InPhase("vss volumes");
  struct FindCloser {
    HANDLE h;
    ~FindCloser() { ::FindVolumeClose(h); }
  } closer{find};
  std::vector<VssDiskVolume> volumes;
  for (;;) {
    std::wstring volume = name;  // "\\?\Volume{...}\"
    std::wstring device = volume;
    if (!device.empty() && device.back() == L'\\') device.pop_back();
    win::Handle h(::CreateFileW(device.c_str(), 0, FILE_SHARE_READ | FILE_SHARE_WRITE, nullptr,
                                OPEN_EXISTING, 0, nullptr));
    if (h.valid()) {
      std::vector<unsigned char> buf(sizeof(VOLUME_DISK_EXTENTS) + 16 * sizeof(DISK_EXTENT));
      DWORD bytes = 0;
      BOOL ok = ::DeviceIoControl(h.get(), IOCTL_VOLUME_GET_VOLUME_DISK_EXTENTS, nullptr, 0,
                                  buf.data(), static_cast<DWORD>(buf.size()), &bytes, nullptr);
      if (!ok && ::GetLastError() == ERROR_MORE_DATA) {
        const auto* partial = reinterpret_cast<const VOLUME_DISK_EXTENTS*>(buf.data());
        buf.resize(sizeof(VOLUME_DISK_EXTENTS) +
                   partial->NumberOfDiskExtents * sizeof(DISK_EXTENT));
        ok = ::DeviceIoControl(h.get(), IOCTL_VOLUME_GET_VOLUME_DISK_EXTENTS, nullptr, 0,
                               buf.data(), static_cast<DWORD>(buf.size()), &bytes, nullptr);
      }
      // Volumes without extents (CD-ROM, some virtual volumes) are not on the disk; volumes VSS
      // cannot snapshot (not NTFS/ReFS) are read from the disk as part of its layout.
      if (ok && SnapshottableFileSystem(volume)) {
        const auto* ext = reinterpret_cast<const VOLUME_DISK_EXTENTS*>(buf.data());
        VssDiskVolume v{win::Narrow(volume), {}, 0};
        for (DWORD i = 0; i < ext->NumberOfDiskExtents; ++i) {
          if (ext->Extents[i].DiskNumber == disk_number)
            v.extents.push_back({static_cast<uint64_t>(ext->Extents[i].StartingOffset.QuadPart),
                                 static_cast<uint64_t>(ext->Extents[i].ExtentLength.QuadPart)});
          else
            ++v.extents_on_other_disks;  // spanned/striped/mirrored: CheckDiskVolumeLayout
        }
        if (!v.extents.empty()) volumes.push_back(std::move(v));
      }
    }
    if (!::FindNextVolumeW(find, name, MAX_PATH)) {
      const DWORD err = ::GetLastError();
      if (err == ERROR_NO_MORE_FILES) break;
      return win::FromWin32(err, "FindNextVolume").InPhase("vss volumes");
    }
  }
  std::sort(volumes.begin(), volumes.end(), [](const auto& a, const auto& b) {
    return a.extents.front().disk_offset < b.extents.front().disk_offset;
  });
  return volumes;
}

}  // namespace vmsnap::platform

// Windows Volume Shadow Copy Service (VSS), requester side (issue 8).
//
// Two layers, both declared here without any OS header:
//
//  - VssBackupComponents: a thin interface over the IVssBackupComponents calls a requester
//    needs. platform/windows/vss.cpp implements it with COM (OpenSystemVss); on Linux
//    OpenSystemVss() is kUnavailable. Tests implement it with a fake. Every asynchronous VSS
//    call (IVssAsync) is waited for inside the implementation, bounded by the timeout given.
//    Every error is a Status whose cause names the call and the HRESULT (e.g.
//    "DoSnapshotSet: VSS_E_HOLD_WRITES_TIMEOUT (0x80042314) ...") and whose code says whether
//    a retry can help (StatusFromVssHresult).
//
//  - VssSnapshotSet (platform/vss_requester.cpp, platform-neutral): the whole requester
//    sequence on one VssBackupComponents, with the evidence of what every writer did:
//      InitializeForBackup -> SetBackupState (copy by default, full as an option)
//      -> [DisableWriterClasses for writers excluded by configuration]
//      -> GatherWriterMetadata -> StartSnapshotSet (retried with backoff while another set is
//      in progress, bounded) -> AddToSnapshotSet per volume -> PrepareForBackup
//      -> GatherWriterStatus -> DoSnapshotSet (bounded by the writers' freeze window)
//      -> GatherWriterStatus -> GetSnapshotProperties per volume
//    the caller reads the shadow copy devices, then Complete():
//      BackupComplete -> GatherWriterStatus -> DeleteSnapshots
//    or, on any failure after StartSnapshotSet (and from the destructor when Complete() was
//    never called): AbortBackup -> DeleteSnapshots (when a set was created). BackupComplete is
//    never called after AbortBackup.
//
// Threads: one VssBackupComponents / VssSnapshotSet is used by one thread at a time. The COM
// implementation initializes COM (multithreaded apartment) on the thread that opens it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/status.hpp"

namespace vmsnap::platform {

// ---------------------------------------------------------------------------------------------
// Vocabulary shared by the interface, the requester and the evidence.

enum class VssBackupType { kCopy, kFull };
const char* VssBackupTypeName(VssBackupType type);  // "copy", "full"
// "copy" or "full" (case-insensitive); anything else is kInvalidArgument.
Result<VssBackupType> ParseVssBackupType(const std::string& text);

// The values of VSS_WRITER_STATE (vss.h); platform/windows/vss.cpp checks they match.
enum class VssWriterState : int {
  kUnknown = 0,
  kStable = 1,
  kWaitingForFreeze = 2,
  kWaitingForThaw = 3,
  kWaitingForPostSnapshot = 4,
  kWaitingForBackupComplete = 5,
  kFailedAtIdentify = 6,
  kFailedAtPrepareBackup = 7,
  kFailedAtPrepareSnapshot = 8,
  kFailedAtFreeze = 9,
  kFailedAtThaw = 10,
  kFailedAtPostSnapshot = 11,
  kFailedAtBackupComplete = 12,
  kFailedAtPreRestore = 13,
  kFailedAtPostRestore = 14,
  kFailedAtBackupShutdown = 15,
};
// "unknown", "stable", "waiting-for-freeze", ..., "failed-at-prepare-snapshot", ...
const char* VssWriterStateName(VssWriterState state);
// True for every VSS_WS_FAILED_* state.
bool VssWriterStateFailed(VssWriterState state);

// Well-known HRESULT values (vsserror.h, winerror.h), so the fake and the tests use the same
// numbers as Windows.
namespace vss_hr {
inline constexpr uint32_t kOk = 0x00000000;
inline constexpr uint32_t kNotImpl = 0x80004001;  // E_NOTIMPL (Wine's CreateVssBackupComponents)
inline constexpr uint32_t kFail = 0x80004005;
inline constexpr uint32_t kAccessDenied = 0x80070005;
inline constexpr uint32_t kOutOfMemory = 0x8007000E;
inline constexpr uint32_t kInvalidArg = 0x80070057;
inline constexpr uint32_t kUnexpected = 0x8000FFFF;
inline constexpr uint32_t kBadState = 0x80042301;
inline constexpr uint32_t kVssUnexpected = 0x80042302;
inline constexpr uint32_t kProviderVeto = 0x80042306;
inline constexpr uint32_t kObjectNotFound = 0x80042308;
inline constexpr uint32_t kVolumeNotSupported = 0x8004230C;
inline constexpr uint32_t kVolumeNotSupportedByProvider = 0x8004230E;
inline constexpr uint32_t kUnexpectedProviderError = 0x8004230F;
inline constexpr uint32_t kMaxVolumesReached = 0x80042312;
inline constexpr uint32_t kFlushWritesTimeout = 0x80042313;
inline constexpr uint32_t kHoldWritesTimeout = 0x80042314;
inline constexpr uint32_t kUnexpectedWriterError = 0x80042315;
inline constexpr uint32_t kSnapshotSetInProgress = 0x80042316;
inline constexpr uint32_t kMaxSnapshotsReached = 0x80042317;
inline constexpr uint32_t kWriterInfrastructure = 0x80042318;
inline constexpr uint32_t kWriterNotResponding = 0x80042319;
inline constexpr uint32_t kUnsupportedContext = 0x8004231B;
inline constexpr uint32_t kVolumeInUse = 0x8004231D;
inline constexpr uint32_t kInsufficientStorage = 0x8004231F;
inline constexpr uint32_t kRebootRequired = 0x80042327;
inline constexpr uint32_t kWriterErrorInconsistentSnapshot = 0x800423F0;
inline constexpr uint32_t kWriterErrorOutOfResources = 0x800423F1;
inline constexpr uint32_t kWriterErrorTimeout = 0x800423F2;
inline constexpr uint32_t kWriterErrorRetryable = 0x800423F3;
inline constexpr uint32_t kWriterErrorNonRetryable = 0x800423F4;
inline constexpr uint32_t kWriterErrorRecoveryFailed = 0x800423F5;
}  // namespace vss_hr

// "VSS_E_SNAPSHOT_SET_IN_PROGRESS (0x80042316)"; unknown values as "HRESULT 0x........".
std::string VssHresultText(uint32_t hr);

// The Status for a failed VSS call: phase "vss <call>", cause "<call>: <VssHresultText>
// <meaning>", a fix when one is known, and a code saying whether to retry:
//   VSS_E_SNAPSHOT_SET_IN_PROGRESS, VSS_E_MAXIMUM_NUMBER_OF_SNAPSHOTS_REACHED,
//   VSS_E_WRITERERROR_RETRYABLE, VSS_E_WRITER_NOT_RESPONDING        -> kUnavailable (retry)
//   VSS_E_FLUSH_WRITES_TIMEOUT, VSS_E_HOLD_WRITES_TIMEOUT, VSS_E_WRITERERROR_TIMEOUT -> kTimeout
//   E_ACCESSDENIED -> kPermissionDenied; VSS_E_VOLUME_NOT_SUPPORTED(_BY_PROVIDER),
//   E_INVALIDARG, VSS_E_OBJECT_NOT_FOUND -> kInvalidArgument; VSS_E_INSUFFICIENT_STORAGE ->
//   kIoError; VSS_E_BAD_STATE, VSS_E_UNSUPPORTED_CONTEXT -> kInternal (a sequence bug);
//   E_NOTIMPL -> kUnavailable (no VSS service, e.g. Wine); anything else -> kIoError.
// `hr` must be a failure (high bit set).
Status StatusFromVssHresult(uint32_t hr, const std::string& call);

struct VssWriterInfo {  // from GatherWriterMetadata
  std::string name;
  std::string writer_id;                // writer class id, "{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}"
  std::string instance_id;              // writer instance id, same format
  std::vector<std::string> components;  // "<logical path>\<name>" (or just the name)
};

struct VssWriterStatus {  // one entry of GatherWriterStatus/GetWriterStatus
  std::string name;
  std::string writer_id;
  std::string instance_id;
  VssWriterState state = VssWriterState::kUnknown;
  uint32_t failure_hr = 0;  // hResultFailure; 0 when the writer reported none
};

struct VssSnapshotProperties {  // from GetSnapshotProperties
  std::string snapshot_id;
  std::string snapshot_set_id;
  std::string original_volume;  // "\\?\Volume{...}\"
  std::string device_object;    // "\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopyN"
};

// ---------------------------------------------------------------------------------------------
// The IVssBackupComponents calls the requester needs. Every method returns ok or the Status of
// StatusFromVssHresult (or kTimeout when an asynchronous call did not finish within `timeout`;
// the implementation then cancels it). Owned by one VssSnapshotSet; not thread-safe.
class VssBackupComponents {
 public:
  virtual ~VssBackupComponents() = default;  // releases the COM object (never throws)

  virtual Status InitializeForBackup() = 0;
  // SetContext(VSS_CTX_BACKUP) then SetBackupState(select components: false, bootable system
  // state: true, VSS_BT_COPY or VSS_BT_FULL, partial file support: false).
  virtual Status SetBackupState(VssBackupType type) = 0;
  // Must come before GatherWriterMetadata (VSS ignores it afterwards). Ids are writer class ids.
  virtual Status DisableWriterClasses(const std::vector<std::string>& writer_ids) = 0;
  virtual Result<std::vector<VssWriterInfo>> GatherWriterMetadata(
      std::chrono::milliseconds timeout) = 0;
  // Returns the new snapshot set id.
  virtual Result<std::string> StartSnapshotSet() = 0;
  // `volume` as Windows names it ("C:\" or "\\?\Volume{...}\"); returns the snapshot id.
  virtual Result<std::string> AddToSnapshotSet(const std::string& volume) = 0;
  virtual Status PrepareForBackup(std::chrono::milliseconds timeout) = 0;
  virtual Status DoSnapshotSet(std::chrono::milliseconds timeout) = 0;
  // GatherWriterStatus, then every GetWriterStatus, then FreeWriterStatus.
  virtual Result<std::vector<VssWriterStatus>> GatherWriterStatus(
      std::chrono::milliseconds timeout) = 0;
  virtual Result<VssSnapshotProperties> GetSnapshotProperties(const std::string& snapshot_id) = 0;
  virtual Status BackupComplete(std::chrono::milliseconds timeout) = 0;
  virtual Status AbortBackup() = 0;
  // DeleteSnapshots(set id, VSS_OBJECT_SNAPSHOT_SET, force): returns how many were deleted.
  virtual Result<int> DeleteSnapshots(const std::string& snapshot_set_id) = 0;
};

using VssFactory = std::function<Result<std::unique_ptr<VssBackupComponents>>()>;

// The system's VSS (CreateVssBackupComponents). Linux: kUnavailable "VSS is a Windows
// facility". Windows: kUnavailable when COM or the VSS service cannot be reached (Wine returns
// E_NOTIMPL), kPermissionDenied without backup privileges.
Result<std::unique_ptr<VssBackupComponents>> OpenSystemVss();

// One volume that has extents on a physical disk, for reading the disk through the volumes'
// shadow copies (the ranges outside every volume are read from the disk itself).
struct VssDiskVolume {
  std::string volume;  // "\\?\Volume{...}\"
  struct Extent {
    uint64_t disk_offset = 0;
    uint64_t length = 0;
  };
  std::vector<Extent> extents;  // on this disk, in disk order
  // Extents of the same volume on other disks (a spanned, striped or mirrored dynamic volume).
  uint32_t extents_on_other_disks = 0;
};

// The volumes on `disk` ("\\.\PhysicalDriveN") that VSS can snapshot and that are read
// through their shadow copies. Windows: FindFirstVolume + IOCTL_VOLUME_GET_VOLUME_DISK_EXTENTS,
// sorted by their first extent; only volumes whose file system (GetVolumeInformationW) is NTFS
// or ReFS are listed, because VSS snapshots only those (a FAT32 EFI system partition would
// fail the whole snapshot set with VSS_E_VOLUME_NOT_SUPPORTED): every other volume (FAT, exFAT,
// RAW, locked) is part of the disk's layout and is read from the disk itself. Linux:
// kUnavailable.
Result<std::vector<VssDiskVolume>> VolumesOnDisk(const std::string& disk);

// Whether `volumes` (as VolumesOnDisk lists them for `disk`) can be read through their shadow
// copies, with every other byte of the disk read from the disk itself. Platform-neutral;
// checked by the consistency engine before any snapshot (disk_size 0: not known yet) and by
// the composing reader (agent/composed_disk_reader.hpp) with the disk's size. kInvalidArgument
// (phase "vss volumes") naming the volume, the cause and the fix when:
//  - a volume has more than one extent, here or on other disks (a spanned, striped or mirrored
//    dynamic volume): where its later extents lie inside the volume is not knowable from this
//    disk alone, so it cannot be composed; the fix is to back up that volume itself;
//  - an extent is empty, ends past disk_size (when not 0) or overlaps another volume's extent.
Status CheckDiskVolumeLayout(const std::string& disk, const std::vector<VssDiskVolume>& volumes,
                             uint64_t disk_size);

// "\\.\C:" (or "C:", "C:\") -> "C:\"; "\\?\Volume{...}" -> "\\?\Volume{...}\"; anything else
// (a physical drive, an image file) -> empty. Platform-neutral string work.
std::string VolumeNameOfDisk(const std::string& disk);
// True for "\\.\PhysicalDriveN" (any case).
bool IsPhysicalDrivePath(const std::string& disk);

// ---------------------------------------------------------------------------------------------
// The requester.

struct VssRequesterOptions {
  VssBackupType backup_type = VssBackupType::kCopy;  // copy keeps other products' log chains
  // Writers left out of the backup, by name (case-insensitive, e.g. "SqlServerWriter") or by
  // writer class id ("{...}"). Names are resolved to ids with a first, separate
  // InitializeForBackup/GatherWriterMetadata (VSS only honours DisableWriterClasses before
  // GatherWriterMetadata). An excluded writer that is present makes the backup at most
  // file-system consistent.
  std::vector<std::string> excluded_writers;
  // Bound on each asynchronous call except DoSnapshotSet (metadata, prepare, status, complete).
  std::chrono::milliseconds async_timeout{std::chrono::minutes(5)};
  // Bound on DoSnapshotSet: writers allow 60 s between freeze and thaw (VSS itself cancels the
  // 10 s flush-and-hold). In (0, 60 s]; a timeout is a failure with AbortBackup.
  std::chrono::milliseconds snapshot_timeout{std::chrono::seconds(60)};
  // StartSnapshotSet while another set is in progress (a retryable status): up to
  // start_attempts attempts, sleeping start_backoff, doubled each time up to start_backoff_max.
  int start_attempts = 6;
  std::chrono::milliseconds start_backoff{std::chrono::seconds(2)};
  std::chrono::milliseconds start_backoff_max{std::chrono::seconds(30)};
  // How to sleep between attempts (tests record the delays instead of sleeping).
  std::function<void(std::chrono::milliseconds)> sleep;  // empty: std::this_thread::sleep_for
};

struct VssVolumeShadow {
  std::string volume;       // as given to Create
  std::string snapshot_id;  // "{...}"
  std::string device_path;  // the shadow copy device to read
  std::string original_volume;
};

// One VSS snapshot set: created by Create(), read by the caller, then Complete() after the
// transfer (BackupComplete, final writer status, delete) or destroyed without Complete()
// (AbortBackup, delete). Movable only through the unique_ptr. Not thread-safe.
class VssSnapshotSet {
 public:
  // Runs the sequence up to the shadow copies for `volumes` (at least one, deduplicated by the
  // caller). `factory` is called once, or twice when excluded writers are named by name (a
  // probe instance resolves names to ids and is released before the real one is created).
  // Whatever fails, nothing is left behind: AbortBackup after StartSnapshotSet, and the set's
  // snapshots are deleted. `evidence_out`, when given, receives the evidence in every case.
  static Result<std::unique_ptr<VssSnapshotSet>> Create(const VssFactory& factory,
                                                        const std::vector<std::string>& volumes,
                                                        const VssRequesterOptions& options,
                                                        nlohmann::json* evidence_out = nullptr);

  ~VssSnapshotSet();  // Abort() when Complete() was not called; never throws
  VssSnapshotSet(const VssSnapshotSet&) = delete;
  VssSnapshotSet& operator=(const VssSnapshotSet&) = delete;

  const std::string& snapshot_set_id() const { return set_id_; }
  const std::vector<VssVolumeShadow>& shadows() const { return shadows_; }
  // The shadow device for `volume` (as given to Create); empty when unknown.
  std::string DeviceFor(const std::string& volume) const;

  // Writers (non-excluded) seen in a failed state after PrepareForBackup or DoSnapshotSet,
  // as "Name (state: failure)", and how many writers took part / were excluded.
  const std::vector<std::string>& failed_writers() const { return failed_writers_; }
  size_t writer_count() const { return writer_count_; }
  size_t excluded_writer_count() const { return excluded_count_; }
  // Monotonic microseconds when DoSnapshotSet returned.
  int64_t completed_at_us() const { return completed_at_us_; }

  // The transfer succeeded: BackupComplete -> GatherWriterStatus -> DeleteSnapshots. The
  // writer statuses after BackupComplete land in evidence(). Idempotent; an error names the
  // call (the snapshots are still deleted).
  Status Complete();
  // The transfer failed or was abandoned: AbortBackup -> DeleteSnapshots. Idempotent.
  Status Abort();

  // {"backup_type", "snapshot_set_id", "start_attempts", "writers": [{name, writer_id,
  //  instance_id, components, excluded, statuses: [{after, state, failure}], final_state,
  //  failed}], "excluded_writers": [{configured, matched}], "volumes": [{volume, snapshot_id,
  //  device, original_volume}], "calls": [...], "completed"/"aborted", "deleted", errors}.
  const nlohmann::json& evidence() const { return evidence_; }

 private:
  VssSnapshotSet() = default;
  Status Finish(bool complete);
  void RecordStatuses(const std::vector<VssWriterStatus>& statuses, const std::string& after);

  std::unique_ptr<VssBackupComponents> vss_;
  VssRequesterOptions options_;
  std::string set_id_;
  std::vector<VssVolumeShadow> shadows_;
  std::vector<std::string> failed_writers_;
  std::vector<std::string> excluded_ids_;
  std::vector<std::string> failed_keys_;  // writer id + instance id, listed once
  bool snapshot_attempted_ = false;       // DoSnapshotSet was called: there may be snapshots
  size_t writer_count_ = 0;
  size_t excluded_count_ = 0;
  int64_t completed_at_us_ = 0;
  bool finished_ = false;
  nlohmann::json evidence_;
};

}  // namespace vmsnap::platform

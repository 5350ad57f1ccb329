// The VSS requester sequence (platform-neutral: compiled on Linux for the tests against a fake,
// and on Windows against the COM implementation). Contracts in platform/vss.hpp.
#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <map>
#include <thread>
#include <utility>

#include "platform/vss.hpp"

namespace vmsnap::platform {
namespace {
using json = nlohmann::json;

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

bool StartsWithNoCase(const std::string& s, const std::string& prefix) {
  return s.size() >= prefix.size() && Lower(s.substr(0, prefix.size())) == Lower(prefix);
}

// "{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}" with or without braces, any case -> lower case with
// braces; anything else -> empty.
std::string NormalizeGuid(const std::string& text) {
  std::string s = text;
  if (s.size() == 38 && s.front() == '{' && s.back() == '}') s = s.substr(1, 36);
  if (s.size() != 36) return {};
  for (size_t i = 0; i < s.size(); ++i) {
    const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash ? s[i] != '-' : !std::isxdigit(static_cast<unsigned char>(s[i]))) return {};
  }
  // Built by append: "{" + std::string temporary trips GCC 12's false -Wrestrict at -O3.
  std::string braced;
  braced.reserve(38);
  braced.push_back('{');
  braced.append(Lower(s));
  braced.push_back('}');
  return braced;
}

int64_t MonotonicMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct HresultInfo {
  uint32_t hr;
  const char* name;
  const char* meaning;
  Code code;
  const char* fix;
};

constexpr HresultInfo kHresults[] = {
    {vss_hr::kNotImpl, "E_NOTIMPL", "the Volume Shadow Copy Service is not implemented here",
     Code::kUnavailable,
     "run the agent on Windows with the Volume Shadow Copy service (VSS) available"},
    {vss_hr::kFail, "E_FAIL", "unspecified failure", Code::kIoError, ""},
    {vss_hr::kAccessDenied, "E_ACCESSDENIED",
     "the caller lacks backup privileges or is not an administrator", Code::kPermissionDenied,
     "run the agent as LocalSystem or as an administrator with the backup privilege"},
    {vss_hr::kOutOfMemory, "E_OUTOFMEMORY", "out of memory or other system resources",
     Code::kUnavailable, "free memory on the machine and retry"},
    {vss_hr::kInvalidArg, "E_INVALIDARG", "an argument is not valid", Code::kInvalidArgument, ""},
    {vss_hr::kUnexpected, "E_UNEXPECTED", "unexpected error", Code::kIoError,
     "see the Application event log (source VSS) for the cause"},
    {vss_hr::kBadState, "VSS_E_BAD_STATE", "the call is not valid in the current VSS state",
     Code::kInternal, "report this as a bug in the agent's VSS sequence"},
    {vss_hr::kVssUnexpected, "VSS_E_UNEXPECTED", "unexpected VSS error", Code::kIoError,
     "see the Application event log (source VSS) for the cause"},
    {vss_hr::kProviderVeto, "VSS_E_PROVIDER_VETO", "the shadow copy provider refused",
     Code::kIoError, "see the Application and System event logs for the provider's reason"},
    {vss_hr::kObjectNotFound, "VSS_E_OBJECT_NOT_FOUND", "the object does not exist",
     Code::kInvalidArgument, ""},
    {vss_hr::kVolumeNotSupported, "VSS_E_VOLUME_NOT_SUPPORTED",
     "shadow copies are not supported on this volume", Code::kInvalidArgument,
     "back up an NTFS or ReFS volume, or a disk whose volumes support shadow copies"},
    {vss_hr::kVolumeNotSupportedByProvider, "VSS_E_VOLUME_NOT_SUPPORTED_BY_PROVIDER",
     "the provider does not support this volume", Code::kInvalidArgument,
     "back up an NTFS or ReFS volume"},
    {vss_hr::kUnexpectedProviderError, "VSS_E_UNEXPECTED_PROVIDER_ERROR",
     "the shadow copy provider failed", Code::kIoError,
     "see the System event log (source volsnap) for the cause"},
    {vss_hr::kMaxVolumesReached, "VSS_E_MAXIMUM_NUMBER_OF_VOLUMES_REACHED",
     "too many volumes in one snapshot set", Code::kInvalidArgument,
     "back up fewer disks per backup"},
    {vss_hr::kFlushWritesTimeout, "VSS_E_FLUSH_WRITES_TIMEOUT",
     "the system could not flush I/O writes in time", Code::kTimeout,
     "retry when the disks are less busy"},
    {vss_hr::kHoldWritesTimeout, "VSS_E_HOLD_WRITES_TIMEOUT",
     "the system could not hold I/O writes in time (10 s)", Code::kTimeout,
     "retry when the disks are less busy"},
    {vss_hr::kUnexpectedWriterError, "VSS_E_UNEXPECTED_WRITER_ERROR", "a writer failed",
     Code::kIoError, "run `vssadmin list writers` and fix the failed writer"},
    {vss_hr::kSnapshotSetInProgress, "VSS_E_SNAPSHOT_SET_IN_PROGRESS",
     "another shadow copy creation is in progress", Code::kUnavailable,
     "wait for the other backup to finish, then retry"},
    {vss_hr::kMaxSnapshotsReached, "VSS_E_MAXIMUM_NUMBER_OF_SNAPSHOTS_REACHED",
     "the volume has the maximum number of shadow copies", Code::kUnavailable,
     "delete old shadow copies (vssadmin delete shadows) and retry"},
    {vss_hr::kWriterInfrastructure, "VSS_E_WRITER_INFRASTRUCTURE",
     "the writer infrastructure is not working", Code::kIoError,
     "check that the Volume Shadow Copy and COM+ Event System services run"},
    {vss_hr::kWriterNotResponding, "VSS_E_WRITER_NOT_RESPONDING", "a writer is not responding",
     Code::kUnavailable, "run `vssadmin list writers`, restart the writer's service, retry"},
    {vss_hr::kUnsupportedContext, "VSS_E_UNSUPPORTED_CONTEXT",
     "the snapshot context is not supported", Code::kInternal,
     "report this as a bug in the agent's VSS sequence"},
    {vss_hr::kVolumeInUse, "VSS_E_VOLUME_IN_USE", "the volume is in use by another operation",
     Code::kUnavailable, "retry later"},
    {vss_hr::kInsufficientStorage, "VSS_E_INSUFFICIENT_STORAGE",
     "not enough free space for the shadow copy storage area", Code::kIoError,
     "free space on the volume or enlarge the shadow storage (vssadmin resize shadowstorage)"},
    {vss_hr::kRebootRequired, "VSS_E_REBOOT_REQUIRED", "the system must be restarted first",
     Code::kUnavailable, "restart Windows, then retry"},
    {vss_hr::kWriterErrorInconsistentSnapshot, "VSS_E_WRITERERROR_INCONSISTENTSNAPSHOT",
     "the shadow copy holds only part of the writer's volumes", Code::kIoError,
     "back up every disk holding the writer's data together"},
    {vss_hr::kWriterErrorOutOfResources, "VSS_E_WRITERERROR_OUTOFRESOURCES",
     "the writer ran out of resources", Code::kUnavailable, "retry later"},
    {vss_hr::kWriterErrorTimeout, "VSS_E_WRITERERROR_TIMEOUT",
     "the writer timed out between freeze and thaw", Code::kTimeout,
     "retry when the machine is less busy"},
    {vss_hr::kWriterErrorRetryable, "VSS_E_WRITERERROR_RETRYABLE",
     "the writer failed with a transient error", Code::kUnavailable, "retry"},
    {vss_hr::kWriterErrorNonRetryable, "VSS_E_WRITERERROR_NONRETRYABLE",
     "the writer failed with a permanent error", Code::kIoError,
     "see the writer's application event log"},
    {vss_hr::kWriterErrorRecoveryFailed, "VSS_E_WRITERERROR_RECOVERY_FAILED",
     "the writer could not recover the shadow copy", Code::kIoError,
     "see the writer's application event log"},
};

const HresultInfo* FindHresult(uint32_t hr) {
  for (const auto& h : kHresults)
    if (h.hr == hr) return &h;
  return nullptr;
}

std::string Hex(uint32_t hr) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08X", static_cast<unsigned>(hr));
  return buf;
}

}  // namespace

const char* VssBackupTypeName(VssBackupType type) {
  return type == VssBackupType::kFull ? "full" : "copy";
}

Result<VssBackupType> ParseVssBackupType(const std::string& text) {
  const std::string t = Lower(text);
  if (t == "copy") return VssBackupType::kCopy;
  if (t == "full") return VssBackupType::kFull;
  return Status::InvalidArgument("VSS backup type \"" + text + "\" is not copy or full",
                                 "use copy (the default: other products' log chains are kept) "
                                 "or full (truncates application logs)");
}

const char* VssWriterStateName(VssWriterState state) {
  switch (state) {
    case VssWriterState::kUnknown:
      return "unknown";
    case VssWriterState::kStable:
      return "stable";
    case VssWriterState::kWaitingForFreeze:
      return "waiting-for-freeze";
    case VssWriterState::kWaitingForThaw:
      return "waiting-for-thaw";
    case VssWriterState::kWaitingForPostSnapshot:
      return "waiting-for-post-snapshot";
    case VssWriterState::kWaitingForBackupComplete:
      return "waiting-for-backup-complete";
    case VssWriterState::kFailedAtIdentify:
      return "failed-at-identify";
    case VssWriterState::kFailedAtPrepareBackup:
      return "failed-at-prepare-backup";
    case VssWriterState::kFailedAtPrepareSnapshot:
      return "failed-at-prepare-snapshot";
    case VssWriterState::kFailedAtFreeze:
      return "failed-at-freeze";
    case VssWriterState::kFailedAtThaw:
      return "failed-at-thaw";
    case VssWriterState::kFailedAtPostSnapshot:
      return "failed-at-post-snapshot";
    case VssWriterState::kFailedAtBackupComplete:
      return "failed-at-backup-complete";
    case VssWriterState::kFailedAtPreRestore:
      return "failed-at-pre-restore";
    case VssWriterState::kFailedAtPostRestore:
      return "failed-at-post-restore";
    case VssWriterState::kFailedAtBackupShutdown:
      return "failed-at-backup-shutdown";
  }
  return "unknown";
}

bool VssWriterStateFailed(VssWriterState state) {
  const int s = static_cast<int>(state);
  return s >= static_cast<int>(VssWriterState::kFailedAtIdentify) &&
         s <= static_cast<int>(VssWriterState::kFailedAtBackupShutdown);
}

std::string VssHresultText(uint32_t hr) {
  if (const HresultInfo* h = FindHresult(hr)) return std::string(h->name) + " (" + Hex(hr) + ")";
  return "HRESULT " + Hex(hr);
}

Status StatusFromVssHresult(uint32_t hr, const std::string& call) {
  const HresultInfo* h = FindHresult(hr);
  const Code code = h ? h->code : Code::kIoError;
  std::string cause = call + ": " + VssHresultText(hr);
  if (h) cause += std::string(", ") + h->meaning;
  std::string fix = h && *h->fix ? h->fix : "see the Application event log (source VSS)";
  return Status::Error(code, std::move(cause), std::move(fix)).InPhase("vss " + call);
}

std::string VolumeNameOfDisk(const std::string& disk) {
  std::string rest = disk;
  if (StartsWithNoCase(rest, "\\\\.\\") || StartsWithNoCase(rest, "\\\\?\\")) rest = rest.substr(4);
  if ((rest.size() == 2 || (rest.size() == 3 && (rest[2] == '\\' || rest[2] == '/'))) &&
      std::isalpha(static_cast<unsigned char>(rest[0])) && rest[1] == ':')
    return std::string(1, static_cast<char>(std::toupper(static_cast<unsigned char>(rest[0])))) +
           ":\\";
  if (disk.size() > 4 && StartsWithNoCase(rest, "Volume{")) {
    if (rest.back() != '\\') rest += '\\';
    return "\\\\?\\" + rest;
  }
  return {};
}

bool IsPhysicalDrivePath(const std::string& disk) {
  if (!StartsWithNoCase(disk, "\\\\.\\") && !StartsWithNoCase(disk, "\\\\?\\")) return false;
  const std::string rest = disk.substr(4);
  const std::string prefix = "physicaldrive";
  if (!StartsWithNoCase(rest, prefix) || rest.size() == prefix.size()) return false;
  return std::all_of(rest.begin() + static_cast<std::ptrdiff_t>(prefix.size()), rest.end(),
                     [](unsigned char c) { return std::isdigit(c) != 0; });
}

namespace {
// Built by append: "[" + std::string temporary trips GCC 12's false -Wrestrict at -O3.
std::string RangeText(uint64_t begin, uint64_t length) {
  std::string text = "[";
  text.append(std::to_string(begin)).append(", ").append(std::to_string(begin + length));
  return text.append(")");
}
}  // namespace

Status CheckDiskVolumeLayout(const std::string& disk, const std::vector<VssDiskVolume>& volumes,
                             uint64_t disk_size) {
  struct Placed {
    uint64_t begin, length;
    const std::string* volume;
  };
  std::vector<Placed> placed;
  for (const auto& v : volumes) {
    const size_t total = v.extents.size() + v.extents_on_other_disks;
    if (total != 1)
      return Status::InvalidArgument(
                 "volume " + v.volume + " has " + std::to_string(total) + " extents (" +
                     std::to_string(v.extents.size()) + " on " + disk + ", " +
                     std::to_string(v.extents_on_other_disks) +
                     " on other disks): a spanned, striped or mirrored dynamic volume, whose "
                     "later extents lie at offsets inside the volume that cannot be known from "
                     "this disk alone, so " +
                     disk + " cannot be read through the volume's shadow copy",
                 "back up the volume " + v.volume + " itself (--disk " + v.volume +
                     ") instead of the physical drive " + disk)
          .InPhase("vss volumes");
    const auto& e = v.extents.front();
    if (e.length == 0)
      return Status::InvalidArgument("volume " + v.volume + " has an empty extent at offset " +
                                         std::to_string(e.disk_offset) + " of " + disk,
                                     "back up the volume " + v.volume + " itself (--disk " +
                                         v.volume + ") instead of the physical drive " + disk)
          .InPhase("vss volumes");
    if (e.length > UINT64_MAX - e.disk_offset ||
        (disk_size != 0 && e.disk_offset + e.length > disk_size))
      return Status::InvalidArgument(
                 "volume " + v.volume + " lies at " + RangeText(e.disk_offset, e.length) +
                     ", past the end of " + disk + " (" + std::to_string(disk_size) + " bytes)",
                 "the disk's layout changed during the backup (or the volume list is wrong): "
                 "run the backup again, or back up the volume " +
                     v.volume + " itself")
          .InPhase("vss volumes");
    placed.push_back({e.disk_offset, e.length, &v.volume});
  }
  std::sort(placed.begin(), placed.end(),
            [](const Placed& a, const Placed& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < placed.size(); ++i) {
    const Placed& a = placed[i - 1];
    const Placed& b = placed[i];
    if (b.begin < a.begin + a.length)
      return Status::InvalidArgument(
                 "volumes " + *a.volume + " at " + RangeText(a.begin, a.length) + " and " +
                     *b.volume + " at " + RangeText(b.begin, b.length) + " overlap on " + disk,
                 "the disk's layout changed during the backup (or the volume "
                 "list is wrong): run the backup again, or back up the "
                 "volumes themselves")
          .InPhase("vss volumes");
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// VssSnapshotSet

namespace {

// Records each call in the evidence ("calls") and keeps its Status.
class CallLog {
 public:
  explicit CallLog(json& evidence) : calls_(evidence["calls"]) {}
  Status Record(const std::string& call, Status s) {
    json c = {{"call", call}, {"ok", s.ok()}};
    if (!s.ok()) c["error"] = s.ToString();
    calls_.push_back(std::move(c));
    return s;
  }

 private:
  json& calls_;
};

json WriterJson(const VssWriterInfo& w, bool excluded) {
  return {{"name", w.name},
          {"writer_id", w.writer_id},
          {"instance_id", w.instance_id},
          {"components", w.components},
          {"excluded", excluded},
          {"statuses", json::array()},
          {"final_state", excluded ? "excluded" : ""},
          {"failed", false}};
}

}  // namespace

std::string VssSnapshotSet::DeviceFor(const std::string& volume) const {
  for (const auto& s : shadows_)
    if (s.volume == volume) return s.device_path;
  return {};
}

void VssSnapshotSet::RecordStatuses(const std::vector<VssWriterStatus>& statuses,
                                    const std::string& after) {
  json& writers = evidence_["writers"];
  for (const auto& st : statuses) {
    json* entry = nullptr;
    for (auto& w : writers)
      if (w.value("instance_id", "") == st.instance_id && w.value("writer_id", "") == st.writer_id)
        entry = &w;
    if (!entry) {  // reported by status only (it did not answer GatherWriterMetadata)
      writers.push_back(WriterJson({st.name, st.writer_id, st.instance_id, {}}, false));
      ++writer_count_;
      entry = &writers.back();
    }
    const bool failed = VssWriterStateFailed(st.state);
    json s = {{"after", after}, {"state", VssWriterStateName(st.state)}};
    if (st.failure_hr != 0) s["failure"] = VssHresultText(st.failure_hr);
    (*entry)["statuses"].push_back(s);
    (*entry)["final_state"] = VssWriterStateName(st.state);
    if (!failed) continue;
    (*entry)["failed"] = true;
    if (after == "BackupComplete" || (*entry).value("excluded", false)) continue;
    const std::string key = st.writer_id + st.instance_id;
    if (std::find(failed_keys_.begin(), failed_keys_.end(), key) != failed_keys_.end()) continue;
    failed_keys_.push_back(key);
    failed_writers_.push_back(st.name + " (" + VssWriterStateName(st.state) +
                              (st.failure_hr ? ": " + VssHresultText(st.failure_hr) : "") +
                              ", after " + after + ")");
  }
}

Result<std::unique_ptr<VssSnapshotSet>> VssSnapshotSet::Create(
    const VssFactory& factory, const std::vector<std::string>& volumes,
    const VssRequesterOptions& options, json* evidence_out) {
  std::unique_ptr<VssSnapshotSet> set(new VssSnapshotSet());
  set->options_ = options;
  json& ev = set->evidence_;
  ev = {{"backup_type", VssBackupTypeName(options.backup_type)},
        {"context", "backup"},
        {"snapshot_set_id", ""},
        {"start_attempts", 0},
        {"writers", json::array()},
        {"excluded_writers", json::array()},
        {"volumes", json::array()},
        {"calls", json::array()},
        {"completed", false},
        {"aborted", false}};
  bool started = false;
  // Every exit: on failure abort what was started, then hand out the evidence.
  auto fail = [&](Status s) -> Result<std::unique_ptr<VssSnapshotSet>> {
    s.InPhase("vss snapshot");
    ev["error"] = s.ToString();
    if (started) {
      (void)set->Finish(/*complete=*/false);
    } else {
      set->finished_ = true;  // nothing to abort or delete
    }
    if (evidence_out) *evidence_out = set->evidence_;
    return s;
  };

  if (volumes.empty())
    return fail(Status::InvalidArgument("no volume to snapshot", "name the disks to back up"));
  if (options.snapshot_timeout.count() <= 0 || options.snapshot_timeout > std::chrono::seconds(60))
    return fail(Status::InvalidArgument(
        "VSS snapshot timeout " + std::to_string(options.snapshot_timeout.count()) +
            " ms is outside (0, 60000] ms (the writers' freeze window)",
        "configure between 1 and 60 seconds"));
  if (options.async_timeout.count() <= 0 || options.start_attempts < 1)
    return fail(Status::InvalidArgument("VSS async timeout and start attempts must be positive",
                                        "fix the VSS options"));
  if (!factory) return fail(Status::Internal("no VSS factory configured"));

  // 1. Excluded writers: resolve names (and check ids) against a probe's metadata. VSS honours
  //    DisableWriterClasses only before GatherWriterMetadata, hence the separate instance.
  std::vector<std::string> excluded_ids;
  std::vector<VssWriterInfo> excluded_present;
  if (!options.excluded_writers.empty()) {
    auto probe = factory();
    if (!probe.ok()) return fail(probe.take_status());
    CallLog log(ev);
    Status s = log.Record("probe InitializeForBackup", (*probe)->InitializeForBackup());
    if (s.ok())
      s = log.Record("probe SetBackupState", (*probe)->SetBackupState(options.backup_type));
    Result<std::vector<VssWriterInfo>> meta = Status::Internal("not run");
    if (s.ok()) {
      meta = (*probe)->GatherWriterMetadata(options.async_timeout);
      s = log.Record("probe GatherWriterMetadata", meta.status());
    }
    if (!s.ok()) return fail(std::move(s));
    probe->reset();  // released before the real instance exists
    for (const auto& configured : options.excluded_writers) {
      const std::string as_id = NormalizeGuid(configured);
      json matched = json::array();
      for (const auto& w : *meta) {
        const bool match = as_id.empty() ? Lower(w.name) == Lower(configured)
                                         : NormalizeGuid(w.writer_id) == as_id;
        if (!match) continue;
        matched.push_back(w.name + " " + w.writer_id + " " + w.instance_id);
        if (std::find(excluded_ids.begin(), excluded_ids.end(), w.writer_id) == excluded_ids.end())
          excluded_ids.push_back(w.writer_id);
        if (std::none_of(excluded_present.begin(), excluded_present.end(),
                         [&](const auto& x) { return x.instance_id == w.instance_id; }))
          excluded_present.push_back(w);
      }
      ev["excluded_writers"].push_back({{"configured", configured}, {"matched", matched}});
    }
  }
  set->excluded_ids_ = excluded_ids;
  set->excluded_count_ = excluded_present.size();
  for (const auto& w : excluded_present) ev["writers"].push_back(WriterJson(w, true));

  // 2. The real instance.
  auto opened = factory();
  if (!opened.ok()) return fail(opened.take_status());
  set->vss_ = std::move(*opened);
  VssBackupComponents& vss = *set->vss_;
  CallLog log(ev);
  if (Status s = log.Record("InitializeForBackup", vss.InitializeForBackup()); !s.ok())
    return fail(std::move(s));
  if (Status s = log.Record("SetBackupState", vss.SetBackupState(options.backup_type)); !s.ok())
    return fail(std::move(s));
  if (!excluded_ids.empty())
    if (Status s = log.Record("DisableWriterClasses", vss.DisableWriterClasses(excluded_ids));
        !s.ok())
      return fail(std::move(s));
  auto meta = vss.GatherWriterMetadata(options.async_timeout);
  if (Status s = log.Record("GatherWriterMetadata", meta.status()); !s.ok())
    return fail(std::move(s));
  for (const auto& w : *meta) {
    const bool excluded =
        std::find(excluded_ids.begin(), excluded_ids.end(), w.writer_id) != excluded_ids.end();
    if (excluded) continue;  // VSS should not report disabled writers; already recorded
    ev["writers"].push_back(WriterJson(w, false));
    ++set->writer_count_;
  }

  // 3. StartSnapshotSet, retried while another set is in progress.
  auto sleep = options.sleep ? options.sleep
                             : [](std::chrono::milliseconds d) { std::this_thread::sleep_for(d); };
  std::chrono::milliseconds backoff = options.start_backoff;
  std::chrono::milliseconds waited{0};
  Result<std::string> set_id = Status::Internal("not run");
  for (int attempt = 1;; ++attempt) {
    set_id = vss.StartSnapshotSet();
    ev["start_attempts"] = attempt;
    Status s = log.Record("StartSnapshotSet", set_id.status());
    if (s.ok()) break;
    if (!s.retryable()) return fail(std::move(s));
    if (attempt >= options.start_attempts)
      return fail(Status::Unavailable("another VSS snapshot set was still in progress after " +
                                          std::to_string(attempt) + " attempts over " +
                                          std::to_string(waited.count()) +
                                          " ms (last: " + s.cause() + ")",
                                      "wait for the other backup product's shadow copy to finish "
                                      "(vssadmin list shadows), then retry the backup")
                      .InPhase("vss StartSnapshotSet"));
    sleep(backoff);
    waited += backoff;
    backoff = std::min(backoff * 2, options.start_backoff_max);
  }
  started = true;
  set->set_id_ = *set_id;
  ev["snapshot_set_id"] = set->set_id_;

  // 4. Volumes.
  std::vector<std::pair<std::string, std::string>> added;  // volume, snapshot id
  for (const auto& v : volumes) {
    auto id = vss.AddToSnapshotSet(v);
    if (Status s = log.Record("AddToSnapshotSet " + v, id.status()); !s.ok())
      return fail(std::move(s));
    added.emplace_back(v, *id);
  }

  // 5. Prepare, snapshot, with the writers' status after each.
  if (Status s = log.Record("PrepareForBackup", vss.PrepareForBackup(options.async_timeout));
      !s.ok())
    return fail(std::move(s));
  auto after_prepare = vss.GatherWriterStatus(options.async_timeout);
  if (Status s = log.Record("GatherWriterStatus", after_prepare.status()); !s.ok())
    return fail(std::move(s));
  set->RecordStatuses(*after_prepare, "PrepareForBackup");

  set->snapshot_attempted_ = true;
  Status snap = vss.DoSnapshotSet(options.snapshot_timeout);
  set->completed_at_us_ = MonotonicMicros();
  if (snap.code() == Code::kTimeout)
    snap = Status::Error(Code::kTimeout,
                         "DoSnapshotSet did not complete within the writers' freeze window (" +
                             std::to_string(options.snapshot_timeout.count()) +
                             " ms): " + snap.cause(),
                         "retry when the machine is less busy; `vssadmin list writers` shows "
                         "writers that time out")
               .InPhase("vss DoSnapshotSet");
  ev["snapshot_timeout_ms"] = options.snapshot_timeout.count();
  if (Status s = log.Record("DoSnapshotSet", snap); !s.ok()) return fail(std::move(s));
  auto after_snapshot = vss.GatherWriterStatus(options.async_timeout);
  if (Status s = log.Record("GatherWriterStatus", after_snapshot.status()); !s.ok())
    return fail(std::move(s));
  set->RecordStatuses(*after_snapshot, "DoSnapshotSet");

  // 6. Where to read.
  for (const auto& [volume, snapshot_id] : added) {
    auto props = vss.GetSnapshotProperties(snapshot_id);
    if (Status s = log.Record("GetSnapshotProperties " + volume, props.status()); !s.ok())
      return fail(std::move(s));
    if (props->device_object.empty())
      return fail(Status::IoError("VSS reported no shadow copy device for " + volume,
                                  "see the Application event log (source VSS)"));
    set->shadows_.push_back({volume, snapshot_id, props->device_object, props->original_volume});
    ev["volumes"].push_back({{"volume", volume},
                             {"snapshot_id", snapshot_id},
                             {"device", props->device_object},
                             {"original_volume", props->original_volume}});
  }
  ev["failed_writers"] = set->failed_writers_;
  if (evidence_out) *evidence_out = set->evidence_;
  return set;
}

Status VssSnapshotSet::Finish(bool complete) {
  if (finished_) return Status::Ok();
  finished_ = true;
  json& ev = evidence_;
  CallLog log(ev);
  Status first;
  auto keep = [&](Status s) {
    if (first.ok() && !s.ok()) first = std::move(s);
  };
  if (!vss_) return Status::Ok();
  if (complete) {
    keep(log.Record("BackupComplete", vss_->BackupComplete(options_.async_timeout)));
    auto statuses = vss_->GatherWriterStatus(options_.async_timeout);
    keep(log.Record("GatherWriterStatus", statuses.status()));
    if (statuses.ok()) RecordStatuses(*statuses, "BackupComplete");
    ev["completed"] = first.ok();
  } else {
    keep(log.Record("AbortBackup", vss_->AbortBackup()));
    ev["aborted"] = true;
  }
  if (!set_id_.empty() && snapshot_attempted_) {  // before DoSnapshotSet nothing exists
    auto deleted = vss_->DeleteSnapshots(set_id_);
    keep(log.Record("DeleteSnapshots", deleted.status()));
    ev["deleted"] = deleted.ok() ? *deleted : 0;
    if (!deleted.ok()) ev["delete_error"] = deleted.status().ToString();
  }
  if (!first.ok()) ev["finish_error"] = first.ToString();
  vss_.reset();
  return first;
}

Status VssSnapshotSet::Complete() {
  return Finish(true);
}
Status VssSnapshotSet::Abort() {
  return Finish(false);
}

VssSnapshotSet::~VssSnapshotSet() {
  try {
    (void)Finish(false);
  } catch (...) {  // a destructor never throws (allocation failure while recording evidence)
  }
}

}  // namespace vmsnap::platform

#include "agent/consistency.hpp"

#include <filesystem>

#include <algorithm>

namespace vmsnap::agent {
using json = nlohmann::json;

const char* ConsistencyLevelName(ConsistencyLevel level) {
  switch (level) {
    case ConsistencyLevel::kApplication:
      return "application";
    case ConsistencyLevel::kFileSystem:
      return "file-system";
    case ConsistencyLevel::kCrash:
      return "crash";
    case ConsistencyLevel::kNone:
      return "none";
    case ConsistencyLevel::kFailed:
      return "failed";
  }
  return "failed";
}

namespace {

std::string JoinNames(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

LevelDecision ComputeConsistencyLevel(const ConsistencyFacts& f) {
  auto fail_or_none = [&](std::string why) {
    if (f.allow_none)
      return LevelDecision{ConsistencyLevel::kNone, why + "; none-consistency read allowed"};
    return LevelDecision{ConsistencyLevel::kFailed, std::move(why)};
  };
  if (f.pre_failure_fatal)
    return {ConsistencyLevel::kFailed,
            "a pre script failed and its policy does not allow continuing the backup"};
  if (f.vss_used) {
    if (!f.snapshot_taken) return fail_or_none("no VSS shadow copy could be created");
    if (!f.vss_failed_writers.empty())
      return {ConsistencyLevel::kFileSystem,
              "the VSS shadow copy succeeded but VSS writers failed: " +
                  JoinNames(f.vss_failed_writers)};
    if (!f.vss_excluded_writers.empty())
      return {ConsistencyLevel::kFileSystem,
              "the VSS shadow copy succeeded; VSS writers excluded by configuration: " +
                  JoinNames(f.vss_excluded_writers)};
    if (f.scripts_configured && !f.pre_scripts_all_ok)
      return {ConsistencyLevel::kFileSystem,
              "the VSS shadow copy succeeded and every VSS writer stayed stable, but a pre "
              "script failed"};
    if (f.vss_writers_total == 0)
      return {ConsistencyLevel::kFileSystem,
              "the VSS shadow copy succeeded but no VSS writer took part"};
    return {ConsistencyLevel::kApplication,
            "every VSS writer (" + std::to_string(f.vss_writers_total) +
                ") stayed stable through PrepareForBackup and DoSnapshotSet and the shadow copy "
                "succeeded"};
  }
  if (!f.snapshot_taken) return fail_or_none("no snapshot could be taken");
  if (f.deadline_hit)
    return fail_or_none("the freeze deadline forced a thaw before the snapshot was confirmed");
  const bool all_frozen =
      f.freeze_attempted && f.filesystems_total > 0 && f.filesystems_frozen == f.filesystems_total;
  if (all_frozen && f.snapshot_point_in_time && f.snapshot_before_thaw) {
    if (f.scripts_configured && f.pre_scripts_all_ok)
      return {ConsistencyLevel::kApplication,
              "every pre script succeeded, every filesystem was frozen and the snapshot "
              "completed before the thaw"};
    return {ConsistencyLevel::kFileSystem,
            f.scripts_configured
                ? "every filesystem was frozen and snapshotted in time, but a pre script failed"
                : "every filesystem was frozen and snapshotted in time; no pre scripts are "
                  "configured"};
  }
  if (f.snapshot_point_in_time && (f.snapshot_atomic || f.disk_count <= 1))
    return {ConsistencyLevel::kCrash,
            f.filesystems_total == 0 ? "point-in-time snapshot; no mounted filesystem to freeze"
                                     : "point-in-time snapshot without a complete freeze"};
  if (f.snapshot_point_in_time)
    return fail_or_none(
        "several disks were snapshotted one after another without a freeze, "
        "so they are not consistent with each other");
  if (f.guarded_read && (f.disk_count == 1 || f.every_disk_guarded))
    return {ConsistencyLevel::kCrash,
            f.disk_count == 1 ? "guarded read of a single image file (valid only if its identity "
                                "is unchanged after the read)"
                              : "guarded read of image files (valid only if every identity is "
                                "unchanged over one window covering all the reads)"};
  if (f.guarded_read)
    return fail_or_none(
        "some disks were snapshotted and others read live, so they are not consistent with "
        "each other");
  return fail_or_none("several disks read live cannot be consistent with each other");
}

Status ConsistentView::Release(bool transfer_done) {
  Status s;
  if (snapshot_) {
    s = snapshot_->Delete();
    snapshot_.reset();
  }
  if (vss_) {
    Status v = transfer_done ? vss_->Complete() : vss_->Abort();
    try {
      evidence_["vss"] = vss_->evidence();
    } catch (...) {  // never throws (called from the destructor): the evidence stays as it was
    }
    vss_.reset();
    if (s.ok()) s = std::move(v);
  }
  return s;
}

bool UsesVss(const ConsistencyOptions& options) {
  if (options.snapshot.provider == "vss") return true;
  if (options.snapshot.provider != "auto") return false;
  return std::any_of(options.disks.begin(), options.disks.end(), [](const std::string& d) {
    return !platform::VolumeNameOfDisk(d).empty() || platform::IsPhysicalDrivePath(d);
  });
}

// The VSS path: pre scripts -> VSS snapshot set -> post scripts, level from the writers.
Result<ConsistentView> PrepareVssView(const ConsistencyOptions& options, json* evidence_out) {
  json evidence = {{"disks", json::array()},
                   {"scripts", json::array()},
                   {"filesystems", json::array()},
                   {"freeze",
                    {{"enabled", false},
                     {"attempted", false},
                     {"why_not",
                      "VSS: the writers freeze their applications and the "
                      "VSS provider flushes and holds writes"}}},
                   {"snapshot", {{"provider", "vss"}, {"ok", false}}},
                   {"vss", json::object()}};
  auto finish = [&](Status s) -> Result<ConsistentView> {
    if (!s.ok()) {
      evidence["level"] = "failed";
      evidence["error"] = s.ToString();
    }
    if (evidence_out) *evidence_out = evidence;
    return s;
  };

  if (options.disks.empty())
    return finish(Status::InvalidArgument("no disks given", "name the disks to back up")
                      .InPhase("consistency"));

  // 1. Disks -> volumes (no OS call for volumes; physical drives ask the system).
  struct DiskVolumes {
    std::string disk;
    std::vector<platform::VssDiskVolume> volumes;  // a volume disk: one, without extents
  };
  std::vector<DiskVolumes> plan;
  std::vector<std::string> volumes;
  for (const auto& d : options.disks) {
    DiskVolumes dv{d, {}};
    if (std::string v = platform::VolumeNameOfDisk(d); !v.empty()) {
      dv.volumes.push_back({v, {}});
    } else if (platform::IsPhysicalDrivePath(d)) {
      if (!options.reader_composes_volume_shadows)
        return finish(Status::InvalidArgument(
                          "physical drive " + d +
                              " would have to be read through its volumes' shadow copies, "
                              "which this backup reader does not do yet",
                          "back up the volumes instead (\\\\.\\C: ...)")
                          .InPhase("consistency"));
      auto found =
          options.vss_disk_volumes
              ? options.vss_disk_volumes(d)
              : Result<std::vector<platform::VssDiskVolume>>(Status::Internal("no volume lister"));
      if (!found.ok()) return finish(found.take_status());
      if (found->empty())
        return finish(Status::InvalidArgument(
                          "physical drive " + d + " holds no Windows volume VSS could snapshot",
                          "back up this disk with its VM powered off")
                          .InPhase("consistency"));
      // Refused before any snapshot: a volume the reader could not compose (spanned, ...).
      if (Status layout = platform::CheckDiskVolumeLayout(d, *found, 0); !layout.ok())
        return finish(std::move(layout));
      dv.volumes = std::move(*found);
    } else {
      return finish(Status::InvalidArgument(
                        "the vss snapshot provider covers Windows volumes and physical drives, "
                        "not " +
                            d,
                        "name volumes (\\\\.\\C:) or physical drives (\\\\.\\PhysicalDrive0), or "
                        "back up image files with the file provider")
                        .InPhase("consistency"));
    }
    for (const auto& v : dv.volumes)
      if (std::find(volumes.begin(), volumes.end(), v.volume) == volumes.end())
        volumes.push_back(v.volume);
    plan.push_back(std::move(dv));
  }

  // 2. Pre scripts (the same hooks and report fields as on Linux).
  ScriptHooks hooks = ScriptHooks::Load(options.hooks);
  PreScriptsOutcome pre = hooks.RunPre();
  if (!pre.continue_backup) {
    hooks.RunPost();
    evidence["scripts"] = hooks.ToJson();
    return finish(Status::Error(Code::kIoError, "pre script failed: " + pre.failure_summary,
                                "fix the script, or allow the backup to continue on failure "
                                "(continueBackupOnFailure)")
                      .InPhase("pre scripts"));
  }

  // 3. The snapshot set; 4. post scripts whatever happened.
  json vss_evidence;
  auto set =
      platform::VssSnapshotSet::Create(options.vss_factory, volumes, options.vss, &vss_evidence);
  hooks.RunPost();
  evidence["scripts"] = hooks.ToJson();
  evidence["vss"] = vss_evidence;

  // 5. Level from the evidence.
  ConsistencyFacts facts;
  facts.disk_count = options.disks.size();
  facts.scripts_configured = pre.any_configured;
  facts.pre_scripts_all_ok = pre.all_succeeded;
  facts.allow_none = options.allow_none;
  facts.vss_used = true;
  json& snap_ev = evidence["snapshot"];
  snap_ev["ok"] = set.ok();
  if (set.ok()) {
    const auto& s = **set;
    facts.snapshot_taken = true;
    facts.snapshot_point_in_time = true;
    facts.snapshot_atomic = true;  // one snapshot set: every volume at one instant
    facts.snapshot_before_thaw = true;
    facts.vss_writers_total = s.writer_count();
    facts.vss_failed_writers = s.failed_writers();
    for (const auto& w : vss_evidence.value("writers", json::array()))
      if (w.value("excluded", false))
        facts.vss_excluded_writers.push_back(w.value("name", "") + " " + w.value("writer_id", ""));
    snap_ev["atomic"] = true;
    snap_ev["snapshot_set_id"] = s.snapshot_set_id();
  } else {
    snap_ev["error"] = set.status().ToString();
  }
  LevelDecision decision = ComputeConsistencyLevel(facts);
  evidence["level"] = ConsistencyLevelName(decision.level);
  evidence["reason"] = decision.reason;
  if (decision.level == ConsistencyLevel::kFailed) {
    Status cause = set.ok() ? Status::Error(Code::kConflict, decision.reason) : set.take_status();
    return finish(
        Status::Error(
            cause.code(),
            "no consistent view of the disks: " + decision.reason + " (" + cause.ToString() + ")",
            cause.fix().empty() ? "pass --allow-inconsistent to accept a live read with "
                                  "consistency none"
                                : cause.fix() + "; or pass --allow-inconsistent to accept a live "
                                                "read with consistency none")
            .InPhase("consistency"));
  }

  ConsistentView view;
  view.level_ = decision.level;
  if (set.ok()) {
    const platform::VssSnapshotSet& s = **set;
    for (const auto& dv : plan) {
      DiskToRead r{dv.disk, dv.disk, false, {}};
      json vols = json::array();
      const bool physical = platform::IsPhysicalDrivePath(dv.disk);
      for (const auto& v : dv.volumes) {
        const std::string device = s.DeviceFor(v.volume);
        json vol = {{"volume", v.volume}, {"device", device}};
        if (physical) {
          r.volume_shadows.push_back({v.volume, device, v.extents, v.extents_on_other_disks});
          json extents = json::array();
          for (const auto& e : v.extents)
            extents.push_back({{"disk_offset", e.disk_offset}, {"length", e.length}});
          vol["extents"] = extents;
          vol["point_in_time"] = true;
        } else {
          r.read_path = device;
        }
        vols.push_back(std::move(vol));
      }
      // A physical drive is point in time only inside its volumes; the reader adds the ranges
      // it reads live ("live_ranges", "live_bytes": see RunBackup).
      evidence["disks"].push_back(
          {{"disk", r.disk},
           {"read_path", r.read_path},
           {"provider", "vss"},
           {"point_in_time", !physical},
           {"volumes", vols},
           {"note", physical ? "volumes from their shadow copies (point in time), the rest from "
                               "the disk (live): partition tables, gaps and partitions without a "
                               "snapshotted volume (EFI system, MSR, FAT)"
                             : ""}});
      view.disks_.push_back(std::move(r));
    }
    view.vss_ = std::move(*set);
  } else {  // kNone: the operator allowed reading the live disks
    for (const auto& d : options.disks) {
      view.disks_.push_back({d, d, false, {}});
      evidence["disks"].push_back({{"disk", d}, {"read_path", d}, {"provider", "none"}});
    }
  }
  view.evidence_ = evidence;
  if (evidence_out) *evidence_out = evidence;
  return view;
}

Result<ConsistentView> PrepareConsistentView(const ConsistencyOptions& options,
                                             json* evidence_out) {
  if (UsesVss(options)) return PrepareVssView(options, evidence_out);
  json evidence = {{"disks", json::array()},
                   {"scripts", json::array()},
                   {"filesystems", json::array()},
                   {"freeze", json::object()},
                   {"snapshot", json::object()}};
  auto finish = [&](Status s) -> Result<ConsistentView> {
    if (!s.ok()) {
      evidence["level"] = "failed";
      evidence["error"] = s.ToString();
    }
    if (evidence_out) *evidence_out = evidence;
    return s;
  };
  if (options.disks.empty())
    return finish(Status::InvalidArgument("no disks given", "name the disks to back up")
                      .InPhase("consistency"));
  if (options.freeze_deadline.count() <= 0 ||
      options.freeze_deadline > platform::kMaxFreezeDeadline)
    return finish(Status::InvalidArgument("freeze deadline " +
                                              std::to_string(options.freeze_deadline.count()) +
                                              " ms is outside (0, 60000] ms",
                                          "configure between 1 and 60 seconds")
                      .InPhase("consistency"));

  // 1. Discover.
  auto found = platform::DiscoverFilesystems(options.disks, options.discovery);
  if (!found.ok()) return finish(found.take_status());
  std::vector<platform::MountedFilesystem> freezable;
  for (const auto& m : *found)
    if (m.freezable) freezable.push_back(m);

  // 2. Pre scripts.
  ScriptHooks hooks = ScriptHooks::Load(options.hooks);
  PreScriptsOutcome pre = hooks.RunPre();
  auto record_scripts = [&] { evidence["scripts"] = hooks.ToJson(); };
  if (!pre.continue_backup) {
    hooks.RunPost();
    record_scripts();
    return finish(Status::Error(Code::kIoError, "pre script failed: " + pre.failure_summary,
                                "fix the script, or allow the backup to continue on failure "
                                "(continueBackupOnFailure)")
                      .InPhase("pre scripts"));
  }

  // 3. Freeze.
  std::unique_ptr<platform::FreezeSession> session;
  json& freeze_ev = evidence["freeze"];
  const bool freeze_wanted = pre.fs_freeze_enabled && !freezable.empty();
  freeze_ev = {{"enabled", pre.fs_freeze_enabled},
               {"attempted", freeze_wanted},
               {"deadline_ms", options.freeze_deadline.count()},
               {"deadline_hit", false}};
  if (freeze_wanted) {
    platform::FreezeOptions fo;
    fo.guard_binary = options.guard_binary;
    fo.runtime_dir = options.runtime_dir;
    fo.deadline = options.freeze_deadline;
    fo.only_under = options.freeze_only_under;
    auto started = platform::FreezeSession::Start(freezable, fo);
    if (started.ok()) {
      session = std::move(*started);
    } else {
      freeze_ev["error"] = started.status().ToString();
      if (started.status().code() == Code::kPermissionDenied ||
          started.status().code() == Code::kInvalidArgument) {
        hooks.RunPost();
        record_scripts();
        return finish(started.take_status());
      }
    }
  }

  // 4. Snapshot, inside the freeze window.
  const auto snapshot_deadline =
      session ? session->deadline()
              : std::chrono::steady_clock::now() + options.snapshot.command_timeout;
  auto snap = platform::TakeSnapshot(options.disks, options.snapshot, snapshot_deadline);

  // 5. Thaw, then post scripts (whatever happened).
  Status thaw_status;
  std::vector<platform::FilesystemFreezeReport> reports;
  bool deadline_hit = false;
  int64_t first_thaw_us = 0;
  if (session) {
    thaw_status = session->Thaw();
    reports = session->Filesystems();
    deadline_hit = session->deadline_hit();
    first_thaw_us = session->first_thaw_us();
  }
  if (!snap.ok() && snap.status().code() == Code::kTimeout && session) deadline_hit = true;
  hooks.RunPost();
  record_scripts();

  // 6. Evidence.
  size_t frozen_count = 0;
  double window_ms = 0;
  for (const auto& m : *found) {
    json f = {{"mount_point", m.mount_point},
              {"type", m.fs_type},
              {"disk", m.disk},
              {"source", m.source},
              {"other_mount_points", m.other_mount_points},
              {"frozen", false},
              {"why_not", m.freezable ? "" : m.why_not_freezable}};
    if (m.freezable && !pre.fs_freeze_enabled) f["why_not"] = "fsFreezeEnabled is false";
    auto r = std::find_if(reports.begin(), reports.end(),
                          [&](const auto& x) { return x.mount_point == m.mount_point; });
    if (r != reports.end()) {
      f["frozen"] = r->frozen;
      if (!r->frozen) f["why_not"] = r->why_not.empty() ? "not frozen" : r->why_not;
      f["window_ms"] = r->window_ms();
      f["thawed_by"] = r->thawed_by;
      if (!r->thaw_error.empty()) f["thaw_error"] = r->thaw_error;
      if (r->frozen) ++frozen_count;
      window_ms = std::max(window_ms, r->window_ms());
    } else if (m.freezable && freeze_wanted && f["why_not"] == "") {
      f["why_not"] = "the freeze did not start";
    }
    evidence["filesystems"].push_back(f);
  }
  freeze_ev["deadline_hit"] = deadline_hit;
  freeze_ev["window_ms"] = window_ms;
  if (!thaw_status.ok()) freeze_ev["thaw_error"] = thaw_status.ToString();

  json& snap_ev = evidence["snapshot"];
  snap_ev = {{"provider", options.snapshot.provider}, {"ok", snap.ok()}};
  ConsistencyFacts facts;
  facts.disk_count = options.disks.size();
  facts.scripts_configured = pre.any_configured;
  facts.pre_scripts_all_ok = pre.all_succeeded;
  facts.freeze_attempted = session != nullptr;
  facts.filesystems_total = found->size();
  facts.filesystems_frozen = frozen_count;
  facts.deadline_hit = deadline_hit;
  facts.allow_none = options.allow_none;
  if (snap.ok()) {
    const auto& s = **snap;
    facts.snapshot_taken = true;
    facts.snapshot_atomic = s.atomic();
    facts.snapshot_point_in_time = std::all_of(s.disks().begin(), s.disks().end(),
                                               [](const auto& d) { return d.point_in_time; });
    facts.guarded_read = !facts.snapshot_point_in_time;
    facts.every_disk_guarded = std::none_of(s.disks().begin(), s.disks().end(),
                                            [](const auto& d) { return d.point_in_time; });
    facts.snapshot_before_thaw =
        session && (first_thaw_us == 0 || s.completed_at_us() < first_thaw_us);
    snap_ev["atomic"] = s.atomic();
    snap_ev["completed_before_thaw"] = facts.snapshot_before_thaw;
    for (const auto& d : s.disks())
      evidence["disks"].push_back({{"disk", d.disk},
                                   {"read_path", d.read_path},
                                   {"provider", d.provider},
                                   {"point_in_time", d.point_in_time},
                                   {"note", d.note}});
  } else {
    snap_ev["error"] = snap.status().ToString();
  }
  LevelDecision decision = ComputeConsistencyLevel(facts);
  if (!thaw_status.ok()) decision = {ConsistencyLevel::kFailed, "a thaw could not be confirmed"};
  evidence["level"] = ConsistencyLevelName(decision.level);
  evidence["reason"] = decision.reason;

  if (!thaw_status.ok()) return finish(thaw_status);
  if (decision.level == ConsistencyLevel::kFailed) {
    Status cause = snap.ok() ? Status::Error(Code::kConflict, decision.reason) : snap.take_status();
    return finish(
        Status::Error(cause.code(),
                      "no consistent view of the disks: " + decision.reason +
                          (cause.cause() == decision.reason ? "" : " (" + cause.ToString() + ")"),
                      "configure a snapshot provider that covers these disks (vmsnap-agent "
                      "backup --snapshot ...), or pass --allow-inconsistent to accept a live "
                      "read with consistency none")
            .InPhase("consistency"));
  }

  ConsistentView view;
  view.level_ = decision.level;
  if (snap.ok()) {
    for (const auto& d : (*snap)->disks())
      view.disks_.push_back({d.disk, d.read_path, !d.point_in_time});
    view.snapshot_ = std::move(*snap);
  } else {  // kNone: the operator allowed reading the live disks
    for (const auto& d : options.disks) view.disks_.push_back({d, d, false});
    evidence["disks"] = json::array();
    for (const auto& d : options.disks)
      evidence["disks"].push_back({{"disk", d}, {"read_path", d}, {"provider", "none"}});
  }
  view.evidence_ = evidence;
  if (evidence_out) *evidence_out = evidence;
  return view;
}

// Where vmsnap-freeze-guard is: next to this binary (the build tree), in ../libexec/vmsnap
// relative to it (an install prefix), else the packaged path.
std::string DefaultFreezeGuardPath() {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (const fs::path& candidate :
         {self.parent_path() / "vmsnap-freeze-guard",
          self.parent_path().parent_path() / "libexec/vmsnap/vmsnap-freeze-guard"})
      if (fs::is_regular_file(candidate, ec)) return candidate.string();
  }
  return "/usr/libexec/vmsnap/vmsnap-freeze-guard";
}

}  // namespace vmsnap::agent

// The consistency engine's orchestration (issue 3): for the disks of one backup,
//   discover filesystems -> pre scripts -> freeze -> snapshot -> thaw -> post scripts,
// and the consistency level computed from what actually happened (the evidence).
//
// Windows volumes and physical drives (issue 8) take the VSS path instead (snapshot provider
// "vss", or "auto" when a disk is "\\.\C:", "\\?\Volume{...}" or "\\.\PhysicalDriveN"):
//   pre scripts -> VSS snapshot set (writers freeze, the provider flushes and holds writes,
//   shadow copies) -> post scripts; the caller reads the shadow copy devices; Cleanup() then
//   completes the VSS backup (BackupComplete) and deletes the shadow copies. Destroying the
//   view without Cleanup() aborts the VSS backup (AbortBackup) and deletes them.
//
// Use from the backup pipeline:
//   nlohmann::json evidence;
//   auto view = PrepareConsistentView(options, &evidence);   // before opening any disk
//   if (!view.ok()) -> fail the backup with view.status(); `evidence` says why.
//   for each view->disks()[i]: read disks()[i].read_path instead of the disk (same order as
//     options.disks); when guarded_read is true compare the file's identity before/after
//     (unchanged: keep the level, changed: retry or fail).
//   report.consistency = view->level_name(); report.evidence = view->evidence();
//   view->Cleanup() once every block was read (the destructor does it too).
//
// Every path is configurable (tests use their own). Not thread-safe; one call per backup.
// Whatever fails, nothing is left frozen and every hook whose freeze call ran gets its thaw.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "agent/hooks.hpp"
#include "common/status.hpp"
#include "platform/env.hpp"
#include "platform/quiesce.hpp"
#include "platform/snapshot.hpp"
#include "platform/vss.hpp"

namespace vmsnap::agent {

enum class ConsistencyLevel { kApplication, kFileSystem, kCrash, kNone, kFailed };

// "application", "file-system", "crash", "none", "failed".
const char* ConsistencyLevelName(ConsistencyLevel level);

// The facts the level is computed from (filled by PrepareConsistentView from evidence).
struct ConsistencyFacts {
  size_t disk_count = 0;
  bool scripts_configured = false;  // at least one pre/freeze script configured
  bool pre_scripts_all_ok = false;  // every configured pre/freeze script exited 0
  bool pre_failure_fatal = false;   // a pre script failed and its policy forbids continuing
  bool freeze_attempted = false;
  size_t filesystems_total = 0;  // mounted filesystems on the disks, any type
  size_t filesystems_frozen = 0;
  bool snapshot_taken = false;
  bool snapshot_point_in_time = false;  // every disk is a real snapshot (no guarded read)
  bool snapshot_atomic = false;         // all disks at one instant (a single disk always is)
  bool snapshot_before_thaw = false;    // the snapshot completed before any filesystem thawed
  bool deadline_hit = false;            // a thaw was forced by the deadline
  bool guarded_read = false;            // a disk is read live, guarded by its identity
  // Every disk is a guarded read: the backup checks all identities over one window that
  // covers every read (all "before" first, all "after" last), so unchanged files were read
  // as they were at one instant.
  bool every_disk_guarded = false;
  bool allow_none = false;  // the operator allows a none-consistency read
  // VSS (Windows): a VSS snapshot set was attempted (the freeze facts above do not apply).
  bool vss_used = false;
  size_t vss_writers_total = 0;                   // writers that took part (not excluded)
  std::vector<std::string> vss_failed_writers;    // "Name (state: failure, after Call)"
  std::vector<std::string> vss_excluded_writers;  // excluded by configuration and present
};

struct LevelDecision {
  ConsistencyLevel level = ConsistencyLevel::kFailed;
  std::string reason;  // one sentence: why this level and not a better one
};

// application: every configured pre script succeeded (at least one configured), every
//   filesystem on the disks was frozen, the snapshot completed before any thaw.
// file-system: the same freeze and snapshot, but scripts absent or failed (continue allowed).
// crash: a point-in-time snapshot without (complete) freezing; several disks only if atomic;
//   or guarded reads of image files only (the reader must verify that every file was
//   unchanged over one window covering all reads); a mix of snapshots and guarded reads is not.
// Otherwise failed, or none when allow_none. A fatal pre-script failure is always failed.
// VSS (vss_used): application when the shadow copy succeeded, at least one writer took part,
//   no writer was excluded, every writer stayed out of the failed states after
//   PrepareForBackup and DoSnapshotSet, and no configured pre script failed; file-system when
//   the shadow copy succeeded otherwise (the failed or excluded writers named in the reason);
//   no shadow copy: failed, or none when allow_none.
LevelDecision ComputeConsistencyLevel(const ConsistencyFacts& facts);

struct ConsistencyOptions {
  std::vector<std::string> disks;  // block devices or image files, as the backup names them
  HookOptions hooks;
  std::string runtime_dir = platform::DefaultAgentPaths().runtime_dir;
  std::chrono::milliseconds freeze_deadline = platform::kDefaultFreezeDeadline;  // <= 60 s
  std::string guard_binary = "/usr/libexec/vmsnap/vmsnap-freeze-guard";
  platform::SnapshotOptions snapshot;  // provider choice ("auto" by default)
  bool allow_none = false;             // no snapshot possible: read the live disks as `none`
  std::vector<std::string> freeze_only_under;  // safety restriction (tests)
  platform::DiscoveryOptions discovery;
  // VSS: backup type (copy by default), excluded writers, timeouts, StartSnapshotSet retries.
  platform::VssRequesterOptions vss;
  // Opens the system's VSS; tests inject a fake. Called by the VSS path only.
  platform::VssFactory vss_factory = &platform::OpenSystemVss;
  // The volumes of a physical drive (VSS path, "\\.\PhysicalDriveN").
  std::function<Result<std::vector<platform::VssDiskVolume>>(const std::string&)> vss_disk_volumes =
      &platform::VolumesOnDisk;
  // A physical drive is read through its volumes' shadow copies plus the disk itself outside
  // them (DiskToRead::volume_shadows; RunBackup composes them with ComposedDiskReader,
  // agent/composed_disk_reader.hpp). A caller whose reader reads only read_path sets this to
  // false: physical drives are then refused on the VSS path rather than read live.
  bool reader_composes_volume_shadows = true;
};

// True when `options` take the VSS path (provider "vss", or "auto" with a Windows volume or
// physical drive among the disks).
bool UsesVss(const ConsistencyOptions& options);

// A volume's shadow copy, and where the volume lies on its physical drive.
struct VolumeShadowToRead {
  std::string volume;                                    // "\\?\Volume{...}\"
  std::string device_path;                               // the shadow copy device
  std::vector<platform::VssDiskVolume::Extent> extents;  // on the disk
  uint32_t extents_on_other_disks = 0;                   // as platform::VssDiskVolume
};

struct DiskToRead {
  std::string disk;       // as in ConsistencyOptions::disks
  std::string read_path;  // the snapshot to read (or the disk itself for guarded/none reads)
  bool guarded_read = false;
  // VSS, physical drives only: read these ranges from the shadow devices, the rest of the
  // disk (partition tables, gaps, partitions without a snapshotted volume) from read_path (the
  // disk itself, live). Every volume has exactly one extent (platform::CheckDiskVolumeLayout
  // passed before the snapshot).
  std::vector<VolumeShadowToRead> volume_shadows;
};

// The result of a successful preparation: what to read, the level and its evidence. Owns the
// snapshot: Cleanup() (or the destructor) deletes it. Movable, not copyable.
class ConsistentView {
 public:
  ConsistentView() = default;
  ConsistentView(ConsistentView&&) noexcept = default;
  ConsistentView& operator=(ConsistentView&&) noexcept = default;
  ~ConsistentView() { (void)Release(/*transfer_done=*/false); }

  const std::vector<DiskToRead>& disks() const { return disks_; }
  ConsistencyLevel level() const { return level_; }
  const char* level_name() const { return ConsistencyLevelName(level_); }
  const nlohmann::json& evidence() const { return evidence_; }
  // Call once every block was read: deletes the snapshot; for VSS completes the backup
  // (BackupComplete, writer status after it in evidence()["vss"], shadow copies deleted).
  // Idempotent.
  Status Cleanup() { return Release(/*transfer_done=*/true); }

 private:
  friend Result<ConsistentView> PrepareConsistentView(const ConsistencyOptions&, nlohmann::json*);
  friend Result<ConsistentView> PrepareVssView(const ConsistencyOptions&, nlohmann::json*);
  std::vector<DiskToRead> disks_;
  ConsistencyLevel level_ = ConsistencyLevel::kFailed;
  nlohmann::json evidence_;
  std::unique_ptr<platform::Snapshot> snapshot_;
  std::unique_ptr<platform::VssSnapshotSet> vss_;

  // Deletes the snapshot; VSS: BackupComplete when the transfer is done, else AbortBackup.
  Status Release(bool transfer_done);
};

// Runs the whole sequence. Fails (Status naming the phase, cause and fix) when the level is
// "failed"; `evidence_out`, when given, receives the evidence in every case.
Result<ConsistentView> PrepareConsistentView(const ConsistencyOptions& options,
                                             nlohmann::json* evidence_out = nullptr);

// Where vmsnap-freeze-guard is: next to the running binary (the build tree), in
// ../libexec/vmsnap relative to it (an install prefix), else the packaged path.
std::string DefaultFreezeGuardPath();

}  // namespace vmsnap::agent

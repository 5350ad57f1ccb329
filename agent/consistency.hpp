// The consistency engine's orchestration (issue 3): for the disks of one backup,
//   discover filesystems -> pre scripts -> freeze -> snapshot -> thaw -> post scripts,
// and the consistency level computed from what actually happened (the evidence).
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
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "agent/hooks.hpp"
#include "common/status.hpp"
#include "platform/quiesce.hpp"
#include "platform/snapshot.hpp"

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
LevelDecision ComputeConsistencyLevel(const ConsistencyFacts& facts);

struct ConsistencyOptions {
  std::vector<std::string> disks;  // block devices or image files, as the backup names them
  HookOptions hooks;
  std::string runtime_dir = platform::kDefaultRuntimeDir;
  std::chrono::milliseconds freeze_deadline = platform::kDefaultFreezeDeadline;  // <= 60 s
  std::string guard_binary = "/usr/libexec/vmsnap/vmsnap-freeze-guard";
  platform::SnapshotOptions snapshot;  // provider choice ("auto" by default)
  bool allow_none = false;             // no snapshot possible: read the live disks as `none`
  std::vector<std::string> freeze_only_under;  // safety restriction (tests)
  platform::DiscoveryOptions discovery;
};

struct DiskToRead {
  std::string disk;       // as in ConsistencyOptions::disks
  std::string read_path;  // the snapshot to read (or the disk itself for guarded/none reads)
  bool guarded_read = false;
};

// The result of a successful preparation: what to read, the level and its evidence. Owns the
// snapshot: Cleanup() (or the destructor) deletes it. Movable, not copyable.
class ConsistentView {
 public:
  ConsistentView() = default;
  ConsistentView(ConsistentView&&) noexcept = default;
  ConsistentView& operator=(ConsistentView&&) noexcept = default;
  ~ConsistentView() { (void)Cleanup(); }

  const std::vector<DiskToRead>& disks() const { return disks_; }
  ConsistencyLevel level() const { return level_; }
  const char* level_name() const { return ConsistencyLevelName(level_); }
  const nlohmann::json& evidence() const { return evidence_; }
  // Deletes the snapshot. Idempotent.
  Status Cleanup();

 private:
  friend Result<ConsistentView> PrepareConsistentView(const ConsistencyOptions&, nlohmann::json*);
  std::vector<DiskToRead> disks_;
  ConsistencyLevel level_ = ConsistencyLevel::kFailed;
  nlohmann::json evidence_;
  std::unique_ptr<platform::Snapshot> snapshot_;
};

// Runs the whole sequence. Fails (Status naming the phase, cause and fix) when the level is
// "failed"; `evidence_out`, when given, receives the evidence in every case.
Result<ConsistentView> PrepareConsistentView(const ConsistencyOptions& options,
                                             nlohmann::json* evidence_out = nullptr);

// Where vmsnap-freeze-guard is: next to the running binary (the build tree), in
// ../libexec/vmsnap relative to it (an install prefix), else the packaged path.
std::string DefaultFreezeGuardPath();

}  // namespace vmsnap::agent

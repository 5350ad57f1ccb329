// The backup job: read every disk in parallel, find changed blocks, upload only what the
// vault is missing, publish a recovery point, report (docs/ARCHITECTURE.md, "Backup").
//
// Pipeline: W worker threads take segments of all disks interleaved (so every disk advances
// at once); per block they skip holes without reading, drop all-zero blocks, compare an XXH3
// hash with the local state (or the SHA-256 with the vault's block map when the state is not
// usable), and only for changed blocks compute SHA-256 and zstd. Encoded blocks go through a
// queue bounded in bytes to U uploader threads, each with its own keep-alive connection, which
// ask the vault which ids are missing and send only those, in batches. The recovery point is
// committed only after every block is stored; then the local state is updated.
//
// Consistency (docs/ARCHITECTURE.md, "Consistency"): after planning, under the runtime dir's
// lock, a leftover freeze of an interrupted backup is thawed (and reported), then the
// consistency engine runs pre scripts, freezes the filesystems on the disks, snapshots the
// disks and thaws (agent/consistency.hpp). The pipeline reads the snapshot, while the vault
// and the local state keep identifying each disk by its original path. No snapshot provider
// for a disk fails the backup unless a `none`-consistency live read is explicitly allowed.
// The snapshot is deleted after the transfer, whatever happened. A Windows physical drive
// (\\.\PhysicalDriveN) is read through its volumes' VSS shadow copies and the disk itself
// outside them (agent/composed_disk_reader.hpp); the evidence of that disk lists the volumes
// with their extents and the ranges read live ("live_ranges", "live_bytes").
//
// Failure: any error stops all threads, nothing is committed (the vault never lists the
// session), the local state is left as it was, and the Status names the phase, cause and fix.
// Running the same backup again uploads only what the vault is still missing.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "agent/consistency.hpp"
#include "agent/vault_client.hpp"
#include "common/block_codec.hpp"
#include "common/https_client.hpp"
#include "common/status.hpp"
#include "platform/env.hpp"

namespace vmsnap::agent {

struct BackupOptions {
  ClientOptions client;
  std::string item;                // the protected machine's name in the vault
  std::vector<std::string> disks;  // block devices or image files
  // 0: the block size of the machine's latest recovery point (so an incremental stays
  // incremental), or kDefaultBlockSize when it has none. Another size forces a full backup.
  uint32_t block_size = 0;
  std::string state_dir = platform::DefaultAgentPaths().state_dir;
  int workers = 0;  // 0: one per core
  int uploaders = 2;
  uint64_t max_rate_bytes_per_s = 0;  // 0: unlimited
  // How often the agent tells the vault that its backup is still running: a vault that hears
  // nothing for 5 intervals takes the agent as gone and stops holding cleanup back for it.
  std::chrono::seconds session_keepalive{60};
  uint64_t batch_bytes = 8ull << 20;   // upload batch size
  uint64_t queue_bytes = 32ull << 20;  // encoded data in flight, bounds memory
  // A manifest larger than this goes to the vault in parts of about this size (each part is
  // one request, below the vault's 96 MiB limit); smaller ones in one request.
  uint64_t manifest_part_bytes = 32ull << 20;
  // Entries per request when the vault's block map of the parent is read (the incremental
  // without local state): 1 Mi entries are about 57 MB.
  uint64_t map_page_entries = kMapPageEntries;
  bool progress = true;  // progress lines on stderr for long jobs
  // Set by another thread to stop at the next safe point: nothing is committed and the job
  // ends with kCancelled. Not owned; may be null.
  const std::atomic<bool>* cancel = nullptr;
  // Called from the calling thread about once a second with {"phase", "bytes_done",
  // "bytes_total", "bytes_uploaded"}. May be empty.
  std::function<void(const nlohmann::json&)> on_progress;
  nlohmann::json origin;  // sent with the commit: {"job", "trigger", "retain_until_ms"}
  // How to get a consistent view of the disks: hooks, Azure config, runtime dir, freeze
  // deadline, guard binary, snapshot provider, allow_none, freeze_only_under. Its `disks`
  // field is ignored (the backup's `disks` are used).
  ConsistencyOptions consistency;
  // How long to wait for another agent's consistency step on the same runtime dir.
  std::chrono::milliseconds runtime_lock_wait{std::chrono::minutes(5)};
};

struct DiskReport {
  int index = 0;
  std::string path;       // the disk as named (its key in the vault and the local state)
  std::string read_path;  // what was read: the snapshot, or the disk itself
  std::string provider;   // snapshot provider of this disk ("none" for a live read)
  uint64_t size_bytes = 0;
  uint32_t block_size = 0;
  std::string mode;    // "full", "incremental" (local state) or "incremental-vault-map"
  std::string parent;  // recovery point compared against, empty for full
  uint64_t blocks_total = 0;
  uint64_t blocks_zero = 0;
  uint64_t blocks_read = 0;  // blocks that held data and were read (holes are not read)
  uint64_t blocks_changed = 0;
  // Blocks whose SHA-256 (their id) was computed: the changed ones; in a full backup every block
  // with data; without local state, also the unchanged blocks whose parent entry has no check.
  uint64_t blocks_hashed = 0;
  uint64_t blocks_uploaded = 0;
  uint64_t bytes_uploaded = 0;  // payload bytes (after compression)
  uint64_t bytes_changed = 0;   // plaintext bytes of changed blocks
  nlohmann::json ToJson() const;
};

struct BackupReport {
  std::string recovery_point;
  std::string item;
  std::string consistency;  // "application", "file-system", "crash" or "none"
  // Why that level: the consistency engine's evidence (scripts, filesystems, freeze,
  // snapshot, level, reason), plus "leftover_freeze" (an interrupted backup found at start)
  // and "guarded_reads" (identity checks of live-read image files).
  nlohmann::json evidence;
  int64_t duration_ms = 0;
  // Where the time went, in milliseconds: "prepare" (open the disks, ask the vault, plan),
  // "consistency" (scripts, freeze, snapshot, thaw), "transfer" (read, compare, upload; a
  // guarded read's retry included), "commit" (snapshot cleanup, manifests, the vault's commit,
  // local state). "commit" is only in the agent's own report, not in the one the vault stores
  // (which is sent during the commit).
  nlohmann::json phases_ms = nlohmann::json::object();
  uint64_t bytes_sent = 0;         // on the wire, all connections, TLS payload
  uint64_t peak_memory_bytes = 0;  // the agent's peak resident memory (0: unknown)
  std::vector<DiskReport> disks;
  nlohmann::json ToJson() const;
};

Result<BackupReport> RunBackup(const BackupOptions& options);

}  // namespace vmsnap::agent

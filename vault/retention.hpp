// Recovery point lifecycle (issue 5; seed 002, MISSION S5-S8): expiry, cleanup with merge,
// garbage collection, storage accounting and integrity checks. docs/FORMAT.md, "Retention,
// expiry and cleanup", defines every rule precisely.
//
// Expiry is computed on the fly from the rules each time it is needed (cleanup, listing):
// nothing is stored per point except what is already in rp.json (origin.retain_until_ms) and
// the control plane's per-point overrides. A policy change therefore applies to existing
// points at once, and there is no stored expiry that could disagree with the rules.
//
// Thread-safe: Cleanup runs one at a time (a mutex); it may run while backups upload and
// commit, and while restores read (see Catalog::RemovePoint and BlockStore's GC contract).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/status.hpp"
#include "vault/block_store.hpp"
#include "vault/catalog.hpp"
#include "vault/id_sets.hpp"
#include "vault/schedule.hpp"

namespace vmsnap::vault {

inline constexpr int64_t kNeverExpires = INT64_MAX;

// One recovery point as the expiry rules see it.
struct PointTimes {
  std::string id;
  int64_t created_ms = 0;
  std::optional<int64_t> retain_until_ms;  // on-demand retention; nullopt: the policy decides
};

struct PointExpiry {
  int64_t expires_ms = kNeverExpires;
  std::vector<std::string> kept_by;  // "daily", "weekly", "monthly", "yearly", "on-demand", ...
};

// Expiry of every point of one item under `rules` (nullopt: the item has no policy, so only
// on-demand points expire). `points` must be oldest first; the result is parallel to it. The
// newest point never expires.
std::vector<PointExpiry> ComputeExpiry(const std::vector<PointTimes>& points,
                                       const std::optional<Retention>& rules);

// Start (UTC ms) of the period `n` periods after the one containing `ms`. Periods: UTC day,
// ISO week (Monday 00:00 UTC), calendar month, calendar year.
enum class Period { kDay, kWeek, kMonth, kYear };
int64_t PeriodStart(Period p, int64_t ms, int n);

enum class ItemState {
  kUnprotected,  // no policy: only on-demand retention applies
  kProtected,    // the policy's retention applies
  kStopped,      // unprotect --keep-data: nothing expires
  kDeleted,      // unprotect --delete-data: nothing expires; purged after the window
};

struct ItemRules {
  ItemState state = ItemState::kUnprotected;
  std::optional<Retention> retention;  // set when kProtected
  int64_t deleted_ms = 0;              // kDeleted: when
  bool busy = false;                   // a queued/running job: nothing of it expires now
};

struct LifecycleInputs {
  std::map<std::string, ItemRules> items;           // items not listed: kUnprotected
  std::map<std::string, int64_t> retain_overrides;  // rp id -> retain until (vmsnap rp retain)
  int64_t soft_delete_ms = 14LL * 86400 * 1000;     // soft-deleted data is kept this long
  int64_t session_timeout_ms = 24LL * 3600 * 1000;  // older uncommitted sessions: abandoned
};

struct CleanupReport {
  std::vector<std::string> removed;       // expired points removed (merged into their child)
  std::vector<std::string> purged_items;  // soft-deleted items whose window ended
  uint64_t sessions_deleted = 0;
  uint64_t blocks_freed = 0;
  uint64_t bytes_freed = 0;        // stored (payload) bytes
  uint64_t blocks_kept_young = 0;  // unreferenced but possibly needed by an open session
  uint64_t packs_rewritten = 0;    // mostly-dead pack files whose live blocks were moved
  uint64_t packs_deleted = 0;
  uint64_t pack_bytes_reclaimed = 0;  // disk space returned by deleted pack files
  nlohmann::json ToJson() const;
};

class Lifecycle {
 public:
  using NowFn = std::function<int64_t()>;
  // Not owned; must outlive the Lifecycle. `real_now` is the real clock (block mtimes are
  // compared with it); null = the system clock.
  Lifecycle(Catalog* catalog, BlockStore* store, NowFn real_now = nullptr);

  // Garbage collection frees a block only when it was last written or touched more than this
  // long (real time) before the collection started: stores migrated from an older format
  // carry file mtimes from the kernel's coarse clock.
  static constexpr int64_t kBlockAgeMarginMs = 2000;

  // Expires, merges, purges, deletes abandoned sessions and collects garbage. `now` is the
  // vault clock (injectable). Errors stop the run; what was done stays done and consistent.
  Result<CleanupReport> Cleanup(int64_t now, const LifecycleInputs& inputs);

  // Points of `item`, oldest first, with expiry, why they are kept and the bytes each added:
  // the recovery point JSON without "report", plus "full", "size_bytes", "trigger",
  // "retain_until_ms", "expires_ms" (null: never), "kept_by", "added_bytes", "added_blocks".
  nlohmann::json Points(const std::string& item, int64_t now, const LifecycleInputs& inputs);

  // The backup sessions the vault holds, oldest first, each with its state as a cleanup now
  // would judge it: "running" (holds cleanup back), "agent gone" (its agent missed 5
  // keepalives), "timed out" (uncommitted, older than the timeout) — both dropped by the next
  // cleanup — or "committed". See docs/PROTOCOL.md (GET /v1/admin/sessions).
  nlohmann::json Sessions(int64_t now, const LifecycleInputs& inputs) const;

  // Storage per item (empty `item`: all) and the vault totals; see docs/PROTOCOL.md.
  nlohmann::json Storage(const std::string& item, const LifecycleInputs& inputs);

  // Re-reads and re-hashes every block the point(s) need. kNotFound if the item/point does
  // not exist; otherwise a report (its "ok" is false when a block is missing or corrupt).
  // Each point's map is streamed and its blocks read in batches of about
  // kVerifyBatchBytes; memory holds the ids checked so far, not the maps.
  Result<nlohmann::json> Verify(const std::string& item, const std::string& rp);
  static constexpr size_t kVerifyBatchBytes = 4u << 20;
  // Tests use small batches so that few blocks span several.
  void set_verify_batch_bytes(size_t bytes) { verify_batch_bytes_ = bytes; }

 private:
  std::vector<PointExpiry> ExpiryOf(const std::vector<RecoveryPoint>& points,
                                    const ItemRules& rules, const LifecycleInputs& inputs);
  // The blocks of one disk's stored manifest whose 16-byte prefix is not in `known`, read
  // piece by piece: their prefixes in `fresh`, their number and stored bytes in `blocks` and
  // `bytes`. False, with all three empty, if the manifest cannot be read whole: a damaged
  // manifest adds no block.
  bool NewBlocks(const std::string& rp_id, int disk_index, const RunKeySet<IdPrefix128>& known,
                 RunKeySet<IdPrefix128>& fresh, uint64_t& blocks, uint64_t& bytes) const;
  // real_now: the real time Cleanup judged the sessions' keepalives by, so that every session
  // it did not drop as abandoned holds the collection's cutoff (a dropped one cannot commit).
  Status CollectGarbage(int64_t now, int64_t real_now, const LifecycleInputs& inputs,
                        CleanupReport& report);

  Catalog* catalog_;
  BlockStore* store_;
  NowFn real_now_;
  size_t verify_batch_bytes_ = kVerifyBatchBytes;
  std::mutex mu_;  // one cleanup at a time
};

}  // namespace vmsnap::vault

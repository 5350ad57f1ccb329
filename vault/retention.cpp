#include "vault/retention.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <limits>
#include <set>
#include <unordered_map>

#include "common/block_codec.hpp"
#include "common/bytes.hpp"

namespace vmsnap::vault {

using nlohmann::json;

namespace {

constexpr int64_t kDayMs = 86400000;
constexpr int64_t kMtimeMarginMs = Lifecycle::kBlockAgeMarginMs;

int64_t FloorDiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

int64_t SystemNowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int64_t MonthStart(int64_t year, int64_t month0) {  // month0 may be outside 0..11
  int64_t total = year * 12 + month0;
  std::tm tm{};
  tm.tm_year = static_cast<int>(FloorDiv(total, 12) - 1900);
  tm.tm_mon = static_cast<int>(total - FloorDiv(total, 12) * 12);
  tm.tm_mday = 1;
  return static_cast<int64_t>(timegm(&tm)) * 1000;
}

std::optional<int64_t> RetainUntil(const RecoveryPoint& rp, const LifecycleInputs& inputs) {
  if (auto it = inputs.retain_overrides.find(rp.id); it != inputs.retain_overrides.end())
    return it->second;
  if (rp.origin.is_object()) {
    const json& r = rp.origin.value("retain_until_ms", json());
    if (r.is_number_integer() && r.get<int64_t>() > 0) return r.get<int64_t>();
  }
  return std::nullopt;
}

const ItemRules& RulesOf(const std::string& item, const LifecycleInputs& inputs) {
  static const ItemRules kDefault;
  auto it = inputs.items.find(item);
  return it == inputs.items.end() ? kDefault : it->second;
}

// Re-reads and re-hashes blocks, each id once per verifier, a batch at a time: the ids of a
// batch are read with BlockStore::AppendRecords (records close together in a pack in one read),
// then each record is decompressed and hashed (VerifyBlock). Memory: the blocks checked so far
// (their 16-byte prefixes in sorted runs, vault/id_sets.hpp: 17-34 bytes per block of what
// was verified), the bad ones with their state, and one batch of records (about
// `batch_bytes`). One thread.
class BlockVerifier {
 public:
  enum class State : uint8_t { kOk, kMissing, kCorrupt };

  BlockVerifier(const BlockStore* store, size_t batch_bytes)
      : store_(store), batch_bytes_(batch_bytes) {}

  // Checks the blocks of `entries` not checked before. `block_size`: the disk's (it sizes the
  // batches; 0 = unknown, the largest block assumed).
  void Check(std::span<const ManifestEntry> entries, uint32_t block_size) {
    const size_t per_batch =
        std::max<size_t>(1, batch_bytes_ / (block_size ? block_size : kMaxBlockSize));
    ids_.clear();
    keys_.clear();
    for (const auto& e : entries)
      if (e.id) {
        ids_.push_back(*e.id);
        keys_.push_back(IdPrefix16(*e.id));
      }
    positions_.clear();
    checked_.Insert(keys_, &positions_);
    fresh_.clear();  // in the map's order: a batch's records then lie close together in the packs
    for (size_t at : positions_) fresh_.push_back(ids_[at]);
    for (size_t at = 0; at < fresh_.size(); at += per_batch)
      CheckBatch(std::span(fresh_).subspan(at, std::min(per_batch, fresh_.size() - at)));
  }
  bool any_bad() const { return !bad_.empty(); }
  // The state of a checked block.
  State StateOf(const BlockId& id) const {
    auto it = bad_.find(id);
    return it == bad_.end() ? State::kOk : it->second;
  }
  uint64_t checked() const { return checked_.size(); }

 private:
  void CheckBatch(std::span<const BlockId> ids) {
    records_.clear();
    if (store_->AppendRecords(ids, records_).ok()) {
      ByteReader r(records_);
      for (const auto& id : ids) {
        BlockRecordView record;
        if (!ReadRecord(r, record) || record.id != id || !VerifyBlock(record, plain_).ok())
          bad_[id] = State::kCorrupt;
      }
      return;
    }
    // A record of the batch is missing or unreadable: find which, one at a time.
    for (const auto& id : ids) {
      auto b = store_->Get(id);
      if (!b.ok())
        bad_[id] = b.status().code() == Code::kNotFound ? State::kMissing : State::kCorrupt;
      else if (!VerifyBlock(*b, plain_).ok())
        bad_[id] = State::kCorrupt;
    }
  }

  const BlockStore* store_;
  size_t batch_bytes_;
  RunKeySet<IdPrefix128> checked_;
  std::unordered_map<BlockId, State, BlockIdHash> bad_;
  std::vector<BlockId> ids_, fresh_;
  std::vector<IdPrefix128> keys_;
  std::vector<size_t> positions_;
  std::string records_;
  std::vector<std::byte> plain_;
};

std::map<std::string, std::vector<RecoveryPoint>> ByItem(std::vector<RecoveryPoint> all) {
  std::map<std::string, std::vector<RecoveryPoint>> out;
  for (auto& rp : all) out[rp.item].push_back(std::move(rp));
  return out;
}

}  // namespace

int64_t PeriodStart(Period p, int64_t ms, int n) {
  const int64_t day = FloorDiv(ms, kDayMs);
  switch (p) {
    case Period::kDay:
      return (day + n) * kDayMs;
    case Period::kWeek: {
      // Day 0 (1970-01-01) is a Thursday; ISO weeks start on Monday (day -3).
      int64_t week = FloorDiv(day + 3, 7);
      return ((week + n) * 7 - 3) * kDayMs;
    }
    case Period::kMonth:
    case Period::kYear: {
      std::time_t t = static_cast<std::time_t>(FloorDiv(ms, 1000));
      std::tm tm{};
      gmtime_r(&t, &tm);
      int64_t year = tm.tm_year + 1900;
      return p == Period::kMonth ? MonthStart(year, tm.tm_mon + n) : MonthStart(year + n, 0);
    }
  }
  return 0;
}

std::vector<PointExpiry> ComputeExpiry(const std::vector<PointTimes>& points,
                                       const std::optional<Retention>& rules) {
  std::vector<PointExpiry> out(points.size());
  struct Rule {
    Period period;
    int keep;
    const char* name;
  };
  std::vector<Rule> active;
  if (rules) {
    for (Rule r :
         {Rule{Period::kDay, rules->daily, "daily"}, Rule{Period::kWeek, rules->weekly, "weekly"},
          Rule{Period::kMonth, rules->monthly, "monthly"},
          Rule{Period::kYear, rules->yearly, "yearly"}})
      if (r.keep > 0) active.push_back(r);
  }
  for (size_t i = 0; i < points.size(); ++i) {
    const PointTimes& p = points[i];
    PointExpiry& e = out[i];
    if (p.retain_until_ms) {
      e.expires_ms = *p.retain_until_ms;
      e.kept_by.push_back("on-demand");
    } else if (!rules) {
      e.expires_ms = kNeverExpires;
      e.kept_by.push_back("no policy");
    } else {
      e.expires_ms = p.created_ms;  // kept by no rule: expired at once
      for (const Rule& r : active) {
        const int64_t period = PeriodStart(r.period, p.created_ms, 0);
        bool newest_of_period = true;
        for (size_t j = i + 1; j < points.size() && newest_of_period; ++j)
          if (!points[j].retain_until_ms &&
              PeriodStart(r.period, points[j].created_ms, 0) == period)
            newest_of_period = false;
        if (!newest_of_period) continue;
        e.expires_ms = std::max(e.expires_ms, PeriodStart(r.period, p.created_ms, r.keep));
        e.kept_by.push_back(r.name);
      }
    }
  }
  if (!out.empty()) {
    out.back().expires_ms = kNeverExpires;
    out.back().kept_by.push_back("newest");
  }
  return out;
}

json CleanupReport::ToJson() const {
  return {{"removed", removed},
          {"purged_items", purged_items},
          {"sessions_deleted", sessions_deleted},
          {"blocks_freed", blocks_freed},
          {"bytes_freed", bytes_freed},
          {"blocks_kept_young", blocks_kept_young},
          {"packs_rewritten", packs_rewritten},
          {"packs_deleted", packs_deleted},
          {"pack_bytes_reclaimed", pack_bytes_reclaimed}};
}

Lifecycle::Lifecycle(Catalog* catalog, BlockStore* store, NowFn real_now)
    : catalog_(catalog), store_(store), real_now_(std::move(real_now)) {
  if (!real_now_) real_now_ = SystemNowMs;
}

std::vector<PointExpiry> Lifecycle::ExpiryOf(const std::vector<RecoveryPoint>& points,
                                             const ItemRules& rules,
                                             const LifecycleInputs& inputs) {
  if (rules.state == ItemState::kStopped || rules.state == ItemState::kDeleted) {
    PointExpiry keep;
    keep.kept_by.push_back(rules.state == ItemState::kStopped ? "protection stopped"
                                                              : "soft-deleted");
    return std::vector<PointExpiry>(points.size(), keep);
  }
  std::vector<PointTimes> times;
  for (const auto& rp : points)
    times.push_back({rp.id, rp.created_unix_ms, RetainUntil(rp, inputs)});
  return ComputeExpiry(times,
                       rules.state == ItemState::kProtected ? rules.retention : std::nullopt);
}

namespace {

// Whether a session holds cleanup back (its item's expiry, and the garbage collection's cutoff):
// an uncommitted backup younger than the timeout whose agent, if it promised keepalives, still
// sends them.
bool HoldsCleanup(const SessionInfo& s, int64_t now, int64_t real_now,
                  const LifecycleInputs& inputs) {
  return !s.committed && s.created_unix_ms > now - inputs.session_timeout_ms &&
         !s.AbandonedByAgent(real_now);
}

}  // namespace

json Lifecycle::Sessions(int64_t now, const LifecycleInputs& inputs) const {
  const int64_t real_now = real_now_();
  json out = json::array();
  for (const auto& s : catalog_->ListSessions()) {
    const char* state = s.committed                              ? "committed"
                        : s.AbandonedByAgent(real_now)           ? "agent gone"
                        : HoldsCleanup(s, now, real_now, inputs) ? "running"
                                                                 : "timed out";
    json j = {{"id", s.id},
              {"vm", s.item},
              {"started_ms", s.created_unix_ms},
              {"keepalive_ms", s.keepalive_ms},
              {"state", state}};
    // Signs of life are on the real clock: how long ago, rather than when; for the backups
    // that have not committed.
    j["since_alive_ms"] = !s.committed && s.keepalive_ms > 0 && s.alive_real_ms > 0
                              ? json(real_now - s.alive_real_ms)
                              : json();
    out.push_back(std::move(j));
  }
  return out;
}

Result<CleanupReport> Lifecycle::Cleanup(int64_t now, const LifecycleInputs& inputs) {
  std::lock_guard lock(mu_);
  CleanupReport report;
  const int64_t real_now = real_now_();
  std::set<std::string> open_items;
  for (const auto& s : catalog_->ListSessions())
    if (HoldsCleanup(s, now, real_now, inputs)) open_items.insert(s.item);

  // 1. Soft-deleted items whose window ended: every point goes (newest first: no merges).
  for (const auto& [item, rules] : inputs.items) {
    if (rules.state != ItemState::kDeleted || now < rules.deleted_ms + inputs.soft_delete_ms)
      continue;
    auto points = catalog_->List(item);
    for (auto it = points.rbegin(); it != points.rend(); ++it)
      VMSNAP_RETURN_IF_ERROR(catalog_->RemovePoint(it->id).InPhase("cleanup"));
    spdlog::info("cleanup: purged soft-deleted item {} ({} points)", item, points.size());
    report.purged_items.push_back(item);
  }

  // 2. Expired points, oldest first; each is merged into the point that names it as parent.
  for (const auto& [item, points] : ByItem(catalog_->List(""))) {
    const ItemRules& rules = RulesOf(item, inputs);
    if (rules.busy || open_items.count(item) || rules.state == ItemState::kDeleted) continue;
    auto expiry = ExpiryOf(points, rules, inputs);
    for (size_t i = 0; i < points.size(); ++i) {
      if (expiry[i].expires_ms > now) continue;
      VMSNAP_RETURN_IF_ERROR(catalog_->RemovePoint(points[i].id).InPhase("cleanup"));
      spdlog::info("cleanup: recovery point {} of {} expired and was removed", points[i].id, item);
      report.removed.push_back(points[i].id);
    }
  }

  // 3. Sessions: committed or abandoned ones older than the timeout, and those whose agent
  // stopped sending keepalives (a commit of such a session then fails: its agent, if it still
  // runs, starts the backup again).
  for (const auto& s : catalog_->ListSessions()) {
    const bool agent_gone = s.AbandonedByAgent(real_now);
    if (s.created_unix_ms > now - inputs.session_timeout_ms && !agent_gone) continue;
    VMSNAP_RETURN_IF_ERROR(catalog_->DeleteSession(s.id).InPhase("cleanup"));
    if (agent_gone)
      spdlog::info(
          "cleanup: backup session {} of {} dropped: its agent sent no keepalive for {} s (it "
          "promised one every {} s)",
          s.id, s.item, (real_now - s.alive_real_ms) / 1000, s.keepalive_ms / 1000.0);
    report.sessions_deleted++;
  }

  // 4. Garbage collection.
  VMSNAP_RETURN_IF_ERROR(
      CollectGarbage(now, real_now, inputs, report).InPhase("garbage collection"));
  return report;
}

Status Lifecycle::CollectGarbage(int64_t now, int64_t real_now, const LifecycleInputs& inputs,
                                 CleanupReport& report) {
  // The cutoff is fixed before the references are read: a backup whose session is open now
  // (or starts later) wrote or touched each block it uses at or after its session started.
  // Sessions are judged at the same real time as when Cleanup dropped the abandoned ones: a
  // session it kept holds the cutoff, even if its agent's keepalive is late by now.
  int64_t cutoff = real_now - kMtimeMarginMs;
  for (const auto& s : catalog_->ListSessions()) {
    if (!HoldsCleanup(s, now, real_now, inputs)) continue;
    cutoff =
        std::min(cutoff, s.created_real_ms == 0 ? INT64_MIN : s.created_real_ms - kMtimeMarginMs);
  }
  // Mark: every entry of every stored manifest is in its own point's resolved view, so the
  // union of the stored manifests is the union of what the remaining points restore. The live
  // set holds 8 bytes per block (vault/id_sets.hpp): a block that is not referenced but shares
  // its first 8 bytes with one that is counts as live, so it is kept, never the reverse.
  BlockIdPrefixSet live;
  for (const auto& rp : catalog_->List("")) {
    for (const auto& d : rp.disks) {
      // Read piece by piece: the vault's memory holds the live set, not also the manifest.
      Status st = catalog_->ForEachEntry(rp.id, d.index, [&](std::span<const ManifestEntry> es) {
        for (const auto& e : es)
          if (e.id) live.Add(IdPrefix(*e.id));
        return Status::Ok();
      });
      if (!st.ok())  // unknown references: sweeping now could free a needed block
        return Status::Corruption("manifest of disk " + std::to_string(d.index) + " of " + rp.id +
                                      " cannot be read (" + st.cause() + "); nothing was swept",
                                  "run 'vmsnap verify' on that VM and restore it from elsewhere");
    }
  }
  live.Seal();
  std::vector<BlockId> candidates;
  store_->ForEach([&](const BlockId& id, uint64_t, int64_t mtime) {
    if (live.Contains(IdPrefix(id))) return;
    if (mtime >= cutoff) {
      report.blocks_kept_young++;
      return;
    }
    candidates.push_back(id);
  });
  auto removed = store_->RemoveUntouchedSince(candidates, cutoff);
  if (!removed.ok()) return removed.take_status();
  report.blocks_freed = removed->blocks;
  report.bytes_freed = removed->bytes;
  if (report.blocks_freed)
    spdlog::info("garbage collection: freed {} blocks ({} bytes)", report.blocks_freed,
                 report.bytes_freed);
  // The freed blocks' bytes stay in their pack files until the packs are rewritten.
  auto compacted = store_->Compact();
  if (!compacted.ok()) return compacted.take_status();
  report.packs_rewritten = compacted->packs_rewritten;
  report.packs_deleted = compacted->packs_deleted;
  report.pack_bytes_reclaimed = compacted->bytes_reclaimed;
  return Status::Ok();
}

bool Lifecycle::NewBlocks(const std::string& rp_id, int disk_index,
                          const RunKeySet<IdPrefix128>& known, RunKeySet<IdPrefix128>& fresh,
                          uint64_t& blocks, uint64_t& bytes) const {
  fresh = RunKeySet<IdPrefix128>();
  blocks = bytes = 0;
  std::vector<BlockId> ids, added_ids;
  std::vector<IdPrefix128> keys;
  std::vector<size_t> absent, added;
  Status st = catalog_->ForEachEntry(rp_id, disk_index, [&](std::span<const ManifestEntry> es) {
    ids.clear();
    keys.clear();
    for (const auto& e : es)
      if (e.id) {
        ids.push_back(*e.id);
        keys.push_back(IdPrefix16(*e.id));
      }
    absent.clear();
    known.FindAbsent(keys, absent);
    for (size_t i = 0; i < absent.size(); ++i) {  // in place: absent[i] >= i
      ids[i] = ids[absent[i]];
      keys[i] = keys[absent[i]];
    }
    ids.resize(absent.size());
    keys.resize(absent.size());
    added.clear();
    fresh.Insert(keys, &added);  // new to this disk too (a block may be at several indexes)
    added_ids.clear();
    for (size_t at : added) added_ids.push_back(ids[at]);
    blocks += added_ids.size();
    for (uint64_t b : store_->StoredBytes(added_ids)) bytes += b;
    return Status::Ok();
  });
  if (!st.ok()) {
    fresh = RunKeySet<IdPrefix128>();
    blocks = bytes = 0;
    return false;
  }
  return true;
}

json Lifecycle::Points(const std::string& item, int64_t now, const LifecycleInputs& inputs) {
  (void)now;
  // Memory: the 16-byte prefixes of the blocks of the points listed so far and of one disk's
  // new blocks (a false "seen" only under-counts a point's added bytes, with the odds in
  // vault/id_sets.hpp), and one piece of a map.
  auto points = catalog_->List(item);
  auto expiry = ExpiryOf(points, RulesOf(item, inputs), inputs);
  RunKeySet<IdPrefix128> seen, fresh;
  json out = json::array();
  for (size_t i = 0; i < points.size(); ++i) {
    const RecoveryPoint& rp = points[i];
    uint64_t added_bytes = 0, added_blocks = 0, size = 0;
    bool full = true;
    for (const auto& d : rp.disks) {
      size += d.size_bytes;
      full = full && d.parent.empty();
      uint64_t blocks = 0, bytes = 0;
      if (!NewBlocks(rp.id, d.index, seen, fresh, blocks, bytes)) continue;
      added_blocks += blocks;
      added_bytes += bytes;
      // fresh holds only keys absent from seen: its runs join seen's without a lookup.
      fresh.ForEachKeys([&](std::span<const IdPrefix128> keys) { seen.InsertAbsentSorted(keys); },
                        std::numeric_limits<size_t>::max());
    }
    auto retain = RetainUntil(rp, inputs);
    json entry = rp.ToJson();  // every recovery point field but the (large) report
    entry.erase("report");
    entry.update(json{
        {"full", full},
        {"size_bytes", size},
        {"trigger", rp.origin.is_object() ? rp.origin.value("trigger", json()) : json()},
        {"retain_until_ms", retain ? json(*retain) : json()},
        {"expires_ms", expiry[i].expires_ms == kNeverExpires ? json() : json(expiry[i].expires_ms)},
        {"kept_by", expiry[i].kept_by},
        {"added_bytes", added_bytes},
        {"added_blocks", added_blocks}});
    out.push_back(std::move(entry));
  }
  return out;
}

json Lifecycle::Storage(const std::string& item, const LifecycleInputs& inputs) {
  // Memory: one item's distinct ids at a time (32 bytes each) and 8 bytes per block referenced
  // anywhere (vault/id_sets.hpp); stored sizes are looked up in groups, not cached.
  constexpr size_t kLookupGroup = 64 * 1024;
  json items = json::array();
  BlockIdPrefixSet all_live;
  uint64_t sum_items = 0, billable = 0;
  for (const auto& [name, points] : ByItem(catalog_->List(""))) {
    BlockIdSet blocks;
    for (const auto& rp : points)
      for (const auto& d : rp.disks)  // a manifest that cannot be read counts what was read
        (void)catalog_->ForEachEntry(rp.id, d.index, [&](std::span<const ManifestEntry> es) {
          for (const auto& e : es)
            if (e.id) blocks.Add(*e.id);
          return Status::Ok();
        });
    blocks.Seal();
    uint64_t bytes = 0;
    const std::span<const BlockId> ids = blocks.keys();
    for (size_t first = 0; first < ids.size(); first += kLookupGroup)
      for (uint64_t b :
           store_->StoredBytes(ids.subspan(first, std::min(kLookupGroup, ids.size() - first))))
        bytes += b;
    for (const auto& id : ids) all_live.Add(IdPrefix(id));
    const ItemRules& rules = RulesOf(name, inputs);
    const bool deleted = rules.state == ItemState::kDeleted;
    sum_items += bytes;
    if (!deleted) billable += bytes;
    if (!item.empty() && name != item) continue;
    json entry{{"item", name},
               {"points", points.size()},
               {"blocks", blocks.size()},
               {"stored_bytes", bytes},
               {"billable_bytes", deleted ? 0 : bytes},
               {"soft_deleted", deleted}};
    if (deleted) entry["purge_after_ms"] = rules.deleted_ms + inputs.soft_delete_ms;
    items.push_back(entry);
  }
  all_live.Seal();
  uint64_t on_disk = 0, on_disk_blocks = 0, live_bytes = 0;
  store_->ForEach([&](const BlockId& id, uint64_t bytes, int64_t) {
    on_disk += bytes;
    on_disk_blocks++;
    if (all_live.Contains(IdPrefix(id))) live_bytes += bytes;
  });
  return {{"items", items},
          {"vault",
           {{"stored_bytes", on_disk},
            {"stored_blocks", on_disk_blocks},
            {"referenced_bytes", live_bytes},
            {"referenced_blocks", all_live.size()},
            {"unreferenced_bytes", on_disk >= live_bytes ? on_disk - live_bytes : 0},
            {"sum_of_items_bytes", sum_items},
            {"dedup_saved_bytes", sum_items >= live_bytes ? sum_items - live_bytes : 0},
            {"billable_bytes", billable}}}};
}

Result<json> Lifecycle::Verify(const std::string& item, const std::string& rp_id) {
  std::vector<RecoveryPoint> points;
  if (rp_id.empty()) {
    points = catalog_->List(item);
    if (points.empty())
      return Status::NotFound("VM '" + item + "' has no recovery point",
                              "list recovery points with 'vmsnap rp list VM'");
  } else {
    auto rp = catalog_->Get(rp_id);
    if (!rp.ok() || rp->item != item)
      return Status::NotFound("recovery point '" + rp_id + "' of VM '" + item + "' does not exist",
                              "list recovery points with 'vmsnap rp list " + item + "'");
    points.push_back(std::move(*rp));
  }
  BlockVerifier verifier(store_, verify_batch_bytes_);
  uint64_t total_missing = 0, total_corrupt = 0, total_errors = 0;
  json out_points = json::array(), removed_meanwhile = json::array();
  for (const auto& rp : points) {
    json missing = json::array(), corrupt = json::array(), errors = json::array();
    uint64_t blocks = 0;
    for (const auto& d : rp.disks) {
      // The point's map is streamed: memory holds a batch of it, not the map.
      auto check = [&](std::span<const ManifestEntry> entries) {
        verifier.Check(entries, d.block_size);
        for (const auto& e : entries) {
          if (!e.id) continue;
          blocks++;
          if (!verifier.any_bad()) continue;
          const auto state = verifier.StateOf(*e.id);
          if (state == BlockVerifier::State::kMissing) missing.push_back(e.id->Hex());
          if (state == BlockVerifier::State::kCorrupt) corrupt.push_back(e.id->Hex());
        }
        return Status::Ok();
      };
      Status st = catalog_->ForEachResolvedEntry(rp.id, d.index, check);
      if (!st.ok()) errors.push_back("disk " + std::to_string(d.index) + ": " + st.cause());
    }
    // A cleanup running meanwhile may have merged this point away and freed blocks only it
    // needed: that is not damage. Points still in the catalog are reported as found.
    const bool damaged = !missing.empty() || !corrupt.empty() || !errors.empty();
    if (damaged && !catalog_->Get(rp.id).ok()) {
      removed_meanwhile.push_back(rp.id);
      continue;
    }
    total_missing += missing.size();
    total_corrupt += corrupt.size();
    total_errors += errors.size();
    out_points.push_back({{"id", rp.id},
                          {"blocks", blocks},
                          {"missing", missing},
                          {"corrupt", corrupt},
                          {"errors", errors},
                          {"ok", missing.empty() && corrupt.empty() && errors.empty()}});
  }
  return json{{"item", item},
              {"points", out_points},
              {"blocks_checked", verifier.checked()},
              {"missing", total_missing},
              {"corrupt", total_corrupt},
              {"errors", total_errors},
              {"removed_during_verify", removed_meanwhile},
              {"ok", total_missing + total_corrupt + total_errors == 0}};
}

}  // namespace vmsnap::vault

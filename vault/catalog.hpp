// Recovery points and backup sessions of the vault (docs/FORMAT.md, "Vault layout").
//
// A backup runs in a session: DATA/staging/<session>/ receives one manifest per disk. Commit
// checks every manifest (checksum, geometry, parent) and that every block it references is
// durably in the BlockStore, then publishes the recovery point atomically: its files are
// written and synced in DATA/rps/.tmp-<id>/ and the directory is renamed to DATA/rps/<id>/.
// Only published directories are ever listed, so a crash at any moment leaves no visible
// half recovery point. Commit is idempotent per session (a retried commit returns the same
// recovery point). Thread-safe: one mutex serialises metadata changes.
//
// Lifecycle (issue 5): RemovePoint deletes a recovery point and first merges it into every
// point whose manifests reference it (see RemovePoint). Readers that walk parent chains
// (ResolvedManifest) hold a shared lock that RemovePoint takes exclusively, so a reader never
// sees a chain with a hole.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/manifest.hpp"
#include "common/status.hpp"
#include "vault/block_store.hpp"

namespace vmsnap::vault {

class ResolvedMapCursor;  // catalog.cpp

struct DiskRecord {
  int index = 0;
  std::string key;  // the disk's path on the agent; matches disks across recovery points
  uint64_t size_bytes = 0;
  uint32_t block_size = 0;
  std::string parent;  // recovery point this disk's manifest is relative to; empty = full
  uint64_t manifest_entries = 0;
  nlohmann::json stats;  // the agent's counters for this disk
};

struct RecoveryPoint {
  std::string id;
  std::string item;
  std::string session;
  std::string consistency;
  int64_t created_unix_ms = 0;
  std::vector<DiskRecord> disks;
  nlohmann::json report;  // the agent's full report (evidence), as sent
  nlohmann::json origin;  // how it was made: {"job", "trigger", "retain_until_ms"} (may be empty)

  nlohmann::json ToJson() const;
  static Result<RecoveryPoint> FromJson(const nlohmann::json& j);
};

// Item names (one per protected machine): 1-128 of [A-Za-z0-9._-], not starting with '.'.
Status ValidateItemName(const std::string& item);

// A backup session as stored in DATA/staging/<id>/.
struct SessionInfo {
  std::string id;
  std::string item;
  int64_t created_unix_ms = 0;  // vault clock (injectable)
  int64_t created_real_ms = 0;  // real clock; 0 for sessions made before issue 5
  bool committed = false;
  // The agent's promise to call keepalive at least this often while its backup runs (0: an
  // agent before session 26, which makes none), and the real time of its last sign of life
  // (the session's creation or its last keepalive).
  int64_t keepalive_ms = 0;
  int64_t alive_real_ms = 0;
  // An agent that promised keepalives and missed this many in a row is taken as gone (killed,
  // its VM stopped): the session no longer holds cleanup back (vault/retention.cpp).
  static constexpr int64_t kMissedKeepalives = 5;
  bool AbandonedByAgent(int64_t real_now_ms) const {
    return !committed && keepalive_ms > 0 &&
           real_now_ms - alive_real_ms > kMissedKeepalives * keepalive_ms;
  }
};

class Catalog {
 public:
  using NowFn = std::function<int64_t()>;  // UTC milliseconds
  // `now` stamps sessions and recovery points (tests inject a clock); null = the real clock.
  Catalog(std::string data_dir, BlockStore* store, NowFn now = nullptr);
  ~Catalog();

  // Creates the directories and removes leftovers of interrupted commits.
  Status Open();

  // keepalive_ms > 0: the agent will call KeepSessionAlive at least that often (SessionInfo).
  Result<std::string> CreateSession(const std::string& item, int64_t keepalive_ms = 0);
  // Records a sign of life of the session's agent (real clock). kNotFound for a session that
  // does not exist (any more: a cleanup dropped it as abandoned).
  Status KeepSessionAlive(const std::string& session);
  // The item a session was opened for (kNotFound for unknown sessions).
  Result<std::string> SessionItem(const std::string& session) const;
  Status PutManifest(const std::string& session, int disk_index, std::string_view data);
  // A manifest too large for one request, in parts (docs/PROTOCOL.md): each part is written at
  // `offset` of DATA/staging/<session>/disk-<n>.manifest.partial, which is cut to end there
  // (so a resent part replaces what followed it). kConflict if `offset` lies beyond the bytes
  // received so far. SealManifest checks that exactly `size` bytes arrived, decodes them
  // (kCorruption: invalid, and the partial file is removed) and publishes them as the disk's
  // manifest, as PutManifest would. Both are safe to repeat.
  Status PutManifestPart(const std::string& session, int disk_index, uint64_t offset,
                         std::string_view data);
  Status SealManifest(const std::string& session, int disk_index, uint64_t size);
  // Largest manifest accepted in parts (≈ 104 M data entries: ≈ 3 TiB of data at 32 KiB).
  static constexpr uint64_t kMaxManifestBytes = 4ull << 30;
  // body: {"consistency": "...", "disks": [{"index", "key", "stats"...}], "report": {...}}
  Result<RecoveryPoint> Commit(const std::string& session, const nlohmann::json& body);

  // Oldest first. An empty item lists every item.
  std::vector<RecoveryPoint> List(const std::string& item) const;
  Result<RecoveryPoint> Get(const std::string& id) const;
  Result<RecoveryPoint> Latest(const std::string& item) const;
  // The full block map of one disk of a recovery point, parents applied.
  Result<Manifest> ResolvedManifest(const std::string& rp_id, int disk_index) const;
  // One page of that map: the entries with index >= `from`, at most `limit` of them, so that
  // a client can read a map larger than one response (docs/PROTOCOL.md). The map is merged
  // from the chain's manifest files as it is read (ResolvedMapCursor: a read buffer and a
  // small batch per manifest in the chain, whatever the disk's size), after each file was
  // checked whole. The cursor of a page is kept for the next page of the same map (up to
  // kPagedMaps maps, the least recently paged dropped first; dropped when a page comes back
  // short; opened again if a page starts before where it stands; a removed point fails to
  // reopen).
  Result<Manifest> ResolvedManifestPage(const std::string& rp_id, int disk_index, uint64_t from,
                                        uint64_t limit) const;
  // Calls `each` with the entries of ResolvedManifest(rp_id, disk_index), in index order, a
  // batch at a time, merged from the chain's files as they are read (the same cursor as a page;
  // memory does not grow with the map). Each file of the chain is checked whole before the
  // first call. An error from `each` stops the reading and is returned.
  Status ForEachResolvedEntry(
      const std::string& rp_id, int disk_index,
      const std::function<Status(std::span<const ManifestEntry>)>& each) const;
  // The manifest of one disk as stored (full or incremental).
  Result<Manifest> LoadManifest(const std::string& rp_id, int disk_index) const;
  // Calls `each` with the entries of one disk's stored manifest, in index order, a batch at a
  // time, reading the file piece by piece (memory does not grow with the manifest). The
  // checksum is compared after the last entry: if the manifest is damaged, `each` may already
  // have seen some of its entries when kCorruption is returned, so use them only in a way that
  // can be dropped. An error from `each` stops the reading and is returned.
  Status ForEachEntry(const std::string& rp_id, int disk_index,
                      const std::function<Status(std::span<const ManifestEntry>)>& each) const;

  // Deletes recovery point `id`. Every point with a disk whose manifest names `id` as parent
  // is first rewritten so that it restores the same bytes without it: if `id`'s disk is full,
  // the child's manifest becomes ApplyDelta(full, child delta) (a full manifest); otherwise
  // the two deltas are composed (the child's entry wins per index) relative to `id`'s parent.
  // Each manifest is replaced with WriteFileAtomic, then the child's rp.json, and only then is
  // `id` hidden (renamed to rps/.trash-<id>, removed at start) and deleted. Every state a
  // crash can leave restores every remaining point exactly (a half-merged child still names
  // a point that still exists). kNotFound if `id` does not exist.
  Status RemovePoint(const std::string& id);

  // Sessions, oldest first, and removal of one session's staging directory.
  std::vector<SessionInfo> ListSessions() const;
  Status DeleteSession(const std::string& session);

 private:
  int64_t Now() const;
  std::string RpDir(const std::string& id) const { return rps_ + "/" + id; }
  std::string SessionDir(const std::string& id) const { return staging_ + "/" + id; }

  std::string rps_;
  std::string staging_;
  BlockStore* store_;
  NowFn now_;
  int64_t last_created_ms_ = 0;  // recovery point times strictly increase (ids sort by them)
  mutable std::mutex mu_;        // commits and removals
  std::mutex parts_mu_;          // manifest parts
  // The chain of manifests of one disk, checked and opened (under chain_mu_), merged.
  Result<std::unique_ptr<ResolvedMapCursor>> OpenResolvedMap(const std::string& rp_id,
                                                             int disk_index) const;

  // The maps being paged, most recent first: "<rp id>/<disk index>" and where its merge
  // stands. At most kPagedMaps, so that a few restores at once do not start each other's merges
  // again at every page.
  static constexpr size_t kPagedMaps = 4;
  mutable std::mutex page_mu_;
  mutable std::vector<std::pair<std::string, std::unique_ptr<ResolvedMapCursor>>> paged_;
  mutable std::shared_mutex chain_mu_;  // shared: chain walks; exclusive: RemovePoint
};

}  // namespace vmsnap::vault

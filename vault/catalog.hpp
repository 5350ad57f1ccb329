// Recovery points and backup sessions of the vault (docs/FORMAT.md, "Vault layout").
//
// A backup runs in a session: DATA/staging/<session>/ receives one manifest per disk. Commit
// checks every manifest (checksum, geometry, parent) and that every block it references is
// durably in the BlockStore, then publishes the recovery point atomically: its files are
// written and synced in DATA/rps/.tmp-<id>/ and the directory is renamed to DATA/rps/<id>/.
// Only published directories are ever listed, so a crash at any moment leaves no visible
// half recovery point. Commit is idempotent per session (a retried commit returns the same
// recovery point). Thread-safe: one mutex serialises metadata changes.
#pragma once

#include <cstdint>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "common/manifest.hpp"
#include "common/status.hpp"
#include "vault/block_store.hpp"

namespace vmsnap::vault {

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

class Catalog {
 public:
  Catalog(std::string data_dir, BlockStore* store);

  // Creates the directories and removes leftovers of interrupted commits.
  Status Open();

  Result<std::string> CreateSession(const std::string& item);
  // The item a session was opened for (kNotFound for unknown sessions).
  Result<std::string> SessionItem(const std::string& session) const;
  Status PutManifest(const std::string& session, int disk_index, std::string_view data);
  // body: {"consistency": "...", "disks": [{"index", "key", "stats"...}], "report": {...}}
  Result<RecoveryPoint> Commit(const std::string& session, const nlohmann::json& body);

  // Oldest first. An empty item lists every item.
  std::vector<RecoveryPoint> List(const std::string& item) const;
  Result<RecoveryPoint> Get(const std::string& id) const;
  Result<RecoveryPoint> Latest(const std::string& item) const;
  // The full block map of one disk of a recovery point, parents applied.
  Result<Manifest> ResolvedManifest(const std::string& rp_id, int disk_index) const;

 private:
  Result<Manifest> LoadManifest(const std::string& rp_id, int disk_index) const;
  std::string RpDir(const std::string& id) const { return rps_ + "/" + id; }
  std::string SessionDir(const std::string& id) const { return staging_ + "/" + id; }

  std::string rps_;
  std::string staging_;
  BlockStore* store_;
  mutable std::mutex mu_;
};

}  // namespace vmsnap::vault

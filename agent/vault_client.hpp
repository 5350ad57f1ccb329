// Typed calls of the vault's API (docs/PROTOCOL.md) over one HttpsClient connection.
// Not thread-safe: one VaultClient per thread. Every call retries transient failures as the
// HttpsClient does; all calls are idempotent on the vault side (commit included, per session).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/block_codec.hpp"
#include "common/https_client.hpp"
#include "common/manifest.hpp"

namespace vmsnap::agent {

// Entries per request when a resolved block map is read (≈ 57 MB per answer with checks).
inline constexpr uint64_t kMapPageEntries = 1 << 20;

class VaultClient {
 public:
  static Result<std::unique_ptr<VaultClient>> Create(const ClientOptions& options);

  // nullopt when the item has no recovery point yet.
  Result<std::optional<nlohmann::json>> LatestRecoveryPoint(const std::string& item);
  Result<nlohmann::json> GetRecoveryPoint(const std::string& id);
  // Oldest first; an empty item lists every item the token can see.
  Result<nlohmann::json> ListRecoveryPoints(const std::string& item);
  // The resolved (full) block map of a disk, read in pages of at most `page_entries` entries
  // (kMapPageEntries by default), so that a map of any size fits the response limit: `on_page` gets
  // each page in index order (the first one even when the map is empty; each holds the disk's
  // geometry). Stops at the first error, which it returns.
  Status ResolvedManifestPages(const std::string& rp_id, int disk_index, uint64_t page_entries,
                               const std::function<Status(const Manifest&)>& on_page);

  // keepalive: a promise to call KeepSessionAlive at least that often while the backup runs
  // (zero: none, as agents before session 26); a vault that hears nothing for 5 intervals
  // takes the agent as gone (docs/PROTOCOL.md).
  Result<std::string> CreateSession(const std::string& item,
                                    std::chrono::milliseconds keepalive = {});
  // kNotFound: the vault dropped the session (its agent was taken as gone), or it is a vault
  // before session 26, which has no keepalive.
  Status KeepSessionAlive(const std::string& session);
  // Tells the vault that an uncommitted session will not be committed: until it is abandoned
  // or times out, cleanup expires none of the item's points. A vault that does not hear it
  // drops the session after its timeout.
  Status AbandonSession(const std::string& session);
  Result<std::vector<BlockId>> Missing(const std::vector<BlockId>& ids);
  Status Upload(const std::vector<EncodedBlock>& blocks);
  // An encoded manifest (VMSNAPM1) in one request: up to the vault's request limit.
  Status PutManifest(const std::string& session, int disk_index, std::string encoded);
  // A larger one in parts: each part at its offset, in order, then the seal with the total
  // size (docs/PROTOCOL.md). Both are safe to retry.
  Status PutManifestPart(const std::string& session, int disk_index, uint64_t offset,
                         std::string part);
  Status SealManifest(const std::string& session, int disk_index, uint64_t size);
  Result<nlohmann::json> Commit(const std::string& session, const nlohmann::json& body);

  // The blocks of `ids` as the vault stores them (not verified yet: DecodeBlockInto does).
  // `body` receives the answer; the views point into it and stay valid while it is unchanged.
  // Its previous contents are discarded and its memory reused for the answer.
  Result<std::vector<BlockRecordView>> Fetch(const std::vector<BlockId>& ids, std::string& body);

  // Any JSON call of the API (control plane endpoints).
  Result<nlohmann::json> CallJson(const std::string& method, const std::string& target,
                                  const nlohmann::json& body);

  uint64_t bytes_sent() const { return http_->bytes_sent(); }
  uint64_t bytes_received() const { return http_->bytes_received(); }

 private:
  explicit VaultClient(std::unique_ptr<HttpsClient> http) : http_(std::move(http)) {}
  std::unique_ptr<HttpsClient> http_;
};

}  // namespace vmsnap::agent

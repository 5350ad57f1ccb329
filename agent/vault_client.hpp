// Typed calls of the vault's API (docs/PROTOCOL.md) over one HttpsClient connection.
// Not thread-safe: one VaultClient per thread. Every call retries transient failures as the
// HttpsClient does; all calls are idempotent on the vault side (commit included, per session).
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/block_codec.hpp"
#include "common/https_client.hpp"
#include "common/manifest.hpp"

namespace vmsnap::agent {

class VaultClient {
 public:
  static Result<std::unique_ptr<VaultClient>> Create(const ClientOptions& options);

  // nullopt when the item has no recovery point yet.
  Result<std::optional<nlohmann::json>> LatestRecoveryPoint(const std::string& item);
  Result<nlohmann::json> GetRecoveryPoint(const std::string& id);
  // Oldest first; an empty item lists every item the token can see.
  Result<nlohmann::json> ListRecoveryPoints(const std::string& item);
  Result<Manifest> ResolvedManifest(const std::string& rp_id, int disk_index);

  Result<std::string> CreateSession(const std::string& item);
  Result<std::vector<BlockId>> Missing(const std::vector<BlockId>& ids);
  Status Upload(const std::vector<EncodedBlock>& blocks);
  Status PutManifest(const std::string& session, int disk_index, const Manifest& manifest);
  Result<nlohmann::json> Commit(const std::string& session, const nlohmann::json& body);

  // The blocks of `ids` as the vault stores them (not verified yet: DecodeBlockInto does).
  // `body` receives the answer; the views point into it and stay valid while it is unchanged.
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

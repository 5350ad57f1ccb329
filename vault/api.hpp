// The vault's HTTP API (docs/PROTOCOL.md): authentication and routing to the BlockStore and
// the Catalog. Handle() is called concurrently from the server's threads; it is thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "common/http_types.hpp"
#include "vault/block_store.hpp"
#include "vault/catalog.hpp"

namespace vmsnap::vault {

struct ApiCounters {
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> blocks_received{0};
  std::atomic<uint64_t> blocks_stored{0};
  std::atomic<uint64_t> bytes_stored{0};
  std::atomic<uint64_t> blocks_served{0};
  std::atomic<uint64_t> unauthorized{0};
};

class VaultApi {
 public:
  // Not owned: store and catalog must outlive the VaultApi.
  VaultApi(BlockStore* store, Catalog* catalog, std::string token);
  HttpResponse Handle(const HttpRequest& request);
  const ApiCounters& counters() const { return counters_; }

 private:
  Result<HttpResponse> Route(const HttpRequest& request);
  BlockStore* store_;
  Catalog* catalog_;
  std::string token_;
  ApiCounters counters_;
};

// Largest request body the vault accepts (block batches are sized below it by the agent).
inline constexpr uint64_t kMaxRequestBody = 96ull << 20;

}  // namespace vmsnap::vault

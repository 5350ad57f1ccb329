// The vault's HTTP API (docs/PROTOCOL.md): authentication and routing to the BlockStore and
// the Catalog. Handle() is called concurrently from the server's threads; it is thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "common/http_types.hpp"
#include "vault/block_store.hpp"
#include "vault/catalog.hpp"
#include "vault/control_plane.hpp"
#include "vault/disk_space.hpp"

namespace vmsnap::vault {

struct ApiCounters {
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> blocks_received{0};
  std::atomic<uint64_t> blocks_stored{0};
  std::atomic<uint64_t> bytes_stored{0};
  std::atomic<uint64_t> blocks_served{0};
  std::atomic<uint64_t> unauthorized{0};
};

// Who is calling: the administrator (DATA/token) or one enrolled agent (its credential).
// Agents reach only their own item's sessions and recovery points.
struct Principal {
  bool admin = false;
  std::string agent;  // set when !admin
};

// A clock the tests can move (vmsnap-vault serve --test-clock): 0 means the real clock.
struct TestClock {
  bool enabled = false;
  std::atomic<int64_t> now_ms{0};
};

class VaultApi {
 public:
  // Not owned: everything must outlive the VaultApi. control, clock, reserve and emergency may
  // be null (no reserve: uploads are taken until a write fails; no emergency space: an
  // administrator's request that meets a full disk fails).
  VaultApi(BlockStore* store, Catalog* catalog, ControlPlane* control, TestClock* clock,
           std::string admin_token, const DiskSpaceReserve* reserve = nullptr,
           EmergencySpace* emergency = nullptr);
  HttpResponse Handle(const HttpRequest& request);
  const ApiCounters& counters() const { return counters_; }

 private:
  Result<HttpResponse> Route(const HttpRequest& request, const Principal& who);
  Result<HttpResponse> RouteAdmin(const HttpRequest& request);
  Result<HttpResponse> RouteAgent(const HttpRequest& request, const std::string& agent);
  BlockStore* store_;
  Catalog* catalog_;
  ControlPlane* control_;
  TestClock* clock_;
  std::string token_;
  const DiskSpaceReserve* reserve_;
  EmergencySpace* emergency_;
  ApiCounters counters_;
};

// Largest request body the vault accepts (block batches are sized below it by the agent).
inline constexpr uint64_t kMaxRequestBody = 96ull << 20;
// Most ids a POST /v1/blocks/missing or /v1/blocks/fetch may name: far above what an agent
// asks at once (at most 2 048 per missing query, a few hundred per restore batch), and a bound
// on the index lookups one request makes while it holds the index.
inline constexpr size_t kMaxIdsPerRequest = 64 * 1024;
// Most entries an unpaged GET .../map answers with (≈ 57 MB encoded; a 32 GiB disk at the
// default 32 KiB blocks); a larger map is refused with 400 and must be paged (?from&limit).
inline constexpr uint64_t kMaxUnpagedMapEntries = 1ull << 20;

}  // namespace vmsnap::vault

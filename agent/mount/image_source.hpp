// The disks of one recovery point as random-access byte ranges, fetched lazily from the vault.
//
// Open() reads the recovery point and the resolved block map of every disk once. Read() then
// maps byte ranges to block indexes: zero blocks (not in the map) are served as zeros without
// any request; other blocks come from the BlockCache or are fetched from the vault
// (POST /v1/blocks/fetch), verified (DecodeBlock: decompress + SHA-256 must equal the id, size
// must match the block's length) and cached. Sequential reads grow a read-ahead window
// (up to max_readahead_blocks) fetched in the same request as the missing blocks.
//
// Failure: a fetch uses the `fetch` ClientOptions (short timeouts and few retries, so a dead
// vault fails a read in seconds, not minutes); the read then returns that Status
// (kUnavailable / kTimeout / kCorruption / ...) and logs one clear line. Nothing is cached
// from a failed fetch, so the same read succeeds once the vault is back.
//
// Threads: Read() and StatsJson() are thread-safe (FUSE calls them from several threads).
// Fetch connections are pooled: one VaultClient per concurrent fetch.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "agent/mount/block_cache.hpp"
#include "agent/vault_client.hpp"
#include "common/https_client.hpp"
#include "common/manifest.hpp"
#include "platform/env.hpp"

namespace vmsnap::agent {
class VaultClient;
}

namespace vmsnap::mount {

struct ImageOptions {
  ClientOptions control;  // used once by Open() (normal retry policy)
  ClientOptions fetch;    // used for every block fetch (short retries and timeouts)
  std::string recovery_point;
  uint64_t cache_bytes = 256ull << 20;
  uint32_t max_readahead_blocks = 8;
  // Where the block maps are kept while the images are open: nameless scratch files in
  // `scratch_dir`/disks if that exists, else /var/tmp (agent/scratch.hpp); 57 B per block.
  std::string scratch_dir = platform::DefaultAgentPaths().state_dir;
  uint64_t map_page_entries = agent::kMapPageEntries;  // entries per request when a map is read
};

// Fetch options derived from `base`: few attempts, short backoff and I/O timeout, so that an
// unreachable vault fails a read within a few seconds.
ClientOptions ShortFetchOptions(const ClientOptions& base);

struct DiskImageInfo {
  uint32_t index = 0;  // disk number in the recovery point
  std::string source;  // the disk's path at backup time
  uint64_t size_bytes = 0;
  uint32_t block_size = 0;
  uint64_t data_blocks = 0;  // blocks that hold data (the rest are zero)
};

class RecoveryPointImages {
 public:
  static Result<std::unique_ptr<RecoveryPointImages>> Open(const ImageOptions& options);
  ~RecoveryPointImages();
  RecoveryPointImages(const RecoveryPointImages&) = delete;
  RecoveryPointImages& operator=(const RecoveryPointImages&) = delete;

  const nlohmann::json& recovery_point() const { return rp_; }
  std::string consistency() const { return rp_.value("consistency", ""); }
  const std::vector<DiskImageInfo>& disks() const { return info_; }

  // Reads out.size() bytes of disk `disk_pos` (position in disks()) at `offset`. Returns the
  // number of bytes read: short only at the end of the disk, 0 at or past it.
  Result<size_t> Read(size_t disk_pos, uint64_t offset, std::span<std::byte> out);

  // Counters since Open(): reads, blocks_fetched, bytes_fetched (payload on the wire),
  // readahead_blocks, zero_block_reads, cache_hits, cache_misses, fetch_errors, cache sizes.
  nlohmann::json StatsJson() const;

 private:
  struct Disk;
  RecoveryPointImages(ImageOptions options, nlohmann::json rp);
  std::unique_ptr<agent::VaultClient> AcquireClient(Status& error);
  void ReleaseClient(std::unique_ptr<agent::VaultClient> client);
  // Fetches, verifies and caches the blocks at `indexes` of disk `d`.
  // `got` receives every fetched block by index (also when the cache is too small to keep it).
  Status FetchBlocks(Disk& d, const std::vector<uint64_t>& indexes,
                     std::unordered_map<uint64_t, BlockData>& got);

  ImageOptions options_;
  nlohmann::json rp_;
  std::vector<DiskImageInfo> info_;
  std::vector<std::unique_ptr<Disk>> disks_;
  BlockCache cache_;
  std::mutex pool_mu_;
  std::vector<std::unique_ptr<agent::VaultClient>> pool_;
  std::atomic<bool> failing_{false};
  std::atomic<uint64_t> reads_{0}, blocks_fetched_{0}, bytes_fetched_{0}, readahead_blocks_{0},
      zero_block_reads_{0}, fetch_errors_{0}, fetch_requests_{0};
};

}  // namespace vmsnap::mount

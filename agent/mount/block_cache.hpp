// A bounded LRU cache of verified block plaintexts, keyed by (disk, block index).
//
// Capacity is in bytes of plaintext; inserting beyond it evicts the least recently used
// blocks. A single block larger than the whole capacity is not kept. Values are shared,
// immutable buffers: a reader keeps its copy alive even after the block is evicted.
// Thread-safe: every method may be called from any thread (one internal mutex).
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace vmsnap::mount {

using BlockData = std::shared_ptr<const std::vector<std::byte>>;

struct BlockCacheStats {
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t evictions = 0;
  uint64_t bytes = 0;     // plaintext bytes held now
  uint64_t entries = 0;   // blocks held now
  uint64_t capacity = 0;  // configured bound in bytes
};

class BlockCache {
 public:
  explicit BlockCache(uint64_t capacity_bytes) : capacity_(capacity_bytes) {}
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  // The block if cached (counts a hit and marks it most recently used), else nullptr (a miss).
  BlockData Lookup(uint32_t disk, uint64_t index);
  // True if cached; counts nothing and does not change the LRU order.
  bool Contains(uint32_t disk, uint64_t index) const;
  // Inserts or replaces; evicts least recently used blocks to stay within the capacity.
  void Insert(uint32_t disk, uint64_t index, BlockData data);
  BlockCacheStats Stats() const;

 private:
  struct Key {
    uint32_t disk;
    uint64_t index;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    size_t operator()(const Key& k) const { return std::hash<uint64_t>()(k.index * 131 + k.disk); }
  };
  struct Entry {
    Key key;
    BlockData data;
  };
  void EvictLocked();

  const uint64_t capacity_;
  mutable std::mutex mu_;
  std::list<Entry> lru_;  // front = most recently used
  std::unordered_map<Key, std::list<Entry>::iterator, KeyHash> map_;
  uint64_t bytes_ = 0;
  uint64_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

}  // namespace vmsnap::mount

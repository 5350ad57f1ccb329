#include "agent/mount/block_cache.hpp"

namespace vmsnap::mount {

BlockData BlockCache::Lookup(uint32_t disk, uint64_t index) {
  std::lock_guard lock(mu_);
  auto it = map_.find(Key{disk, index});
  if (it == map_.end()) {
    ++misses_;
    return nullptr;
  }
  ++hits_;
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->data;
}

bool BlockCache::Contains(uint32_t disk, uint64_t index) const {
  std::lock_guard lock(mu_);
  return map_.count(Key{disk, index}) > 0;
}

void BlockCache::Insert(uint32_t disk, uint64_t index, BlockData data) {
  if (!data) return;
  std::lock_guard lock(mu_);
  Key key{disk, index};
  if (auto it = map_.find(key); it != map_.end()) {
    bytes_ -= it->second->data->size();
    lru_.erase(it->second);
    map_.erase(it);
  }
  if (data->size() > capacity_) return;
  bytes_ += data->size();
  lru_.push_front(Entry{key, std::move(data)});
  map_[key] = lru_.begin();
  EvictLocked();
}

void BlockCache::EvictLocked() {
  while (bytes_ > capacity_ && !lru_.empty()) {
    Entry& victim = lru_.back();
    bytes_ -= victim.data->size();
    map_.erase(victim.key);
    lru_.pop_back();
    ++evictions_;
  }
}

BlockCacheStats BlockCache::Stats() const {
  std::lock_guard lock(mu_);
  return BlockCacheStats{hits_, misses_, evictions_, bytes_, map_.size(), capacity_};
}

}  // namespace vmsnap::mount

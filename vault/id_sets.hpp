// Sets of block ids for the vault's passes over every recovery point (garbage collection, the
// usage report), held as sorted arrays instead of hash sets: a std::unordered_set of 32-byte
// ids costs about 64-80 bytes per id (a heap node each plus its bucket), a sorted array 32, and
// an array of the ids' first 8 bytes (IdPrefix) 8. At 32 KiB blocks a vault holding 1 TB of
// distinct data references about 33 M blocks: 2-2.6 GB of hash set, 0.27 GB of prefixes.
#pragma once

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "common/block_codec.hpp"

namespace vmsnap::vault {

// The first 8 bytes of a block id (a SHA-256 value, so uniformly spread). As a set member it
// stands for every id that starts with it: a set of prefixes answers "maybe" for an id that
// is not in it but shares a member's first 8 bytes. Among n distinct ids that happens for
// about n^2 / 2^65 pairs (3e-5 for 33 M blocks), and finding an id that starts with a given
// prefix takes about 2^64 hashes. Use it only where a false "member" is harmless: garbage
// collection then keeps an unreferenced block until a later collection, never the reverse.
inline uint64_t IdPrefix(const BlockId& id) {
  uint64_t p;
  static_assert(sizeof p <= sizeof id.bytes);
  std::memcpy(&p, id.bytes.data(), sizeof p);
  return p;
}

// A set of keys in one sorted array. Add() appends; the unsorted tail is sorted and merged in
// whenever it is as long as the sorted part (and at least kMinTail), so the array holds at
// most about twice its distinct keys plus kMinTail however often keys repeat, and adding n
// keys costs O(n log n). Contains() and keys() are valid after Seal() (and before the next
// Add). Not thread-safe. Memory: the array, plus a temporary buffer while merging.
template <typename Key>
class SortedKeySet {
 public:
  static constexpr size_t kMinTail = 64 * 1024;

  void Add(const Key& key) {
    keys_.push_back(key);
    if (keys_.size() - sorted_ >= std::max(sorted_, kMinTail)) Merge();
  }
  void Seal() { Merge(); }
  bool sealed() const { return sorted_ == keys_.size(); }
  bool Contains(const Key& key) const {
    assert(sealed());
    return std::binary_search(keys_.begin(), keys_.end(), key);
  }
  // The distinct keys in ascending order (after Seal()).
  std::span<const Key> keys() const {
    assert(sealed());
    return keys_;
  }
  size_t size() const {
    assert(sealed());
    return keys_.size();
  }
  // Keys held now, repeats in the unsorted tail included (what the memory bound is about).
  size_t held() const { return keys_.size(); }

 private:
  void Merge() {
    if (sealed()) return;
    const auto tail = keys_.begin() + static_cast<std::ptrdiff_t>(sorted_);
    std::sort(tail, keys_.end());
    keys_.erase(std::unique(tail, keys_.end()), keys_.end());
    std::inplace_merge(keys_.begin(), keys_.begin() + static_cast<std::ptrdiff_t>(sorted_),
                       keys_.end());
    keys_.erase(std::unique(keys_.begin(), keys_.end()), keys_.end());
    sorted_ = keys_.size();
  }

  std::vector<Key> keys_;
  size_t sorted_ = 0;  // keys_[0, sorted_) is sorted and without repeats
};

using BlockIdSet = SortedKeySet<BlockId>;         // exact
using BlockIdPrefixSet = SortedKeySet<uint64_t>;  // of IdPrefix(id): "maybe" membership

}  // namespace vmsnap::vault

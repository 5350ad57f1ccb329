// Sets of block ids for the vault's passes over every recovery point (garbage collection, the
// usage report, the points listing, verify), held as sorted arrays instead of hash sets: a
// std::unordered_set of 32-byte ids costs about 64-80 bytes per id (a heap node each plus its
// bucket), a sorted array 32, an array of the ids' first 16 bytes (IdPrefix128) 16 and of their
// first 8 bytes (IdPrefix) 8. At 32 KiB blocks a vault holding 1 TB of distinct data references
// about 33 M blocks: 2-2.6 GB of hash set, 0.27 GB of 8-byte prefixes.
#pragma once

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iterator>
#include <limits>
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

// The first 16 bytes of a block id. Among n distinct ids two share them with a probability of
// about n^2 / 2^129 (4e-24 for 33 M blocks); making an id with a chosen 16-byte prefix takes
// about 2^128 hashes, two ids that share one about 2^64. Used where a false "member" is that
// unlikely and harmless: the points listing (a block not counted in a point's added bytes) and
// verify's blocks checked (a block not re-read because another in the same VM's points shares
// its prefix: only whoever writes that VM's backups could arrange it, with 2^64 hashes, and
// they can write any data anyway). Never where it would free a block.
struct IdPrefix128 {
  uint64_t high = 0, low = 0;
  auto operator<=>(const IdPrefix128&) const = default;
};
inline IdPrefix128 IdPrefix16(const BlockId& id) {
  IdPrefix128 p;
  static_assert(2 * sizeof(uint64_t) <= sizeof id.bytes);
  std::memcpy(&p.high, id.bytes.data(), sizeof p.high);
  std::memcpy(&p.low, id.bytes.data() + sizeof p.high, sizeof p.low);
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

// The leading 64 bits of a key, in the key's own order: a < b implies OrderBits(a) <=
// OrderBits(b). For prefixes of block ids (SHA-256 values) they are uniformly spread, which
// RunKeySet's directories rely on for speed (never for correctness).
inline uint64_t OrderBits(const IdPrefix128& p) {
  return p.high;
}

// A set of keys that answers membership between adds, for passes that ask a batch at a time
// "which of these are new?" (the points listing, verify). Held as sorted runs, no key in two
// runs, each more than twice the size of the next: a batch's new keys become a run, merged
// with the runs before it while those are at most twice its size. So there are at most
// log2(n) + 1 runs, each key is stored once, and adding n keys costs O(n log n) in all.
// Each run has a directory of where each value of its keys' top bits starts (OrderBits, 2-4
// keys per entry), so a lookup reads one directory entry and a key or two per run.
// Memory: sizeof(Key) + 1-2 bytes per key; while two runs merge, also their sum.
// Not thread-safe. Key: ordered, with OrderBits(key).
template <typename Key>
class RunKeySet {
 public:
  // Appends to `out`, ascending, the positions i of `keys` whose key is not in the set (a
  // repeated key at each of its positions).
  void FindAbsent(std::span<const Key> keys, std::vector<size_t>& out) const {
    for (size_t i = 0; i < keys.size(); ++i)
      if (!Contains(keys[i])) out.push_back(i);
  }

  // Adds `keys` (any order, repeats allowed). If `added` is given, appends to it, ascending,
  // the position of the first occurrence of each key that was not in the set before.
  void Insert(std::span<const Key> keys, std::vector<size_t>* added = nullptr) {
    std::vector<std::pair<Key, size_t>> fresh;  // (key, position), sorted below
    for (size_t i = 0; i < keys.size(); ++i)
      if (!Contains(keys[i])) fresh.emplace_back(keys[i], i);
    std::sort(fresh.begin(), fresh.end());
    Run run;
    run.keys.reserve(fresh.size());
    const size_t first_added = added ? added->size() : 0;
    for (size_t i = 0; i < fresh.size(); ++i) {
      if (i > 0 && fresh[i - 1].first == fresh[i].first) continue;  // a repeat, later position
      run.keys.push_back(fresh[i].first);
      if (added) added->push_back(fresh[i].second);
    }
    if (added) std::sort(added->begin() + static_cast<std::ptrdiff_t>(first_added), added->end());
    AddRun(std::move(run));
  }

  // Adds `keys` that the caller knows are ascending, without repeats and not in the set (such
  // as another set's ForEachKeys spans when the two sets are disjoint), without looking them
  // up again. Checked in debug builds.
  void InsertAbsentSorted(std::span<const Key> keys) {
    assert(std::adjacent_find(keys.begin(), keys.end(), std::greater_equal<Key>()) == keys.end());
    assert(std::none_of(keys.begin(), keys.end(), [&](const Key& k) { return Contains(k); }));
    Run run;
    run.keys.assign(keys.begin(), keys.end());
    AddRun(std::move(run));
  }

  // Calls `each` with every key, a sorted span (one run, or part of one) at a time.
  template <typename Each>
  void ForEachKeys(Each each, size_t most = 64 * 1024) const {
    for (const auto& run : runs_)
      for (size_t first = 0; first < run.keys.size(); first += most)
        each(
            std::span<const Key>(run.keys).subspan(first, std::min(most, run.keys.size() - first)));
  }

  bool Contains(const Key& key) const {
    for (const auto& run : runs_)  // the largest first: most keys asked for are there
      if (run.Contains(key)) return true;
    return false;
  }
  size_t size() const { return size_; }
  size_t runs() const { return runs_.size(); }

 private:
  struct Run {
    static constexpr size_t kKeysPerEntry = 2;
    std::vector<Key> keys;         // sorted, no repeats
    std::vector<uint32_t> starts;  // starts[b]: the first key whose top `bits` bits are >= b
    int bits = 0;

    size_t Bucket(const Key& key) const {
      return bits == 0 ? 0 : static_cast<size_t>(OrderBits(key) >> (64 - bits));
    }
    void Index() {
      bits = 0;
      starts.clear();
      if (keys.size() > std::numeric_limits<uint32_t>::max()) return;  // searched whole
      while (bits < 32 && (size_t{2} << bits) * kKeysPerEntry <= keys.size()) ++bits;
      starts.assign((size_t{1} << bits) + 1, static_cast<uint32_t>(keys.size()));
      size_t bucket = 0;
      for (size_t i = 0; i < keys.size(); ++i)
        for (const size_t b = Bucket(keys[i]); bucket <= b;)
          starts[bucket++] = static_cast<uint32_t>(i);
    }
    bool Contains(const Key& key) const {
      if (starts.empty()) return std::binary_search(keys.begin(), keys.end(), key);
      const size_t b = Bucket(key);
      const auto first = keys.begin() + static_cast<std::ptrdiff_t>(starts[b]);
      const auto last = keys.begin() + static_cast<std::ptrdiff_t>(starts[b + 1]);
      return std::binary_search(first, last, key);
    }
  };

  // Appends `run` (sorted, no repeats, disjoint from the set) and merges while the run before
  // the last is at most twice the last's size.
  void AddRun(Run run) {
    if (run.keys.empty()) return;
    size_ += run.keys.size();
    runs_.push_back(std::move(run));
    while (runs_.size() >= 2 &&
           runs_[runs_.size() - 2].keys.size() <= 2 * runs_.back().keys.size()) {
      const auto& older = runs_[runs_.size() - 2].keys;
      const auto& newer = runs_.back().keys;
      std::vector<Key> merged;
      merged.reserve(older.size() + newer.size());
      std::merge(older.begin(), older.end(), newer.begin(), newer.end(),
                 std::back_inserter(merged));
      runs_.pop_back();
      runs_.back().keys = std::move(merged);
    }
    runs_.back().Index();
  }

  std::vector<Run> runs_;  // the oldest (and largest) first
  size_t size_ = 0;
};

using BlockIdSet = SortedKeySet<BlockId>;         // exact
using BlockIdPrefixSet = SortedKeySet<uint64_t>;  // of IdPrefix(id): "maybe" membership

}  // namespace vmsnap::vault

// Unit tests of the block cache (no root, no vault).
#include <doctest/doctest.h>

#include "agent/mount/block_cache.hpp"

using vmsnap::mount::BlockCache;
using vmsnap::mount::BlockData;

namespace {
BlockData Block(size_t size, std::byte fill) {
  return std::make_shared<const std::vector<std::byte>>(size, fill);
}
}  // namespace

TEST_CASE("block cache: hits, misses and least-recently-used eviction within the byte bound") {
  BlockCache cache(3 * 1024);
  CHECK(cache.Lookup(0, 1) == nullptr);
  cache.Insert(0, 1, Block(1024, std::byte{1}));
  cache.Insert(0, 2, Block(1024, std::byte{2}));
  cache.Insert(1, 1, Block(1024, std::byte{3}));  // same index, other disk: a different key
  REQUIRE(cache.Lookup(0, 1) != nullptr);         // 0/1 is now the most recently used
  CHECK((*cache.Lookup(1, 1))[0] == std::byte{3});
  cache.Insert(0, 3, Block(1024, std::byte{4}));  // evicts 0/2, the least recently used
  CHECK(cache.Lookup(0, 2) == nullptr);
  CHECK(cache.Contains(0, 1));
  CHECK(cache.Contains(0, 3));
  auto s = cache.Stats();
  CHECK(s.bytes == 3 * 1024);
  CHECK(s.entries == 3);
  CHECK(s.evictions == 1);
  CHECK(s.hits == 2);
  CHECK(s.misses == 2);
}

TEST_CASE("block cache: a block larger than the bound is not kept; readers keep evicted data") {
  BlockCache cache(1024);
  cache.Insert(0, 0, Block(2048, std::byte{9}));
  CHECK_FALSE(cache.Contains(0, 0));
  cache.Insert(0, 1, Block(1024, std::byte{5}));
  BlockData held = cache.Lookup(0, 1);
  cache.Insert(0, 2, Block(1024, std::byte{6}));  // evicts 0/1
  CHECK_FALSE(cache.Contains(0, 1));
  REQUIRE(held);
  CHECK(held->size() == 1024);
  CHECK((*held)[1023] == std::byte{5});
  // Replacing a key keeps the byte count right.
  cache.Insert(0, 2, Block(512, std::byte{7}));
  CHECK(cache.Stats().bytes == 512);
}

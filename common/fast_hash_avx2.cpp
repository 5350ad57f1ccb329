// XXH3-128 compiled for AVX2 (this file only is built with -mavx2; common/CMakeLists.txt adds
// it on x86-64 with GCC or Clang). FastHashBlock calls it when the CPU reports AVX2 at run
// time. XXH3's values do not depend on the vector width, so local state files written by
// either build match; the unit test "the change-tracking hash is XXH3-128 of the block" pins
// them. AVX2 only, not the library's run-time dispatch: that picks AVX-512 where present, and
// on the Xeon measured the lower AVX-512 clock slowed the SHA-256, zstd and AES beside it
// (docs/PERFORMANCE.md, session 9).
//
// Only <xxhash.h> is included, with its implementation static (XXH_INLINE_ALL): an inline
// function from a shared header compiled here with AVX2 could be the copy the linker keeps for
// the whole program, and crash on a CPU without AVX2.
#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#endif
#define XXH_VECTOR XXH_AVX2
#include <xxhash.h>

namespace vmsnap::detail {

void Xxh3_128Avx2(const void* data, size_t size, unsigned long long* low,
                  unsigned long long* high) {
  XXH128_hash_t h = XXH3_128bits(data, size);
  *low = h.low64;
  *high = h.high64;
}

}  // namespace vmsnap::detail

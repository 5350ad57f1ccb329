// A heap buffer whose first byte is aligned to 4 KiB, for direct I/O (O_DIRECT, and unbuffered
// writes on Windows, need the address, the offset and the length aligned to the device's
// block size). It keeps its memory from one use to the next: fresh memory costs a page fault
// per 4 KiB on first touch, which on a VM is a large part of a bulk read or write.
// Contents are not initialised, and are lost when Reserve grows the buffer. Not thread-safe
// (one owner at a time); movable, not copyable. Allocation failure throws std::bad_alloc.
// Uses the aligned operator new/delete: std::aligned_alloc is missing from mingw-w64's C library.
#pragma once

#include <cstddef>
#include <memory>
#include <new>

namespace vmsnap {

class AlignedBuffer {
 public:
  static constexpr size_t kAlignment = 4096;

  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t capacity) { Reserve(capacity); }

  // Makes capacity() at least n (the old contents are dropped when it grows).
  void Reserve(size_t n) {
    if (n <= capacity_) return;
    data_.reset(static_cast<char*>(::operator new (n, std::align_val_t{kAlignment})));
    capacity_ = n;
  }
  char* data() { return data_.get(); }
  const char* data() const { return data_.get(); }
  std::byte* bytes() { return reinterpret_cast<std::byte*>(data_.get()); }
  size_t capacity() const { return capacity_; }

 private:
  struct Free {
    void operator()(char* p) const noexcept { ::operator delete (p, std::align_val_t{kAlignment}); }
  };
  std::unique_ptr<char, Free> data_;
  size_t capacity_ = 0;
};

}  // namespace vmsnap

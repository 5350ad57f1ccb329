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
#include <mutex>
#include <new>
#include <utility>
#include <vector>

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

// Aligned buffers kept from one use to the next by code that allocates a large buffer per
// request (each new one would be fresh memory, a page fault per 4 KiB). Thread-safe. Keeps at
// most max_kept buffers of at most max_bytes each; others are freed when given back.
class AlignedBufferPool {
 public:
  AlignedBufferPool(size_t max_kept, size_t max_bytes)
      : max_kept_(max_kept), max_bytes_(max_bytes) {}

  // A kept buffer (its contents are stale), or an empty one when none is kept.
  AlignedBuffer Take() {
    std::lock_guard lock(mu_);
    if (kept_.empty()) return {};
    AlignedBuffer b = std::move(kept_.back());
    kept_.pop_back();
    return b;
  }
  // Gives back a buffer from Take (or any other one).
  void Give(AlignedBuffer buffer) {
    if (buffer.capacity() == 0 || buffer.capacity() > max_bytes_) return;
    std::lock_guard lock(mu_);
    if (kept_.size() < max_kept_) kept_.push_back(std::move(buffer));
  }

  // A buffer taken for one scope and given back when the lease ends.
  class Lease {
   public:
    explicit Lease(AlignedBufferPool& pool) : pool_(pool), buffer_(pool.Take()) {}
    ~Lease() { pool_.Give(std::move(buffer_)); }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    AlignedBuffer& operator*() { return buffer_; }
    AlignedBuffer* operator->() { return &buffer_; }

   private:
    AlignedBufferPool& pool_;
    AlignedBuffer buffer_;
  };

 private:
  const size_t max_kept_;
  const size_t max_bytes_;
  std::mutex mu_;
  std::vector<AlignedBuffer> kept_;
};

}  // namespace vmsnap

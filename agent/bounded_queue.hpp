// A multi-producer multi-consumer queue bounded by the total "cost" (bytes) of its items, so
// a fast reader cannot run ahead of a slow uploader and grow memory without limit.
// Close(): no more pushes; consumers drain what is left. Cancel(): pushes and pops fail at
// once (used when a job fails). Thread-safe.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>

namespace vmsnap::agent {

template <class T>
class BoundedQueue {
 public:
  explicit BoundedQueue(uint64_t capacity) : capacity_(capacity) {}

  // Blocks while full. Returns false if the queue was cancelled or closed.
  bool Push(T item, uint64_t cost) {
    std::unique_lock lock(mu_);
    not_full_.wait(
        lock, [&] { return cancelled_ || closed_ || used_ == 0 || used_ + cost <= capacity_; });
    if (cancelled_ || closed_) return false;
    used_ += cost;
    items_.push_back({std::move(item), cost});
    not_empty_.notify_one();
    return true;
  }

  // Waits up to `wait` for an item. nullopt on timeout, or when closed and drained, or
  // cancelled; `finished` tells the last two apart from a timeout.
  std::optional<T> Pop(std::chrono::milliseconds wait, bool& finished) {
    std::unique_lock lock(mu_);
    finished = false;
    not_empty_.wait_for(lock, wait, [&] { return cancelled_ || closed_ || !items_.empty(); });
    if (cancelled_ || (items_.empty() && closed_)) {
      finished = true;
      return std::nullopt;
    }
    if (items_.empty()) return std::nullopt;
    auto [item, cost] = std::move(items_.front());
    items_.pop_front();
    used_ -= cost;
    not_full_.notify_all();
    return std::move(item);
  }

  void Close() {
    std::lock_guard lock(mu_);
    closed_ = true;
    not_empty_.notify_all();
    not_full_.notify_all();
  }
  void Cancel() {
    std::lock_guard lock(mu_);
    cancelled_ = true;
    not_empty_.notify_all();
    not_full_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable not_full_, not_empty_;
  std::deque<std::pair<T, uint64_t>> items_;
  uint64_t capacity_;
  uint64_t used_ = 0;
  bool closed_ = false;
  bool cancelled_ = false;
};

}  // namespace vmsnap::agent

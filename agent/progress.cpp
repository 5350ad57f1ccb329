#include "agent/progress.hpp"

#include <spdlog/spdlog.h>

#include <cstdio>

namespace vmsnap::agent {

ProgressReporter::ProgressReporter(std::string what, uint64_t total_bytes, bool enabled)
    : what_(std::move(what)),
      total_(total_bytes),
      enabled_(enabled),
      start_(std::chrono::steady_clock::now()),
      last_(start_) {}

void ProgressReporter::Update(uint64_t done, const std::string& extra) {
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  if (now - start_ < std::chrono::seconds(3) || now - last_ < std::chrono::seconds(3)) return;
  last_ = now;
  double secs = std::chrono::duration<double>(now - start_).count();
  double rate = secs > 0 ? done / secs : 0;
  double left = rate > 0 && total_ > done ? (total_ - done) / rate : 0;
  spdlog::info("{}: {:.0f}% ({} of {}), {}/s, about {:.0f} s left{}{}", what_,
               total_ ? 100.0 * done / total_ : 100.0, HumanBytes(done), HumanBytes(total_),
               HumanBytes(static_cast<uint64_t>(rate)), left, extra.empty() ? "" : ", ", extra);
  printed_ = true;
}

void ProgressReporter::Done() {
  if (!enabled_ || !printed_) return;
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  spdlog::info("{}: done in {:.1f} s", what_, secs);
}

}  // namespace vmsnap::agent

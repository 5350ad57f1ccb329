// Progress lines for long jobs, on stderr through the logger: percentage, throughput and time
// left, at most every few seconds and only once a job has run for a while (short jobs stay
// quiet). Update() and Done() are called from one thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "common/cli_output.hpp"

namespace vmsnap::agent {

using vmsnap::HumanBytes;

class ProgressReporter {
 public:
  ProgressReporter(std::string what, uint64_t total_bytes, bool enabled);
  void Update(uint64_t done_bytes, const std::string& extra = {});
  void Done();

 private:
  std::string what_;
  uint64_t total_;
  bool enabled_;
  std::chrono::steady_clock::time_point start_, last_;
  bool printed_ = false;
};

}  // namespace vmsnap::agent

#include "common/cli_output.hpp"

#include <cstdio>
#include <ctime>
#include <iostream>
#include <nlohmann/json.hpp>

namespace vmsnap {

std::string HumanBytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return buf;
}

int ReportFailure(const std::string& program, const Status& st, bool as_json) {
  if (as_json)
    std::cout << nlohmann::json{{"error", st.cause()},
                                {"code", CodeName(st.code())},
                                {"phase", st.phase()},
                                {"fix", st.fix()},
                                {"retryable", st.retryable()}}
                     .dump()
              << std::endl;
  std::cerr << program << ": error: " << st.ToString() << std::endl;
  return st.ExitCode();
}

std::string FormatUtc(int64_t unix_ms, const char* format) {
  std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[64];
  std::strftime(buf, sizeof buf, format, &tm);
  return buf;
}

}  // namespace vmsnap

#include "common/cli_output.hpp"

#include <ctime>
#include <iostream>
#include <nlohmann/json.hpp>

namespace vmsnap {

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

// How the three command-line programs report a failure and format times, so that every
// command says the same thing the same way (docs/OPERATIONS.md, "Errors and exit codes").
#pragma once

#include <cstdint>
#include <string>

#include "common/status.hpp"

namespace vmsnap {

// Prints "PROGRAM: error: phase: cause (CODE). Fix: ..." on stderr and, with as_json, one JSON
// object {"error","code","phase","fix","retryable"} on stdout. Returns st.ExitCode().
int ReportFailure(const std::string& program, const Status& st, bool as_json);

// "1.5 GiB", "24.0 MiB", "512 B": binary units, one decimal above bytes.
std::string HumanBytes(uint64_t bytes);

// UTC time of Unix milliseconds, formatted with strftime (default ISO 8601, "…T…Z").
std::string FormatUtc(int64_t unix_ms, const char* format = "%Y-%m-%dT%H:%M:%SZ");

}  // namespace vmsnap

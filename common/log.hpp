// Logging set-up shared by the three binaries: spdlog to stderr (stdout stays clean for
// --json output). Call InitLogging once at start-up, before any thread starts.
#pragma once

#include <string>

namespace vmsnap {

// level: "trace", "debug", "info", "warn", "error", "off".
void InitLogging(const std::string& program, const std::string& level = "info");

}  // namespace vmsnap

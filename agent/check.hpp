// `vmsnap-agent check`: whether this enrolled agent could back up now, step by step, the way an
// operator would check by hand after installing it or when backups fail: its config, the
// vault's name in DNS, the vault over verified TLS, the agent's credential, each disk it
// protects, its state directory, its hook scripts and the freeze guard. Changes nothing: no job
// is taken from the vault, nothing is frozen, nothing is written but a nameless scratch file that
// is gone when it is closed.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.hpp"

namespace vmsnap::agent {

struct CheckOptions {
  std::string config_path;           // the agent config written by `enroll`
  std::chrono::seconds timeout{10};  // for each network step (one attempt each)
  std::string freeze_guard;          // empty: not checked (Windows: VSS instead)
};

// One step: what was checked, what was found (detail) or why it failed (status, with the
// step as its phase), or that it was skipped because an earlier step it needs failed.
struct CheckStep {
  std::string name;
  Status status;
  std::string detail;
  bool skipped = false;
  nlohmann::json ToJson() const;
};

struct CheckReport {
  std::vector<CheckStep> steps;
  // The first failed step's status, or OK when every step passed.
  Status FirstFailure() const;
  // {"ok", "checks": [...]}, plus the first failure's "error", "code", "phase" and "fix".
  nlohmann::json ToJson() const;
};

// Runs every step; one that needs what an earlier one failed to give (the config, the
// vault's address, a connection) is skipped. Never throws; thread-compatible.
CheckReport RunCheck(const CheckOptions& options);

}  // namespace vmsnap::agent

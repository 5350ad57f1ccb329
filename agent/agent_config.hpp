// The enrolled agent's configuration file (default /etc/vmsnap/agent.json, on Windows
// %ProgramData%\vmsnap\agent.json; mode 0600, a private DACL on Windows): where
// the vault is, the pinned CA, the agent's own credential, and what to protect. Written by
// `vmsnap-agent enroll`, read by `vmsnap-agent run`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/https_client.hpp"
#include "common/status.hpp"
#include "platform/env.hpp"

namespace vmsnap::agent {

inline const std::string kDefaultConfigPath = platform::DefaultAgentPaths().config_file;

struct AgentConfig {
  std::string vault_url;
  std::string ca_file;     // the vault's CA, pinned at enrollment
  std::string name;        // this VM's item name in the vault
  std::string credential;  // the agent's own token (secret)
  std::vector<std::string> disks;
  std::string state_dir = platform::DefaultAgentPaths().state_dir;
  uint32_t block_size = 0;  // 0: the latest point's, or the default (BackupOptions)
  uint64_t max_rate_bytes_per_s = 0;
  // Consistency (issue 3), as the `backup` command's flags of the same names.
  std::string hooks_dir = platform::DefaultAgentPaths().hooks_dir;
  std::string azure_config = platform::DefaultAgentPaths().azure_config;  // Linux only
  std::string runtime_dir = platform::DefaultAgentPaths().runtime_dir;
  int freeze_deadline_s = 10;
  std::string snapshot_provider = "auto";
  std::string snapshot_command;
  bool allow_inconsistent = false;
  std::vector<std::string> freeze_only_under;
  // VSS (Windows, issue 8), as the `backup` command's --vss-* flags.
  std::string vss_backup_type = "copy";           // "copy" or "full"
  std::vector<std::string> vss_excluded_writers;  // names or writer class ids
  int vss_snapshot_timeout_s = 60;                // 1 to 60

  static Result<AgentConfig> Load(const std::string& path);
  Status Save(const std::string& path) const;  // atomic, mode 0600
  ClientOptions Client() const;
};

}  // namespace vmsnap::agent

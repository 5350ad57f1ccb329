#include "agent/agent_config.hpp"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/block_codec.hpp"
#include "platform/env.hpp"
#include "platform/vss.hpp"

namespace vmsnap::agent {

using nlohmann::json;

Result<AgentConfig> AgentConfig::Load(const std::string& path) {
  auto text = platform::Env::Default()->ReadFile(path);
  if (!text.ok())
    return std::move(text.take_status())
        .WithFix(
            "enroll this agent first: vmsnap-agent enroll --vault URL --ca-fingerprint FP "
            "--token TOKEN")
        .InPhase("read agent config");
  json j = json::parse(*text, nullptr, false);
  AgentConfig c;
  try {
    c.vault_url = j.at("vault");
    c.ca_file = j.at("ca_file");
    c.name = j.at("name");
    c.credential = j.at("credential");
    c.disks = j.value("disks", std::vector<std::string>{});
    c.state_dir = j.value("state_dir", c.state_dir);
    c.block_size = j.value("block_size", c.block_size);
    c.max_rate_bytes_per_s = j.value("max_rate_bytes_per_s", uint64_t{0});
    c.hooks_dir = j.value("hooks_dir", c.hooks_dir);
    c.azure_config = j.value("azure_config", c.azure_config);
    c.runtime_dir = j.value("runtime_dir", c.runtime_dir);
    c.freeze_deadline_s = j.value("freeze_deadline_s", c.freeze_deadline_s);
    c.snapshot_provider = j.value("snapshot_provider", c.snapshot_provider);
    c.snapshot_command = j.value("snapshot_command", c.snapshot_command);
    c.allow_inconsistent = j.value("allow_inconsistent", false);
    c.freeze_only_under = j.value("freeze_only_under", std::vector<std::string>{});
    c.vss_backup_type = j.value("vss_backup_type", c.vss_backup_type);
    c.vss_excluded_writers = j.value("vss_excluded_writers", std::vector<std::string>{});
    c.vss_snapshot_timeout_s = j.value("vss_snapshot_timeout_s", c.vss_snapshot_timeout_s);
    if (c.block_size != 0 && !ValidateBlockSize(c.block_size).ok())
      throw std::out_of_range("block_size must be 0 (automatic) or a power of two 16K..4M");
    if (c.freeze_deadline_s < 1 || c.freeze_deadline_s > 60)
      throw std::out_of_range("freeze_deadline_s must be 1 to 60");
    if (c.vss_snapshot_timeout_s < 1 || c.vss_snapshot_timeout_s > 60)
      throw std::out_of_range("vss_snapshot_timeout_s must be 1 to 60");
    if (!platform::ParseVssBackupType(c.vss_backup_type).ok())
      throw std::out_of_range("vss_backup_type must be \"copy\" or \"full\"");
  } catch (const std::exception& e) {
    return Status::InvalidArgument("agent config " + path + " is invalid: " + e.what(),
                                   "enroll again to rewrite it")
        .InPhase("read agent config");
  }
  return c;
}

Status AgentConfig::Save(const std::string& path) const {
  std::error_code ec;
  auto dir = std::filesystem::path(path).parent_path();
  if (!dir.empty()) std::filesystem::create_directories(dir, ec);
  json j{{"vault", vault_url},
         {"ca_file", ca_file},
         {"name", name},
         {"credential", credential},
         {"disks", disks},
         {"state_dir", state_dir},
         {"block_size", block_size},
         {"max_rate_bytes_per_s", max_rate_bytes_per_s},
         {"hooks_dir", hooks_dir},
         {"azure_config", azure_config},
         {"runtime_dir", runtime_dir},
         {"freeze_deadline_s", freeze_deadline_s},
         {"snapshot_provider", snapshot_provider},
         {"snapshot_command", snapshot_command},
         {"allow_inconsistent", allow_inconsistent},
         {"freeze_only_under", freeze_only_under},
         {"vss_backup_type", vss_backup_type},
         {"vss_excluded_writers", vss_excluded_writers},
         {"vss_snapshot_timeout_s", vss_snapshot_timeout_s}};
  return platform::Env::Default()->WriteFileAtomic(path, j.dump(2) + "\n", 0600);
}

ClientOptions AgentConfig::Client() const {
  ClientOptions o;
  o.url = vault_url;
  o.ca_file = ca_file;
  o.token = credential;
  return o;
}

}  // namespace vmsnap::agent

// vmsnap-agent: backs up this machine's disks to a vmsnap vault and restores them.
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "agent/agent_config.hpp"
#include "agent/backup.hpp"
#include "agent/check.hpp"
#include "agent/daemon.hpp"
#include "agent/progress.hpp"
#include "agent/restore.hpp"
#include "agent/vault_client.hpp"
#include "common/cli_output.hpp"
#include "common/log.hpp"
#include "platform/env.hpp"

using namespace vmsnap;
using namespace vmsnap::agent;
using nlohmann::json;

namespace {

struct Connection {
  std::string vault, ca, token, token_file;
  int retries = 6;
  int timeout_s = 120;

  void AddTo(CLI::App* app) {
    app->add_option("--vault", vault, "Vault URL, https://HOST:PORT")->required();
    app->add_option("--ca", ca, "CA certificate of the vault (PEM)")->required();
    auto* t = app->add_option("--token", token, "Access token");
    auto* tf = app->add_option("--token-file", token_file, "File holding the access token");
    t->excludes(tf);
    app->add_option("--retries", retries, "Attempts per request on transient errors")
        ->capture_default_str()
        ->check(CLI::Range(1, 100));
    app->add_option("--timeout", timeout_s, "Seconds to wait for each network step")
        ->capture_default_str()
        ->check(CLI::Range(1, 3600));
  }

  Result<ClientOptions> Options() const {
    ClientOptions o;
    o.url = vault;
    o.ca_file = ca;
    o.token = token;
    if (!token_file.empty()) {
      auto t = platform::Env::Default()->ReadFile(token_file);
      if (!t.ok()) return std::move(t.take_status()).InPhase("read token file");
      o.token = *t;
      while (!o.token.empty() && (o.token.back() == '\n' || o.token.back() == '\r'))
        o.token.pop_back();
    }
    o.max_attempts = retries;
    o.io_timeout = std::chrono::seconds(timeout_s);
    return o;
  }
};

int Fail(const Status& st, bool as_json) {
  return ReportFailure("vmsnap-agent", st, as_json);
}

double Rate(uint64_t bytes, int64_t ms) {
  return ms > 0 ? bytes / (ms / 1000.0) : 0;
}

// One line: what the consistency engine did (scripts, filesystems frozen, freeze window).
std::string EvidenceSummary(const json& ev) {
  int scripts = 0, scripts_ok = 0, fs_total = 0, fs_frozen = 0;
  for (const auto& s : ev.value("scripts", json::array())) {
    ++scripts;
    if (s.value("ok", false)) ++scripts_ok;
  }
  for (const auto& f : ev.value("filesystems", json::array())) {
    ++fs_total;
    if (f.value("frozen", false)) ++fs_frozen;
  }
  const json freeze = ev.value("freeze", json::object());
  std::string out = std::to_string(scripts_ok) + "/" + std::to_string(scripts) +
                    " script runs ok, " + std::to_string(fs_frozen) + "/" +
                    std::to_string(fs_total) + " filesystems frozen";
  if (fs_frozen > 0) {
    char window[64];
    std::snprintf(window, sizeof window, ", freeze window %.1f ms", freeze.value("window_ms", 0.0));
    out += window;
  }
  if (freeze.value("deadline_hit", false)) out += ", deadline hit";
  const json snapshot = ev.value("snapshot", json::object());
  out += ", snapshot: " + snapshot.value("provider", std::string("?"));
  if (ev.value("leftover_freeze", json::object()).value("found", false))
    out += "; thawed a leftover freeze of an interrupted backup";
  return out;
}

void PrintBackup(const BackupReport& r) {
  std::cout << "recovery point " << r.recovery_point << " (item " << r.item
            << ", consistency: " << r.consistency << ")\n";
  std::cout << "  consistency: " << r.evidence.value("reason", std::string()) << "\n"
            << "  evidence: " << EvidenceSummary(r.evidence) << "\n";
  uint64_t total = 0, sent = 0;
  for (const auto& d : r.disks) {
    total += d.size_bytes;
    sent += d.bytes_uploaded;
    std::cout << "  disk " << d.index << " " << d.path << ": " << HumanBytes(d.size_bytes) << ", "
              << d.mode << ", blocks: " << d.blocks_total << " total, " << d.blocks_read
              << " read, " << d.blocks_zero << " zero, " << d.blocks_changed << " changed, "
              << d.blocks_uploaded << " uploaded (" << HumanBytes(d.bytes_uploaded) << ")\n";
  }
  std::cout << "  " << HumanBytes(r.bytes_sent) << " on the wire in " << r.duration_ms / 1000.0
            << " s (" << HumanBytes(static_cast<uint64_t>(Rate(total, r.duration_ms)))
            << "/s of disk scanned)\n";
  std::cout << "  time:";
  const char* separator = " ";
  for (const char* phase : {"prepare", "consistency", "transfer", "commit"}) {
    if (!r.phases_ms.contains(phase)) continue;
    std::cout << separator << phase << " " << r.phases_ms[phase].get<int64_t>() << " ms";
    separator = ", ";
  }
  std::cout << "\n";
}

void PrintRestore(const RestoreReport& r) {
  std::cout << "restored recovery point " << r.recovery_point << " (consistency: " << r.consistency
            << ")\n";
  uint64_t total = 0;
  for (const auto& d : r.disks) {
    total += d.size_bytes;
    std::cout << "  disk " << d.index << " (" << d.source << ") -> " << d.target << ": "
              << HumanBytes(d.size_bytes) << ", " << d.blocks_data << " blocks verified and "
              << "written, " << d.blocks_zero << " zero\n";
  }
  std::cout << "  " << HumanBytes(r.bytes_received) << " received in " << r.duration_ms / 1000.0
            << " s (" << HumanBytes(static_cast<uint64_t>(Rate(total, r.duration_ms)))
            << "/s of disk written)\n";
}

}  // namespace

int main(int argc, char** argv) {
  platform::TuneAllocatorForLargeBuffers();
  CLI::App app{"vmsnap-agent: block-level backup of this machine's disks to a vmsnap vault"};
  app.require_subcommand(1);
  std::string log_level = "info";
  bool as_json = false;
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off");

  // backup
  auto* backup = app.add_subcommand("backup", "Back up disks (full first, then incremental)");
  Connection bconn;
  bconn.AddTo(backup);
  BackupOptions bopt;
  std::string block_size;
  backup->add_option("--disk", bopt.disks, "Block device or image file (repeatable)")->required();
  backup->add_option("--block-size", block_size,
                     "Block size, power of two 16K..4M (default: the latest recovery point's, "
                     "32K for a first backup; a different size makes a full backup)");
  backup->add_option("--item", bopt.item, "Name of this machine in the vault (default: host name)");
  backup->add_option("--state-dir", bopt.state_dir, "Where change-tracking state is kept")
      ->capture_default_str();
  backup->add_option("--workers", bopt.workers, "Reader/hasher threads (default: one per core)");
  backup->add_option("--uploaders", bopt.uploaders, "Parallel upload connections")
      ->capture_default_str()
      ->check(CLI::Range(1, 32));
  backup->add_option("--max-rate", bopt.max_rate_bytes_per_s, "Upload limit in bytes/s (0: none)");
  int session_keepalive_s = static_cast<int>(bopt.session_keepalive.count());
  backup
      ->add_option("--session-keepalive", session_keepalive_s,
                   "Seconds between the agent's signs of life to the vault during a backup; after "
                   "5 missed ones the vault's cleanup takes the agent as gone")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600));
  backup->add_option("--map-page-entries", bopt.map_page_entries)
      ->group("")
      ->check(CLI::PositiveNumber);
  backup
      ->add_option("--manifest-part-size", bopt.manifest_part_bytes,
                   "A disk's block list larger than this many bytes is sent in parts of this "
                   "size (each one request)")
      ->capture_default_str()
      ->check(CLI::Range(uint64_t{4096}, uint64_t{64} << 20));
  backup->add_flag("--json", as_json, "Print one JSON object with the report on stdout");
  ConsistencyOptions& copt = bopt.consistency;
  int freeze_deadline_s = 10;
  std::string hook_failure = "continue";
  copt.guard_binary = DefaultFreezeGuardPath();
  copt.runtime_dir = platform::DefaultAgentPaths().runtime_dir;
  backup
      ->add_option("--hooks-dir", copt.hooks.hooks_dir,
                   "Hook scripts, called with freeze / thaw (lexical order)")
      ->capture_default_str();
  backup
      ->add_option("--hook-failure", hook_failure,
                   "A failing freeze hook: continue (file-system at best) or fail the backup")
      ->capture_default_str()
      ->check(CLI::IsMember({"continue", "fail"}));
  backup
      ->add_option("--azure-config", copt.hooks.azure_config_path,
                   "Azure VMSnapshotScriptPluginConfig.json, honoured if it exists")
      ->capture_default_str();
  backup
      ->add_option("--runtime-dir", copt.runtime_dir,
                   "Frozen marker and lock; must be on a filesystem never frozen")
      ->capture_default_str();
  backup
      ->add_option("--freeze-deadline", freeze_deadline_s,
                   "Seconds after which filesystems are thawed whatever happens")
      ->capture_default_str()
      ->check(CLI::Range(1, 60));
  backup->add_option("--snapshot", copt.snapshot.provider, "Snapshot provider")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "file", "loop-reflink", "command", "lvm", "vss"}));
  backup->add_option("--snapshot-command", copt.snapshot.command_path,
                     "--snapshot command: executable run inside the freeze window with the disk "
                     "paths; prints one path to read per disk");
  backup->add_option("--snapshot-cleanup-command", copt.snapshot.cleanup_command_path,
                     "--snapshot command: executable run after the transfer with those paths");
  backup->add_flag("--allow-inconsistent", copt.allow_none,
                   "When no snapshot is possible, read the live disks (consistency: none)");
  backup->add_option("--guard", copt.guard_binary, "Path of vmsnap-freeze-guard")
      ->capture_default_str();
  backup->add_option("--freeze-only-under", copt.freeze_only_under,
                     "Safety restriction: freeze only mount points below DIR (repeatable)");
  // VSS (Windows volumes, --snapshot vss or auto with \\.\C:): docs/WINDOWS.md.
  std::string vss_backup_type = "copy";
  int vss_snapshot_timeout_s = 60;
  backup
      ->add_option("--vss-backup-type", vss_backup_type,
                   "copy (keeps other products' log chains) or full (writers truncate logs)")
      ->capture_default_str()
      ->check(CLI::IsMember({"copy", "full"}));
  backup->add_option("--vss-exclude-writer", copt.vss.excluded_writers,
                     "Leave a VSS writer out, by name or class id (repeatable; at most "
                     "file-system consistency when it is present)");
  backup
      ->add_option("--vss-snapshot-timeout", vss_snapshot_timeout_s,
                   "Seconds DoSnapshotSet may take before the backup is aborted")
      ->capture_default_str()
      ->check(CLI::Range(1, 60));

  // restore
  auto* restore = app.add_subcommand("restore", "Restore disks of a recovery point");
  Connection rconn;
  rconn.AddTo(restore);
  RestoreOptions ropt;
  restore->add_option("--rp", ropt.recovery_point, "Recovery point id")->required();
  restore->add_option("--disk", ropt.disk, "Restore only this disk (index from 0)");
  restore->add_option("--to", ropt.targets, "Target device or file (one per disk)")->required();
  restore->add_option("--fetchers", ropt.fetchers, "Parallel download connections")
      ->capture_default_str()
      ->check(CLI::Range(1, 32));
  restore
      ->add_option("--state-dir", ropt.state_dir,
                   "Where the block maps being restored are kept meanwhile (57 bytes per "
                   "block with data)")
      ->capture_default_str();
  // Entries per request when a block map is read from the vault (tests use small pages).
  restore->add_option("--map-page-entries", ropt.map_page_entries)
      ->group("")
      ->check(CLI::PositiveNumber);
  bool no_space_check = false;
  restore->add_flag("--no-space-check", no_space_check,
                    "Write even when a target's filesystem seems to lack the room for the data "
                    "(a filesystem that compresses or deduplicates may take less)");
  restore->add_flag("--json", as_json, "Print one JSON object with the report on stdout");

  // list
  auto* list = app.add_subcommand("list", "List recovery points");
  Connection lconn;
  lconn.AddTo(list);
  std::string list_item;
  list->add_option("--item", list_item, "Only this item (default: all the token can see)");
  list->add_flag("--json", as_json, "Print JSON on stdout");

  // check
  auto* check = app.add_subcommand(
      "check",
      "Check that this enrolled agent can back up now: its config, the vault's name in DNS, the "
      "vault over verified TLS, its credential, its disks, its state directory, its hook scripts "
      "and the freeze guard (changes nothing)");
  CheckOptions chopt;
  chopt.config_path = kDefaultConfigPath;
  int check_timeout_s = static_cast<int>(chopt.timeout.count());
  check->add_option("--config", chopt.config_path, "Agent config written by enroll")
      ->capture_default_str();
  check->add_option("--timeout", check_timeout_s, "Seconds to wait for each network step")
      ->capture_default_str()
      ->check(CLI::Range(1, 600));
  check->add_flag("--json", as_json, "Print one JSON object with every check on stdout");

  // enroll and run (the daemon), issue 4.
  auto daemon = DaemonCommands::Add(app);
  // UTF-8 arguments on every platform (paths with non-ASCII characters on Windows).
  std::vector<std::string> args = platform::CommandLineArguments(argc, argv);
  std::vector<char*> args_utf8;
  for (auto& a : args) args_utf8.push_back(a.data());
  CLI11_PARSE(app, static_cast<int>(args_utf8.size()), args_utf8.data());
  InitLogging("vmsnap-agent", log_level);
  if (daemon->Handles()) return daemon->Execute();

  if (*check) {
    chopt.timeout = std::chrono::seconds(check_timeout_s);
#ifndef _WIN32
    chopt.freeze_guard = DefaultFreezeGuardPath();  // Windows quiesces with VSS instead
#endif
    const CheckReport report = RunCheck(chopt);
    const Status failure = report.FirstFailure();
    if (as_json) {
      std::cout << report.ToJson().dump() << std::endl;
    } else {
      for (const auto& step : report.steps) {
        const char* result = step.skipped ? "skipped" : step.status.ok() ? "ok" : "FAILED";
        std::string text = step.status.ok() ? step.detail : step.status.cause();
        if (!step.status.ok() && !step.status.fix().empty()) text += ". Fix: " + step.status.fix();
        std::printf("%-8s %-16s %s\n", result, step.name.c_str(), text.c_str());
      }
    }
    return failure.ok() ? 0 : Fail(failure, /*as_json=*/false);  // the report holds its JSON
  }

  if (*backup) {
    if (!block_size.empty()) {  // else 0: the latest point's, or the default
      auto size = ParseBlockSize(block_size);
      if (!size.ok()) return Fail(std::move(size.take_status()).InPhase("prepare"), as_json);
      bopt.block_size = *size;
    }
    copt.freeze_deadline = std::chrono::seconds(freeze_deadline_s);
    bopt.session_keepalive = std::chrono::seconds(session_keepalive_s);
    copt.hooks.native_continue_on_failure = hook_failure == "continue";
    if (auto type = platform::ParseVssBackupType(vss_backup_type); type.ok())
      copt.vss.backup_type = *type;  // CLI11 checked the value
    copt.vss.snapshot_timeout = std::chrono::seconds(vss_snapshot_timeout_s);
    if (copt.snapshot.provider == "command" && copt.snapshot.command_path.empty())
      return Fail(Status::InvalidArgument("--snapshot command needs an executable",
                                          "pass --snapshot-command PATH")
                      .InPhase("prepare"),
                  as_json);
    auto client = bconn.Options();
    if (!client.ok()) return Fail(client.status(), as_json);
    bopt.client = *client;
    auto report = RunBackup(bopt);
    if (!report.ok()) return Fail(report.status(), as_json);
    if (as_json)
      std::cout << report->ToJson().dump() << std::endl;
    else
      PrintBackup(*report);
    return 0;
  }
  if (*restore) {
    auto client = rconn.Options();
    if (!client.ok()) return Fail(client.status(), as_json);
    ropt.client = *client;
    ropt.check_space = !no_space_check;
    auto report = RunRestore(ropt);
    if (!report.ok()) return Fail(report.status(), as_json);
    if (as_json)
      std::cout << report->ToJson().dump() << std::endl;
    else
      PrintRestore(*report);
    return 0;
  }
  if (*list) {
    auto client = lconn.Options();
    if (!client.ok()) return Fail(client.status(), as_json);
    auto vc = VaultClient::Create(*client);
    if (!vc.ok()) return Fail(vc.status(), as_json);
    auto rps = (*vc)->ListRecoveryPoints(list_item);
    if (!rps.ok()) return Fail(std::move(rps.take_status()).InPhase("list"), as_json);
    if (as_json) {
      json out = json::array();
      for (auto rp : *rps) {
        rp.erase("report");
        out.push_back(rp);
      }
      std::cout << json{{"recovery_points", out}}.dump() << std::endl;
      return 0;
    }
    std::printf("%-26s %-16s %-20s %-12s %5s %10s %10s\n", "RECOVERY POINT", "ITEM", "CREATED",
                "CONSISTENCY", "DISKS", "SIZE", "UPLOADED");
    for (const auto& rp : *rps) {
      uint64_t size = 0, up = 0;
      for (const auto& d : rp["disks"]) {
        size += d.value("size_bytes", 0ull);
        up += d["stats"].value("bytes_uploaded", 0ull);
      }
      std::printf("%-26s %-16s %-20s %-12s %5zu %10s %10s\n", rp.value("id", "").c_str(),
                  rp.value("item", "").c_str(),
                  FormatUtc(rp.value("created_unix_ms", int64_t{0}), "%Y-%m-%d %H:%M:%SZ").c_str(),
                  rp.value("consistency", "").c_str(), rp["disks"].size(), HumanBytes(size).c_str(),
                  HumanBytes(up).c_str());
    }
    return 0;
  }
  return 2;
}

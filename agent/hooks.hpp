// Pre/post scripts around the freeze (issue 3, "Scripts").
//
// Two sources, both optional and both configurable (tests use their own paths):
//  - Native hooks: every executable regular file in hooks_dir (default /etc/vmsnap/hooks.d;
//    Windows: %ProgramData%\vmsnap\hooks.d, where any .exe/.cmd/.bat/.ps1 file is a program,
//    see platform::IsProgramFile), in lexical order, called with the argument "freeze" before
//    the freeze and "thaw" after
//    (QEMU guest agent fsfreeze-hook.d convention). Skipped: *.sample *~ *.bak *.orig *.rpm*
//    *.dpkg-*, hidden files and non-executables. "thaw" runs for every hook whose "freeze"
//    ran, in reverse order, even when a later step failed.
//  - Azure compatibility: /etc/azure/VMSnapshotScriptPluginConfig.json, if it exists, with
//    preScriptLocation, postScriptLocation, preScriptParams, postScriptParams,
//    preScriptNoOfRetries, postScriptNoOfRetries, timeoutInSeconds (default 30),
//    continueBackupOnFailure (default true), fsFreezeEnabled (default true). Unlike Azure:
//    retries really re-run the script, a timed-out script is killed with its process group,
//    and the timeout is not capped.
//
// Every script and the Azure config must be owned by root and not writable by group or
// others; otherwise it is refused (recorded as a failed script whose error names the file and
// the chown/chmod fix). Order: native "freeze" hooks, then the Azure pre script; after the
// snapshot: the Azure post script, then native "thaw" hooks in reverse.
//
// Not thread-safe: one ScriptHooks per backup, used by one thread. Scripts run in their own
// process group (RunProcess); their output is kept in memory only (the tail, for the report).
#pragma once

#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/status.hpp"
#include "platform/env.hpp"

namespace vmsnap::agent {

struct HookOptions {
  std::string hooks_dir = platform::DefaultAgentPaths().hooks_dir;
  std::string azure_config_path = platform::DefaultAgentPaths().azure_config;  // "" on Windows
  std::chrono::seconds native_timeout{30};  // per native hook call
  // A failing native "freeze" hook: true = keep going (the backup is at most file-system
  // consistent), false = stop running further freeze hooks and fail the backup.
  bool native_continue_on_failure = true;
};

// One script run (all attempts of it), for the report.
struct ScriptRecord {
  std::string name;  // file name (or the config file for a refused config)
  std::string path;
  std::string source;  // "hooks.d" or "azure"
  std::string phase;   // "freeze"/"thaw" (hooks.d) or "pre"/"post" (azure)
  int attempts = 0;
  int exit_code = -1;  // of the last attempt; -1 when it did not exit normally
  bool timed_out = false;
  bool refused = false;  // not run: bad ownership/mode, bad config, cannot start
  bool ok = false;
  int64_t duration_ms = 0;  // all attempts together
  std::string output_tail;  // last ~4 KiB of stdout+stderr of the last attempt
  std::string error;        // why it is not ok (with the fix when there is one)
  nlohmann::json ToJson() const;
};

struct PreScriptsOutcome {
  bool any_configured = false;    // at least one native hook or an Azure pre script exists
  bool all_succeeded = false;     // every configured pre/freeze script ran and exited 0
  bool continue_backup = true;    // false: a failure's policy says the backup must fail
  bool fs_freeze_enabled = true;  // Azure fsFreezeEnabled (true without an Azure config)
  std::string failure_summary;    // the failed scripts and why, for error messages
};

class ScriptHooks {
 public:
  // Reads the hooks dir and the Azure config. Never fails: a missing dir or config means "no
  // scripts"; a refused config or script becomes a refused ScriptRecord at RunPre().
  static ScriptHooks Load(const HookOptions& options);

  // Runs the native "freeze" hooks, then the Azure pre script (with its retries).
  PreScriptsOutcome RunPre();

  // Runs the Azure post script (if its pre script ran) and then "thaw" for every native hook
  // whose "freeze" ran, in reverse. Call exactly once after RunPre, whatever happened between.
  // Failures are recorded (records()), never fatal: the backup's level was already decided.
  void RunPost();

  const std::vector<ScriptRecord>& records() const { return records_; }
  bool fs_freeze_enabled() const { return fs_freeze_enabled_; }
  nlohmann::json ToJson() const;

 private:
  struct AzureConfig {
    bool present = false;
    std::string refused_error;  // config exists but was refused / invalid
    std::string pre_location, post_location;
    std::vector<std::string> pre_params, post_params;
    int pre_retries = 0, post_retries = 0;
    int timeout_seconds = 30;
    bool continue_on_failure = true;
    bool fs_freeze_enabled = true;
  };

  ScriptRecord RunScript(const std::string& path, const std::string& source,
                         const std::string& phase, const std::vector<std::string>& args,
                         std::chrono::seconds timeout, int retries);

  HookOptions options_;
  std::vector<std::string> native_hooks_;   // full paths, lexical order
  std::vector<std::string> native_frozen_;  // hooks whose "freeze" ran, in order
  AzureConfig azure_;
  bool azure_pre_ran_ = false;
  bool fs_freeze_enabled_ = true;
  std::vector<ScriptRecord> records_;
};

// True when a hooks.d file name must be skipped (*.sample *~ *.bak *.orig *.rpm* *.dpkg-*,
// hidden files).
bool IsSkippedHookName(const std::string& file_name);

// The hook scripts a backup runs from `hooks_dir` (full paths, lexical order): its program
// files whose names are not skipped. Empty when the directory does not exist.
std::vector<std::string> ListHookScripts(const std::string& hooks_dir);

}  // namespace vmsnap::agent

#include "agent/hooks.hpp"

#include <algorithm>
#include <filesystem>

#include "platform/env.hpp"
#include "platform/quiesce.hpp"

namespace vmsnap::agent {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// A path as UTF-8 (fs::path::string() is the ANSI code page on Windows).
std::string PathText(const fs::path& p) {
  auto u8 = p.u8string();
  return std::string(u8.begin(), u8.end());
}

// A UTF-8 string as a path.
fs::path PathOf(const std::string& utf8) {
  return fs::path(std::u8string(utf8.begin(), utf8.end()));
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

bool IsSkippedHookName(const std::string& n) {
  if (n.empty() || n[0] == '.') return true;
  if (EndsWith(n, ".sample") || EndsWith(n, "~") || EndsWith(n, ".bak") || EndsWith(n, ".orig"))
    return true;
  return n.find(".dpkg-") != std::string::npos || n.find(".rpm") != std::string::npos;
}

json ScriptRecord::ToJson() const {
  return {{"name", name},
          {"path", path},
          {"source", source},
          {"phase", phase},
          {"attempts", attempts},
          {"exit_code", exit_code},
          {"timed_out", timed_out},
          {"refused", refused},
          {"ok", ok},
          {"duration_ms", duration_ms},
          {"output_tail", output_tail},
          {"error", error}};
}

std::vector<std::string> ListHookScripts(const std::string& hooks_dir) {
  std::vector<std::string> scripts;
  std::error_code ec;
  if (hooks_dir.empty() || !fs::is_directory(PathOf(hooks_dir), ec)) return scripts;
  for (const auto& e : fs::directory_iterator(PathOf(hooks_dir), ec)) {
    const std::string name = PathText(e.path().filename());
    const std::string path = PathText(e.path());
    if (IsSkippedHookName(name) || !platform::IsProgramFile(path)) continue;
    scripts.push_back(path);
  }
  std::sort(scripts.begin(), scripts.end());
  return scripts;
}

ScriptHooks ScriptHooks::Load(const HookOptions& options) {
  ScriptHooks h;
  h.options_ = options;
  std::error_code ec;
  h.native_hooks_ = ListHookScripts(options.hooks_dir);

  AzureConfig& az = h.azure_;
  if (!options.azure_config_path.empty() && fs::exists(PathOf(options.azure_config_path), ec)) {
    az.present = true;
    const std::string& cfg = options.azure_config_path;
    Status trusted = platform::CheckTrustedFile(cfg, "Azure script config");
    auto text =
        trusted.ok() ? platform::Env::Default()->ReadFile(cfg) : Result<std::string>(trusted);
    json j = text.ok() ? json::parse(*text, nullptr, false) : json();
    if (!text.ok()) {
      az.refused_error = text.status().ToString();
    } else if (j.is_discarded() || !j.is_object()) {
      az.refused_error = "Azure script config " + cfg +
                         " is not a JSON object. Fix: correct "
                         "the JSON (see the Azure VMSnapshotScriptPluginConfig.json template)";
    } else {
      auto str = [&](const char* k) {
        return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : std::string();
      };
      auto list = [&](const char* k) {
        std::vector<std::string> v;
        if (j.contains(k) && j[k].is_array())
          for (const auto& x : j[k]) v.push_back(x.is_string() ? x.get<std::string>() : x.dump());
        return v;
      };
      auto integer = [&](const char* k, int def) {
        if (!j.contains(k)) return def;
        if (j[k].is_number_integer()) return j[k].get<int>();
        if (j[k].is_string()) {
          try {
            return std::stoi(j[k].get<std::string>());
          } catch (...) {
            return def;
          }
        }
        return def;
      };
      auto boolean = [&](const char* k, bool def) {
        if (!j.contains(k)) return def;
        if (j[k].is_boolean()) return j[k].get<bool>();
        if (j[k].is_string()) return j[k].get<std::string>() != "false";
        return def;
      };
      az.pre_location = str("preScriptLocation");
      az.post_location = str("postScriptLocation");
      az.pre_params = list("preScriptParams");
      az.post_params = list("postScriptParams");
      az.pre_retries = std::max(0, integer("preScriptNoOfRetries", 0));
      az.post_retries = std::max(0, integer("postScriptNoOfRetries", 0));
      az.timeout_seconds = integer("timeoutInSeconds", 30);
      az.continue_on_failure = boolean("continueBackupOnFailure", true);
      az.fs_freeze_enabled = boolean("fsFreezeEnabled", true);
      if (az.timeout_seconds <= 0)
        az.refused_error = "Azure script config " + cfg +
                           ": timeoutInSeconds must be positive. "
                           "Fix: set it to the seconds one script run may take";
      h.fs_freeze_enabled_ = az.fs_freeze_enabled;
    }
  }
  return h;
}

ScriptRecord ScriptHooks::RunScript(const std::string& path, const std::string& source,
                                    const std::string& phase, const std::vector<std::string>& args,
                                    std::chrono::seconds timeout, int retries) {
  ScriptRecord r;
  r.path = path;
  r.name = fs::path(path).filename().string();
  r.source = source;
  r.phase = phase;
  Status trusted = platform::CheckTrustedFile(
      path, source == "azure" ? "Azure " + phase + " script" : "hook script");
  if (!trusted.ok()) {
    r.refused = true;
    r.error = trusted.ToString();
    return r;
  }
  for (int attempt = 0; attempt <= retries; ++attempt) {
    platform::ProcessSpec spec;
    spec.path = path;
    spec.args = args;
    spec.timeout = timeout;
    auto outcome = platform::RunProcess(spec);
    ++r.attempts;
    if (!outcome.ok()) {
      r.refused = true;
      r.error = outcome.status().ToString();
      return r;
    }
    r.duration_ms += outcome->duration_ms;
    r.exit_code = outcome->term_signal == 0 && !outcome->timed_out ? outcome->exit_code : -1;
    r.timed_out = outcome->timed_out;
    r.output_tail = outcome->output_tail;
    if (outcome->succeeded()) {
      r.ok = true;
      r.error.clear();
      return r;
    }
    r.error = path + " " + phase + ": " + outcome->Describe() +
              (attempt < retries ? "; retrying" : "") +
              (outcome->timed_out ? " (timeout " + std::to_string(timeout.count()) + " s)" : "");
  }
  return r;
}

PreScriptsOutcome ScriptHooks::RunPre() {
  PreScriptsOutcome o;
  o.fs_freeze_enabled = fs_freeze_enabled_;
  o.all_succeeded = true;
  auto fail = [&](const ScriptRecord& r, bool may_continue) {
    o.all_succeeded = false;
    if (!may_continue) o.continue_backup = false;
    o.failure_summary += (o.failure_summary.empty() ? "" : "; ") + r.error;
  };
  for (const auto& hook : native_hooks_) {
    o.any_configured = true;
    ScriptRecord r = RunScript(hook, "hooks.d", "freeze", {"freeze"}, options_.native_timeout, 0);
    if (!r.refused) native_frozen_.push_back(hook);  // its freeze call ran: thaw it later
    records_.push_back(r);
    if (!r.ok) {
      fail(r, options_.native_continue_on_failure);
      if (!options_.native_continue_on_failure) break;  // later hooks do not freeze
    }
  }
  if (azure_.present && o.continue_backup) {
    if (!azure_.refused_error.empty()) {
      o.any_configured = true;
      ScriptRecord r;
      r.name = fs::path(options_.azure_config_path).filename().string();
      r.path = options_.azure_config_path;
      r.source = "azure";
      r.phase = "pre";
      r.refused = true;
      r.error = azure_.refused_error;
      records_.push_back(r);
      fail(r, azure_.continue_on_failure);
    } else if (!azure_.pre_location.empty()) {
      o.any_configured = true;
      ScriptRecord r = RunScript(azure_.pre_location, "azure", "pre", azure_.pre_params,
                                 std::chrono::seconds(azure_.timeout_seconds), azure_.pre_retries);
      azure_pre_ran_ = !r.refused;
      records_.push_back(r);
      if (!r.ok) fail(r, azure_.continue_on_failure);
    }
  }
  if (!o.any_configured) o.all_succeeded = false;  // nothing to vouch for the application
  return o;
}

void ScriptHooks::RunPost() {
  if (azure_pre_ran_ && !azure_.post_location.empty()) {
    records_.push_back(RunScript(azure_.post_location, "azure", "post", azure_.post_params,
                                 std::chrono::seconds(azure_.timeout_seconds),
                                 azure_.post_retries));
  }
  for (auto it = native_frozen_.rbegin(); it != native_frozen_.rend(); ++it)
    records_.push_back(RunScript(*it, "hooks.d", "thaw", {"thaw"}, options_.native_timeout, 0));
  native_frozen_.clear();
  azure_pre_ran_ = false;
}

json ScriptHooks::ToJson() const {
  json a = json::array();
  for (const auto& r : records_) a.push_back(r.ToJson());
  return a;
}

}  // namespace vmsnap::agent

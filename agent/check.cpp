#include "agent/check.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <filesystem>
#include <set>

#include "agent/agent_config.hpp"
#include "agent/hooks.hpp"
#include "agent/vault_client.hpp"
#include "common/cli_output.hpp"
#include "common/https_client.hpp"
#include "platform/env.hpp"
#include "platform/quiesce.hpp"

namespace vmsnap::agent {

namespace fs = std::filesystem;
using nlohmann::json;

json CheckStep::ToJson() const {
  json j{{"check", name}, {"ok", status.ok() && !skipped}};
  if (skipped) j["skipped"] = true;
  if (!detail.empty()) j["detail"] = detail;
  if (!status.ok()) {
    j["code"] = CodeName(status.code());
    j["error"] = status.cause();
    if (!status.fix().empty()) j["fix"] = status.fix();
  }
  return j;
}

Status CheckReport::FirstFailure() const {
  for (const auto& s : steps)
    if (!s.status.ok()) return Status(s.status).InPhase(s.name);
  return Status::Ok();
}

json CheckReport::ToJson() const {
  json list = json::array();
  for (const auto& s : steps) list.push_back(s.ToJson());
  const Status failure = FirstFailure();
  json out{{"ok", failure.ok()}, {"checks", list}};
  if (!failure.ok())
    out.update({{"error", failure.cause()},
                {"code", CodeName(failure.code())},
                {"phase", failure.phase()},
                {"fix", failure.fix()}});
  return out;
}

namespace {

// The vault's host name through this machine's resolver: its addresses, or why not.
Result<std::string> ResolveVault(const std::string& url, const std::string& config_path) {
  auto u = VaultUrl::Parse(url);
  if (!u.ok())
    return std::move(u.take_status())
        .WithFix("correct \"vault\" in " + config_path + ", or enroll again");
  boost::asio::io_context ioc;
  boost::asio::ip::tcp::resolver resolver(ioc);
  boost::system::error_code ec;
  auto endpoints = resolver.resolve(u->host, u->port, ec);
  if (ec)
    return Status::Unavailable("cannot resolve the vault's host '" + u->host + "': " + ec.message(),
                               "check this machine's DNS settings (/etc/resolv.conf, "
                               "resolvectl status) and the host name in " +
                                   config_path);
  std::set<std::string> addresses;
  for (const auto& e : endpoints) addresses.insert(e.endpoint().address().to_string());
  std::string text;
  for (const auto& a : addresses) text += (text.empty() ? "" : ", ") + a;
  return u->host + " resolves to " + text;
}

std::string PointSummary(const json& points) {
  if (!points.is_array() || points.empty()) return "accepted; no recovery point yet";
  const json& last = points.back();
  return "accepted; " + std::to_string(points.size()) + " recovery point(s), the latest " +
         last.value("id", std::string("?")) + " (" + last.value("consistency", std::string("?")) +
         ")";
}

}  // namespace

CheckReport RunCheck(const CheckOptions& options) {
  CheckReport report;
  auto add = [&](std::string name, Status status, std::string detail = {}) -> CheckStep& {
    report.steps.push_back({std::move(name), std::move(status), std::move(detail), false});
    return report.steps.back();
  };
  auto skip = [&](std::string name, std::string why) {
    add(std::move(name), Status::Ok(), std::move(why)).skipped = true;
  };
  auto* env = platform::Env::Default();

  auto cfg = AgentConfig::Load(options.config_path);
  if (!cfg.ok()) {
    add("config", cfg.take_status());
    for (const char* step :
         {"resolve vault", "reach vault", "credential", "disks", "state directory", "hooks"})
      skip(step, "no agent config");
  } else {
    add("config", Status::Ok(),
        options.config_path + ": VM " + cfg->name + ", vault " + cfg->vault_url + ", " +
            std::to_string(cfg->disks.size()) + " disk(s)");

    auto resolved = ResolveVault(cfg->vault_url, options.config_path);
    const bool have_address = resolved.ok();
    add("resolve vault", resolved.ok() ? Status::Ok() : resolved.status(),
        resolved.ok() ? *resolved : "");

    // One attempt per request, a short timeout: a check answers in seconds, not after the
    // backups' retries.
    ClientOptions client_options = cfg->Client();
    client_options.max_attempts = 1;
    client_options.io_timeout = options.timeout;
    bool reached = false;
    std::unique_ptr<VaultClient> client;
    if (!have_address) {
      skip("reach vault", "the vault's host does not resolve");
    } else if (auto c = VaultClient::Create(client_options); !c.ok()) {
      add("reach vault", c.take_status());
    } else {
      client = std::move(*c);
      auto health = client->CallJson("GET", "/v1/health", json());
      reached = health.ok();
      add("reach vault", health.ok() ? Status::Ok() : health.status(),
          health.ok() ? cfg->vault_url + " answered over TLS verified against " + cfg->ca_file
                      : "");
    }

    if (!reached) {
      skip("credential", "the vault cannot be reached");
    } else {
      auto points = client->ListRecoveryPoints(cfg->name);
      Status st = points.ok() ? Status::Ok() : points.status();
      if (st.code() == Code::kUnauthenticated || st.code() == Code::kPermissionDenied)
        st = Status::Error(st.code(),
                           "the vault does not accept this agent's credential (" + st.cause() + ")",
                           "enroll again: vmsnap-agent enroll --vault URL --ca-fingerprint FP "
                           "--token TOKEN, with a token from 'vmsnap enroll-token create'");
      add("credential", st, points.ok() ? PointSummary(*points) : "");
    }

    if (cfg->disks.empty())
      add("disks", Status::InvalidArgument("the agent config names no disk",
                                           "enroll again with --disk PATH (repeatable)"));
    for (const auto& disk : cfg->disks) {
      auto reader = env->OpenDiskForRead(disk);
      add("disk " + disk, reader.ok() ? Status::Ok() : reader.status(),
          reader.ok() ? HumanBytes((*reader)->size()) + ", readable" : "");
    }

    // Backups keep their change-tracking state there (and create it when it is missing): the
    // directory, or its nearest existing parent, must take a file.
    std::error_code ec;
    fs::path dir = cfg->state_dir;
    while (!dir.empty() && !fs::exists(dir, ec) && dir.has_parent_path() &&
           dir.parent_path() != dir)
      dir = dir.parent_path();
    auto scratch = env->CreateScratchFile(dir.string());
    std::string detail;
    if (scratch.ok()) {
      detail = dir == fs::path(cfg->state_dir) ? cfg->state_dir + " is writable"
                                               : cfg->state_dir +
                                                     " does not exist yet (the first backup "
                                                     "creates it); " +
                                                     dir.string() + " is writable";
      if (auto space = fs::space(dir, ec); !ec)
        detail += ", " + HumanBytes(space.available) + " free";
    }
    add("state directory", scratch.ok() ? Status::Ok() : scratch.status(), detail);

    // A hook script that another user could have changed is refused at the backup, which is
    // then file-system consistent at best: found here instead, with the command that fixes it.
    const std::vector<std::string> scripts = ListHookScripts(cfg->hooks_dir);
    Status untrusted;
    std::string names;
    for (const auto& script : scripts) {
      if (Status st = platform::CheckTrustedFile(script, "hook script"); !st.ok() && untrusted.ok())
        untrusted = std::move(st);
      names += (names.empty() ? "" : ", ") + fs::path(script).filename().string();
    }
    add("hooks", untrusted,
        !untrusted.ok()   ? ""
        : scripts.empty() ? "no hook scripts in " + cfg->hooks_dir +
                                ": backups are file-system consistent at best (the VM owner's "
                                "scripts there make them application-consistent)"
                          : std::to_string(scripts.size()) + " hook script(s) in " +
                                cfg->hooks_dir + ", trusted: " + names);
  }

  if (!options.freeze_guard.empty()) {
    const bool runnable = platform::IsProgramFile(options.freeze_guard);
    add("freeze guard",
        runnable ? Status::Ok()
                 : Status::NotFound(options.freeze_guard +
                                        " is missing or not executable: backups cannot "
                                        "freeze filesystems",
                                    "reinstall the vmsnap-agent package"),
        runnable ? options.freeze_guard : "");
  }
  return report;
}

}  // namespace vmsnap::agent

#include "agent/daemon.hpp"

#include <spdlog/sinks/rotating_file_sink.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "agent/agent_config.hpp"
#include "agent/backup.hpp"
#include "agent/consistency.hpp"
#include "agent/restore.hpp"
#include "agent/vault_client.hpp"
#include "common/cli_output.hpp"
#include "platform/env.hpp"
#include "platform/service.hpp"

namespace vmsnap::agent {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// The service's name: the systemd unit vmsnap-agent.service, the Windows service vmsnap-agent
// (registered by the MSI, installer/windows/vmsnap-agent.wxs).
constexpr const char* kServiceName = "vmsnap-agent";

int Fail(const Status& st, bool as_json) {
  return ReportFailure("vmsnap-agent", st, as_json);
}

// The daemon's fatal errors: on stderr as for every command, and in the log too under a
// service manager, where nothing reads stderr.
int FailDaemon(const Status& st, platform::RunMode mode) {
  if (mode == platform::RunMode::kServiceManager) spdlog::error("{}", st.ToString());
  return Fail(st, false);
}

class Daemon {
 public:
  // `stop` is the process's stop token (platform/service.hpp); it outlives the daemon.
  Daemon(AgentConfig cfg, const platform::StopToken& stop, platform::RunMode mode)
      : stop_(stop), mode_(mode), cfg_(std::move(cfg)), results_dir_(cfg_.state_dir + "/results") {}

  // True while a job runs: a stop request then cancels it at its next safe point instead of
  // ending the process.
  std::atomic<bool> busy{false};
  std::atomic<bool> cancel_job{false};

  int Run() {
    std::error_code ec;
    fs::create_directories(results_dir_, ec);
    ClientOptions co = cfg_.Client();
    co.max_attempts = 1;  // the loop below does its own backoff
    co.io_timeout = std::chrono::seconds(60);
    auto client = VaultClient::Create(co);
    if (!client.ok()) return FailDaemon(client.status(), mode_);
    client_ = std::move(*client);
    auto backoff = std::chrono::seconds(1);
    bool was_down = false;
    fs::remove(JobMarker(), ec);  // a marker left by a crash names no running job
    spdlog::info("agent {} running; vault {}", cfg_.name, cfg_.vault_url);
    while (!stop_.stop_requested()) {
      Status st = ResendPendingResults();
      Result<json> r = st;
      if (st.ok())
        r = client_->CallJson("POST", "/v1/agent/poll", {{"state", "idle"}, {"disks", cfg_.disks}});
      if (!r.ok()) {
        if (r.status().code() == Code::kUnauthenticated) {
          Status s = r.take_status();
          s.WithFix("this agent's credential was revoked or replaced; enroll it again");
          return FailDaemon(std::move(s).InPhase("poll control plane"), mode_);
        }
        spdlog::warn("vault not reachable ({}); retrying in {} s", r.status().ToString(),
                     backoff.count());
        was_down = true;
        SleepUnlessStopped(backoff);
        backoff = std::min(backoff * 2, std::chrono::seconds(30));
        continue;
      }
      if (was_down) spdlog::info("vault reachable again");
      was_down = false;
      backoff = std::chrono::seconds(1);
      if (r->value("job", json()).is_object()) {
        busy = true;
        // A marker for package upgrades: the agent's prerm waits while a job runs.
        const json& job = (*r)["job"];
        std::error_code ec;
        fs::create_directories(cfg_.runtime_dir, ec);
        platform::Env::Default()->WriteFileAtomic(
            JobMarker(),
            json{{"pid", platform::CurrentProcessId()}, {"job", job["id"]}, {"type", job["type"]}}
                .dump(),
            0644);
        RunJob(job);
        fs::remove(JobMarker(), ec);
        busy = false;
      }
    }
    spdlog::info("agent stopped");
    return 0;
  }

 private:
  void SleepUnlessStopped(std::chrono::seconds d) { stop_.SleepFor(d); }

  std::string JobMarker() const { return cfg_.runtime_dir + "/job.json"; }

  std::string ResultPath(int64_t id) const {
    return results_dir_ + "/" + std::to_string(id) + ".json";
  }

  // Sends every persisted result; stops at the first that cannot be delivered.
  Status ResendPendingResults() {
    std::error_code ec;
    std::vector<fs::path> files;
    for (auto it = fs::directory_iterator(results_dir_, ec); !ec && it != fs::directory_iterator();
         it.increment(ec))
      if (it->path().extension() == ".json") files.push_back(it->path());
    for (const auto& f : files) {
      auto text = platform::Env::Default()->ReadFile(f.string());
      json j = text.ok() ? json::parse(*text, nullptr, false) : json();
      if (!j.is_object() || !j.contains("job")) {
        fs::remove(f, ec);
        continue;
      }
      auto r = client_->CallJson(
          "POST", "/v1/agent/jobs/" + std::to_string(j["job"].get<int64_t>()) + "/result",
          j["result"]);
      if (!r.ok() && r.status().code() != Code::kNotFound) return r.take_status();
      spdlog::info("result of job {} delivered", j["job"].get<int64_t>());
      fs::remove(f, ec);
    }
    return Status::Ok();
  }

  void RunJob(const json& job) {
    const int64_t id = job["id"];
    const std::string type = job["type"];
    spdlog::info("job {}: {} started", id, type);
    cancel_job = stop_.stop_requested();  // a stop requested before the job cancels it too
    ClientOptions pco = cfg_.Client();
    pco.max_attempts = 1;
    pco.io_timeout = std::chrono::seconds(10);
    auto progress_client = VaultClient::Create(pco);
    // Progress goes to the vault from a reporter thread about once a second, whatever the job
    // is doing (scripts, freeze, transfer); the answer carries the cancel flag, which the job
    // honours at its next safe point.
    std::mutex progress_mu;
    json latest_progress = {{"phase", "starting"}};
    auto report_progress = [&](const json& p) {
      std::lock_guard lock(progress_mu);
      latest_progress = p;
    };
    std::atomic<bool> job_done{false};
    std::thread reporter([&] {
      while (!job_done) {
        json p;
        {
          std::lock_guard lock(progress_mu);
          p = latest_progress;
        }
        if (progress_client.ok()) {
          auto r = (*progress_client)
                       ->CallJson("POST", "/v1/agent/jobs/" + std::to_string(id) + "/progress", p);
          if (r.ok() && r->value("cancel", false) && !cancel_job) {
            spdlog::info("job {}: cancellation requested", id);
            cancel_job = true;
          }
        }
        for (int i = 0; i < 10 && !job_done; ++i)
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
    json result;
    if (type == "backup") {
      BackupOptions bo;
      bo.client = cfg_.Client();
      bo.item = cfg_.name;
      bo.disks = cfg_.disks;
      bo.block_size = cfg_.block_size;
      bo.state_dir = cfg_.state_dir;
      bo.max_rate_bytes_per_s = cfg_.max_rate_bytes_per_s;
      bo.progress = false;
      bo.cancel = &cancel_job;
      ConsistencyOptions& copt = bo.consistency;
      copt.guard_binary = DefaultFreezeGuardPath();
      copt.hooks.hooks_dir = cfg_.hooks_dir;
      copt.hooks.azure_config_path = cfg_.azure_config;
      copt.runtime_dir = cfg_.runtime_dir;
      copt.freeze_deadline = std::chrono::seconds(cfg_.freeze_deadline_s);
      copt.snapshot.provider = cfg_.snapshot_provider;
      copt.snapshot.command_path = cfg_.snapshot_command;
      copt.allow_none = cfg_.allow_inconsistent;
      copt.freeze_only_under = cfg_.freeze_only_under;
      if (auto type = platform::ParseVssBackupType(cfg_.vss_backup_type); type.ok())
        copt.vss.backup_type = *type;  // Load() validated it
      copt.vss.excluded_writers = cfg_.vss_excluded_writers;
      copt.vss.snapshot_timeout = std::chrono::seconds(cfg_.vss_snapshot_timeout_s);
      bo.on_progress = report_progress;
      const json& params = job.value("params", json::object());
      bo.origin = {{"job", id},
                   {"trigger", job.value("trigger", "")},
                   {"retain_until_ms", params.value("retain_until_ms", json())}};
      auto rep = RunBackup(bo);
      if (rep.ok()) {
        bool consistent = rep->consistency == "application" || rep->consistency == "file-system" ||
                          rep->consistency == "crash";
        result = {{"state", consistent ? "completed" : "completed_with_warnings"},
                  {"report", rep->ToJson()}};
      } else {
        result = {{"state", rep.status().code() == Code::kCancelled ? "cancelled" : "failed"},
                  {"error", rep.status().ToString()}};
      }
    } else if (type == "restore") {
      const json& params = job.value("params", json::object());
      RestoreOptions ro;
      ro.state_dir = cfg_.state_dir;
      ro.client = cfg_.Client();
      ro.recovery_point = params.value("recovery_point", "");
      ro.disk = params.value("disk", -1);
      ro.targets = params.value("targets", std::vector<std::string>{});
      ro.progress = false;
      auto rep = RunRestore(ro);
      result = rep.ok() ? json{{"state", "completed"}, {"report", rep->ToJson()}}
                        : json{{"state", "failed"}, {"error", rep.status().ToString()}};
    } else {
      result = {{"state", "failed"}, {"error", "this agent does not know job type '" + type + "'"}};
    }
    job_done = true;
    reporter.join();
    spdlog::info("job {}: {}{}", id, result["state"].get<std::string>(),
                 result.contains("error") ? " (" + result["error"].get<std::string>() + ")" : "");
    // Persist first: the result survives a lost connection, a vault restart or our own crash.
    Status st = platform::Env::Default()->WriteFileAtomic(
        ResultPath(id), json{{"job", id}, {"result", result}}.dump(), 0600);
    if (!st.ok()) spdlog::error("cannot persist result of job {}: {}", id, st.ToString());
    if (Status s = ResendPendingResults(); !s.ok())
      spdlog::warn("result of job {} not delivered yet ({}); it will be re-sent", id, s.ToString());
  }

  const platform::StopToken& stop_;
  const platform::RunMode mode_;
  AgentConfig cfg_;
  std::string results_dir_;
  std::unique_ptr<VaultClient> client_;
};

class DaemonCommandsImpl final : public DaemonCommands {
 public:
  explicit DaemonCommandsImpl(CLI::App& app) {
    enroll_ = app.add_subcommand("enroll", "Register this machine with a vault (run once)");
    enroll_->add_option("--vault", vault_, "Vault URL, https://HOST:PORT")->required();
    enroll_
        ->add_option("--ca-fingerprint", fingerprint_,
                     "SHA-256 fingerprint of the vault's CA (printed at vault start)")
        ->required();
    enroll_->add_option("--token", token_, "One-time enrollment token (vmsnap enroll-token create)")
        ->required();
    enroll_->add_option("--name", name_, "Name of this VM in the vault (default: host name)");
    enroll_->add_option("--disk", disks_,
                        "Disk to protect (repeatable; default: every local disk)");
    enroll_->add_option("--config", config_, "Where to write the agent config")
        ->capture_default_str();
    enroll_->add_option("--state-dir", state_dir_, "Where the agent keeps its state")
        ->capture_default_str();
    enroll_->add_option("--max-rate", max_rate_, "Upload limit in bytes/s for backups (0: none)");
    enroll_->add_option("--hooks-dir", hooks_dir_, "Hook scripts directory for backups")
        ->capture_default_str();
    enroll_->add_option("--runtime-dir", runtime_dir_, "Runtime directory (frozen marker, lock)")
        ->capture_default_str();
    enroll_->add_flag("--allow-inconsistent", allow_inconsistent_,
                      "Back up disks no snapshot provider can handle as consistency `none`");
    enroll_->add_option("--freeze-only-under", freeze_only_under_,
                        "Only freeze filesystems mounted under DIR (repeatable; tests)");
    enroll_->add_flag("--json", as_json_, "Print JSON on stdout");
    run_ = app.add_subcommand("run", "Run the agent daemon (polls the vault for jobs)");
    run_->add_option("--config", config_, "Agent config written by enroll")->capture_default_str();
  }

  bool Handles() const override { return enroll_->parsed() || run_->parsed(); }

  int Execute() override { return enroll_->parsed() ? Enroll() : RunDaemon(); }

 private:
  int Enroll() {
    auto* env = platform::Env::Default();
    auto pem = FetchPinnedCa(vault_, fingerprint_);
    if (!pem.ok())
      return Fail(std::move(pem.take_status()).InPhase("register: pin vault CA"), as_json_);
    fs::path dir = fs::absolute(config_).parent_path();
    std::error_code ec;
    fs::create_directories(dir, ec);
    std::string ca_file = (dir / "vault-ca.pem").string();
    if (Status st = env->WriteFileAtomic(ca_file, *pem, 0644); !st.ok())
      return Fail(std::move(st).InPhase("register: save vault CA"), as_json_);
    AgentConfig cfg;
    cfg.vault_url = vault_;
    cfg.ca_file = ca_file;
    cfg.name = name_.empty() ? env->HostName() : name_;
    cfg.disks = disks_.empty() ? env->LocalDisks() : disks_;
    cfg.state_dir = state_dir_;
    cfg.max_rate_bytes_per_s = max_rate_;
    cfg.hooks_dir = hooks_dir_;
    cfg.runtime_dir = runtime_dir_;
    cfg.allow_inconsistent = allow_inconsistent_;
    cfg.freeze_only_under = freeze_only_under_;
    if (cfg.disks.empty())
      return Fail(Status::InvalidArgument("no disk to protect was found or given",
                                          "pass --disk PATH (repeatable)")
                      .InPhase("register"),
                  as_json_);
    ClientOptions co;
    co.url = vault_;
    co.ca_file = ca_file;
    co.token = token_;
    auto client = VaultClient::Create(co);
    if (!client.ok()) return Fail(std::move(client.take_status()).InPhase("register"), as_json_);
    auto r = (*client)->CallJson("POST", "/v1/enroll",
                                 {{"token", token_}, {"name", cfg.name}, {"disks", cfg.disks}});
    if (!r.ok()) return Fail(std::move(r.take_status()).InPhase("register"), as_json_);
    cfg.credential = r->value("credential", "");
    if (Status st = cfg.Save(config_); !st.ok())
      return Fail(std::move(st).InPhase("register: write config"), as_json_);
    // Installed from the package (default config path) under a service manager: start the
    // daemon now, and restart it after a re-enrollment so it uses the new credential.
    // Linux: systemctl enable + restart when systemd runs. Windows: the MSI registered the
    // service; it is set to start automatically and (re)started through the SCM. Without a
    // service manager (or the service), the note is empty and the user starts `run` by hand.
    std::string service_note;
    if (config_ == kDefaultConfigPath)
      service_note = platform::EnableAndRestartService(kServiceName);
    json out{{"name", cfg.name},
             {"config", config_},
             {"ca_file", ca_file},
             {"disks", cfg.disks},
             {"re_enrolled", r->value("re_enrolled", false)},
             {"service", service_note}};
    if (as_json_)
      std::cout << out.dump() << std::endl;
    else
      std::cout << "enrolled as '" << cfg.name << "' (" << cfg.disks.size()
                << " disk(s)); config written to " << config_ << " (mode 0600)\n"
                << (service_note.empty() ? "start the daemon: vmsnap-agent run --config " + config_
                                         : service_note)
                << "\n";
    return 0;
  }

  int RunDaemon() {
    platform::ServiceSpec spec;
    spec.name = kServiceName;
    // The daemon of this run, while one exists; guarded by mu (read by on_stop on the
    // platform's stop thread).
    std::mutex mu;
    Daemon* current = nullptr;
    spec.run = [&](platform::StopToken& stop, platform::RunMode mode) -> int {
      if (mode == platform::RunMode::kServiceManager) LogToFileUnderServiceManager();
      auto cfg = LoadConfig(stop, mode);
      if (!cfg.ok()) return FailDaemon(cfg.status(), mode);
      if (stop.stop_requested()) return 0;  // stopped while waiting for enrollment
      Daemon daemon(std::move(*cfg), stop, mode);
      {
        std::lock_guard lock(mu);
        current = &daemon;
      }
      int rc = daemon.Run();
      std::lock_guard lock(mu);
      current = nullptr;
      return rc;
    };
    spec.on_stop = [&]() {
      std::lock_guard lock(mu);
      if (current == nullptr || !current->busy) {
        spdlog::info("stop requested while idle: exiting");
        return platform::StopResponse::kExitNow;
      }
      spdlog::info("stop requested during a job: cancelling at the next safe point");
      current->cancel_job = true;
      return platform::StopResponse::kStopAtSafePoint;
    };
    return platform::RunServiceOrConsole(spec);
  }

  // Reads the agent config. Under a service manager that started us before enrollment (the
  // Windows MSI starts the service at install time), waits for `vmsnap-agent enroll` to write
  // it instead of failing: the service stays running and idle, checking every 5 s. From a
  // console, or for a config that exists but cannot be read, fails at once.
  Result<AgentConfig> LoadConfig(const platform::StopToken& stop, platform::RunMode mode) {
    bool told = false;
    while (true) {
      auto cfg = AgentConfig::Load(config_);
      std::error_code ec;
      if (cfg.ok() || mode != platform::RunMode::kServiceManager || fs::exists(config_, ec))
        return cfg;
      if (!told)
        spdlog::info(
            "not enrolled yet: waiting for {} (run: vmsnap-agent enroll --vault URL "
            "--ca-fingerprint FP --token TOKEN)",
            config_);
      told = true;
      if (!stop.SleepFor(std::chrono::seconds(5))) return AgentConfig{};
    }
  }

  // Under a service manager nothing reads stdout/stderr: the log goes to
  // STATE_DIR/logs/vmsnap-agent.log (default state dir), 3 files of at most 5 MiB, at the
  // level and under the name InitLogging gave the default logger (which it replaces).
  static void LogToFileUnderServiceManager() {
    fs::path file = fs::path(AgentConfig{}.state_dir) / "logs" / "vmsnap-agent.log";
    std::error_code ec;
    fs::create_directories(file.parent_path(), ec);
    try {
      auto previous = spdlog::default_logger();
      auto sink =
          std::make_shared<spdlog::sinks::rotating_file_sink_mt>(file.string(), 5 * 1024 * 1024, 3);
      auto logger = std::make_shared<spdlog::logger>(previous->name(), std::move(sink));
      logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %l [%n] %v");
      logger->set_level(previous->level());
      logger->flush_on(spdlog::level::info);
      spdlog::set_default_logger(std::move(logger));
    } catch (const spdlog::spdlog_ex& e) {
      // Keep the default (stderr) logger; the service still runs.
      spdlog::warn("cannot log to {}: {}", file.string(), e.what());
    }
  }

  CLI::App* enroll_ = nullptr;
  CLI::App* run_ = nullptr;
  // Defaults come from agent/agent_config.hpp (platform-specific paths).
  std::string vault_, fingerprint_, token_, name_, config_ = kDefaultConfigPath,
                                                   state_dir_ = AgentConfig{}.state_dir;
  std::vector<std::string> disks_, freeze_only_under_;
  std::string hooks_dir_ = AgentConfig{}.hooks_dir, runtime_dir_ = AgentConfig{}.runtime_dir;
  bool allow_inconsistent_ = false;
  uint64_t max_rate_ = 0;
  bool as_json_ = false;
};

}  // namespace

std::unique_ptr<DaemonCommands> DaemonCommands::Add(CLI::App& app) {
  return std::make_unique<DaemonCommandsImpl>(app);
}

}  // namespace vmsnap::agent

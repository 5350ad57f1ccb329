#include "vault/admin_commands.hpp"

#include <CLI/CLI.hpp>
#include <chrono>
#include <ctime>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "agent/progress.hpp"
#include "agent/vault_client.hpp"
#include "vault/admin_connection.hpp"
#include "vault/control_plane.hpp"

namespace vmsnap::vault {

using nlohmann::json;

namespace {

// Prints rows as an aligned table.
void PrintTable(const std::vector<std::string>& header,
                const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width(header.size());
  for (size_t c = 0; c < header.size(); ++c) width[c] = header[c].size();
  for (const auto& r : rows)
    for (size_t c = 0; c < r.size() && c < width.size(); ++c)
      width[c] = std::max(width[c], r[c].size());
  auto line = [&](const std::vector<std::string>& r) {
    std::string s;
    for (size_t c = 0; c < r.size(); ++c) {
      s += r[c];
      if (c + 1 < r.size()) s += std::string(width[c] - r[c].size() + 2, ' ');
    }
    std::cout << s << "\n";
  };
  line(header);
  for (const auto& r : rows) line(r);
}

std::string Str(const json& j) {
  if (j.is_null()) return "-";
  if (j.is_string()) return j.get<std::string>();
  return j.dump();
}

std::string TimeOrDash(const json& ms) {
  return ms.is_number() ? IsoTime(ms.get<int64_t>()) : "-";
}

// "30s", "15m", "1h", "2d" -> seconds.
Result<int64_t> ParseDuration(const std::string& text) {
  if (text.empty()) return Status::InvalidArgument("empty duration");
  char unit = text.back();
  int64_t mult = 1;
  std::string number = text;
  if (std::isalpha(static_cast<unsigned char>(unit))) {
    number.pop_back();
    mult = unit == 's' ? 1 : unit == 'm' ? 60 : unit == 'h' ? 3600 : unit == 'd' ? 86400 : 0;
  }
  if (mult == 0 || number.empty() || number.find_first_not_of("0123456789") != std::string::npos)
    return Status::InvalidArgument("duration '" + text + "' is malformed",
                                   "use e.g. 30m, 1h or 2d");
  return std::stoll(number) * mult;
}

// "2027-01-31" or "2027-01-31T12:00:00Z" -> UTC ms.
Result<int64_t> ParseDate(const std::string& text) {
  std::tm tm{};
  const char* end = strptime(text.c_str(), "%Y-%m-%dT%H:%M:%SZ", &tm);
  if (!end || *end) {
    tm = {};
    end = strptime(text.c_str(), "%Y-%m-%d", &tm);
    if (!end || *end)
      return Status::InvalidArgument("date '" + text + "' is malformed",
                                     "use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)");
  }
  return static_cast<int64_t>(timegm(&tm)) * 1000;
}

class AdminCommandsImpl final : public AdminCommands {
 public:
  explicit AdminCommandsImpl(CLI::App& app) {
    // Connection flags and --json belong to the top level; every subcommand lets them fall
    // through, so they may be written before or after the subcommand.
    conn_.AddTo(&app);
    app.add_flag("--json", as_json_, "Print JSON on stdout");
    app.fallthrough();
    auto add = [&](CLI::App* parent, const std::string& name, const std::string& help,
                   std::function<int()> run) {
      CLI::App* sub = parent->add_subcommand(name, help);
      sub->fallthrough();
      commands_.emplace_back(sub, std::move(run));
      return sub;
    };
    auto* token = app.add_subcommand("enroll-token", "Enrollment tokens for new agents");
    token->require_subcommand(1)->fallthrough();
    add(token, "create", "Create a one-time enrollment token", [this] { return EnrollToken(); })
        ->add_option("--expires", expires_, "Lifetime, e.g. 30m, 1h, 2d")
        ->capture_default_str();

    auto* vm = app.add_subcommand("vm", "Registered VMs");
    vm->require_subcommand(1)->fallthrough();
    add(vm, "list", "List VMs with protection and last contact", [this] { return VmList(); });

    auto* policy = app.add_subcommand("policy", "Backup policies");
    policy->require_subcommand(1)->fallthrough();
    auto* create = add(policy, "create", "Create a policy", [this] { return PolicyCreate(); });
    create->add_option("name", name_, "Policy name")->required();
    create->add_option("--schedule", schedule_, "'daily HH:MM' or 'weekly DAY[,DAY] HH:MM'")
        ->required();
    create->add_option("--tz", tz_, "IANA time zone of the schedule")->capture_default_str();
    create->add_option("--keep-daily", keep_daily_, "Daily points kept")->capture_default_str();
    create->add_option("--keep-weekly", keep_weekly_, "Weekly points kept")->capture_default_str();
    create->add_option("--keep-monthly", keep_monthly_, "Monthly points kept")
        ->capture_default_str();
    create->add_option("--keep-yearly", keep_yearly_, "Yearly points kept")->capture_default_str();
    add(policy, "list", "List policies", [this] { return PolicyList(); });
    add(policy, "show", "Show one policy",
        [this] { return Simple("GET", "/v1/admin/policies/" + name_); })
        ->add_option("name", name_, "Policy name")
        ->required();
    add(policy, "delete", "Delete a policy no VM uses",
        [this] { return Simple("DELETE", "/v1/admin/policies/" + name_); })
        ->add_option("name", name_, "Policy name")
        ->required();

    auto* protect =
        add(&app, "protect", "Protect a VM with a policy", [this] { return Protect(); });
    protect->add_option("vm", vm_, "VM name")->required();
    protect->add_option("--policy", name_, "Policy name")->required();

    auto* backup = add(&app, "backup", "Back up a VM now (full if it has no point yet)",
                       [this] { return Backup(); });
    backup->add_option("vm", vm_, "VM name")->required();
    backup->add_option("--retain-until", retain_until_, "Keep this point until DATE (YYYY-MM-DD)");
    backup->add_flag("--follow", follow_, "Wait for the job and show its progress");

    auto* restore = add(&app, "restore", "Restore a VM's disks through its agent (a restore job)",
                        [this] { return Restore(); });
    restore->add_option("vm", vm_, "VM name")->required();
    restore->add_option("--rp", rp_, "Recovery point id")->required();
    restore->add_option("--to", targets_, "Target device or file in the VM (one per disk)")
        ->required();
    restore->add_option("--disk", disk_, "Only this disk (index from 0)");
    restore->add_flag("--follow", follow_, "Wait for the job and show its progress");

    auto* job = app.add_subcommand("job", "Jobs");
    job->require_subcommand(1)->fallthrough();
    auto* jl = add(job, "list", "List jobs, newest first", [this] { return JobList(); });
    jl->add_option("--vm", vm_, "Only this VM");
    jl->add_option("--limit", limit_, "At most this many")->capture_default_str();
    auto* js = add(job, "show", "Show a job", [this] { return JobShow(); });
    js->add_option("id", job_id_, "Job id")->required();
    js->add_flag("--follow", follow_, "Wait until the job ends, showing progress");
    add(job, "cancel", "Cancel a queued or running job",
        [this] { return Simple("POST", "/v1/admin/jobs/" + std::to_string(job_id_) + "/cancel"); })
        ->add_option("id", job_id_, "Job id")
        ->required();

    auto* rp = app.add_subcommand("rp", "Recovery points");
    rp->require_subcommand(1)->fallthrough();
    add(rp, "list", "Recovery points of a VM (with expiry and bytes added)",
        [this] { return RpList(); })
        ->add_option("vm", vm_, "VM name")
        ->required();
    auto* retain = add(rp, "retain", "Set a point's own retention (like an on-demand backup's)",
                       [this] { return RpRetain(); });
    retain->add_option("id", rp_id_, "Recovery point id")->required();
    retain->add_option("--until", retain_until_, "Keep until DATE (YYYY-MM-DD[THH:MM:SSZ], UTC)");
    retain->add_flag("--clear", clear_, "Back to the point's original retention");

    auto* unprotect = add(&app, "unprotect", "Stop protecting a VM (keep or soft-delete its data)",
                          [this] { return Unprotect(); });
    unprotect->add_option("vm", vm_, "VM name")->required();
    auto* keep = unprotect->add_flag("--keep-data", keep_data_,
                                     "Keep every point, with no expiry (protect resumes)");
    auto* del = unprotect->add_flag("--delete-data", delete_data_,
                                    "Soft delete: data kept for the vault's window, then purged");
    keep->excludes(del);
    add(&app, "undelete", "Bring back a VM deleted with --delete-data (within the window)",
        [this] { return Undelete(); })
        ->add_option("vm", vm_, "VM name")
        ->required();
    add(&app, "cleanup", "Expire, merge and collect garbage now", [this] {
      return Cleanup();
    })->add_flag("--now", now_, "Run the cleanup now (required)");
    add(&app, "sessions", "Backup sessions: running, committed, or left by a gone agent",
        [this] { return Sessions(); });
    add(&app, "storage", "Bytes the vault holds per VM and what deduplication saved", [this] {
      return Storage();
    })->add_option("vm", vm_, "Only this VM");
    auto* verify = add(&app, "verify", "Re-read and re-hash every block a VM's points need",
                       [this] { return Verify(); });
    verify->add_option("vm", vm_, "VM name")->required();
    verify->add_option("--rp", rp_id_, "Only this recovery point");
    auto* history =
        add(&app, "verify-history", "Past verify runs (scheduled and on demand), newest first",
            [this] { return VerifyHistory(); });
    history->add_option("vm", vm_, "Only this VM");
    history->add_option("--limit", limit_, "At most this many runs")->capture_default_str();

    add(&app, "dashboard", "Protected VMs and jobs of the last 24 h",
        [this] { return Dashboard(); });
  }

  bool Handles() const override {
    for (const auto& [sub, run] : commands_)
      if (sub->parsed()) return true;
    return false;
  }

  int Execute() override {
    for (const auto& [sub, run] : commands_)
      if (sub->parsed()) return run();
    return 2;
  }

 private:
  int Fail(Status st) {
    if (as_json_)
      std::cout << json{{"error", st.cause()},
                        {"code", CodeName(st.code())},
                        {"phase", st.phase()},
                        {"fix", st.fix()}}
                       .dump()
                << std::endl;
    std::cerr << "vmsnap: error: " << st.ToString() << std::endl;
    return st.ExitCode();
  }

  Result<json> Call(const std::string& method, const std::string& target,
                    const json& body = json::object()) {
    if (!client_) {
      auto opts = conn_.Options();
      if (!opts.ok()) return opts.take_status();
      auto c = agent::VaultClient::Create(*opts);
      if (!c.ok()) return c.take_status();
      client_ = std::move(*c);
    }
    return client_->CallJson(method, target, body);
  }

  int Simple(const std::string& method, const std::string& target) {
    auto r = Call(method, target);
    if (!r.ok()) return Fail(r.take_status());
    std::cout << (as_json_ ? r->dump() : r->dump(2)) << std::endl;
    return 0;
  }

  int EnrollToken() {
    auto secs = ParseDuration(expires_);
    if (!secs.ok()) return Fail(secs.take_status());
    auto r = Call("POST", "/v1/admin/enroll-tokens", {{"expires_s", *secs}});
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_)
      std::cout << r->dump() << std::endl;
    else
      std::cout << (*r)["token"].get<std::string>() << "\n(one-time, expires "
                << (*r)["expires"].get<std::string>() << ")\n";
    return 0;
  }

  int VmList() {
    auto r = Call("GET", "/v1/admin/vms");
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << json{{"vms", *r}}.dump() << std::endl, 0;
    std::vector<std::vector<std::string>> rows;
    for (const auto& v : *r)
      rows.push_back({v["name"], v["protection"], Str(v["policy"]),
                      std::to_string(v["disks"].size()),
                      v["last_seen"].get<std::string>() +
                          (v["reachable"].get<bool>() ? "" : " (not reachable)"),
                      v.contains("last_backup") ? Str(v["last_backup"]["state"]) : "-"});
    PrintTable({"VM", "PROTECTION", "POLICY", "DISKS", "LAST SEEN", "LAST BACKUP"}, rows);
    return 0;
  }

  int PolicyCreate() {
    json body{{"name", name_},
              {"schedule", schedule_},
              {"time_zone", tz_},
              {"retention",
               {{"daily", keep_daily_},
                {"weekly", keep_weekly_},
                {"monthly", keep_monthly_},
                {"yearly", keep_yearly_}}}};
    auto r = Call("POST", "/v1/admin/policies", body);
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << r->dump() << std::endl, 0;
    std::cout << "policy '" << name_ << "' created: " << (*r)["schedule"]["text"].get<std::string>()
              << "\n";
    return 0;
  }

  int PolicyList() {
    auto r = Call("GET", "/v1/admin/policies");
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << json{{"policies", *r}}.dump() << std::endl, 0;
    std::vector<std::vector<std::string>> rows;
    for (const auto& p : *r) {
      const json& k = p["retention"];
      rows.push_back({p["name"], p["schedule"]["text"],
                      "d" + Str(k["daily"]) + " w" + Str(k["weekly"]) + " m" + Str(k["monthly"]) +
                          " y" + Str(k["yearly"]),
                      Str(p["vms"])});
    }
    PrintTable({"POLICY", "SCHEDULE", "KEEP", "VMS"}, rows);
    return 0;
  }

  int Protect() {
    auto r = Call("POST", "/v1/admin/vms/" + vm_ + "/protect", {{"policy", name_}});
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << r->dump() << std::endl, 0;
    std::cout << "VM '" << vm_ << "' protected by '" << name_ << "'; next backup "
              << Str((*r)["next_run"]) << "\n";
    return 0;
  }

  int Backup() {
    int64_t retain = 0;
    if (!retain_until_.empty()) {
      auto d = ParseDate(retain_until_);
      if (!d.ok()) return Fail(d.take_status());
      retain = *d;
    }
    auto r = Call("POST", "/v1/admin/vms/" + vm_ + "/backup", {{"retain_until_ms", retain}});
    if (!r.ok()) return Fail(std::move(r.take_status()).InPhase("backup"));
    job_id_ = (*r)["id"];
    if (follow_) return Follow();
    const int code = (*r)["state"] == "failed" ? 11 : 0;
    if (as_json_) return std::cout << r->dump() << std::endl, code;
    std::cout << "job " << job_id_ << ": backup of " << vm_ << " " << Str((*r)["state"])
              << ((*r)["error"].is_string() ? " (" + Str((*r)["error"]) + ")" : "") << "\n";
    return code;
  }

  int Restore() {
    auto r = Call("POST", "/v1/admin/vms/" + vm_ + "/restore",
                  {{"recovery_point", rp_}, {"disk", disk_}, {"targets", targets_}});
    if (!r.ok()) return Fail(std::move(r.take_status()).InPhase("restore"));
    job_id_ = (*r)["id"];
    if (follow_) return Follow();
    const int code = (*r)["state"] == "failed" ? 11 : 0;
    if (as_json_) return std::cout << r->dump() << std::endl, code;
    std::cout << "job " << job_id_ << ": restore of " << vm_ << " " << Str((*r)["state"]) << "\n";
    return code;
  }

  static int StateExit(const std::string& state) {
    if (state == "completed") return 0;
    if (state == "completed_with_warnings") return 10;
    if (state == "cancelled") return 12;
    return 11;
  }

  void PrintJob(const json& j) {
    std::cout << "job " << j["id"] << " (" << Str(j["type"]) << " of " << Str(j["item"]) << ", "
              << Str(j["trigger"]) << "): " << Str(j["state"]) << "\n  created "
              << TimeOrDash(j["created_ms"]) << ", started " << TimeOrDash(j["started_ms"])
              << ", ended " << TimeOrDash(j["ended_ms"]) << "\n";
    if (j["error"].is_string()) std::cout << "  error: " << Str(j["error"]) << "\n";
    if (j["report"].is_object()) {
      const json& rep = j["report"];
      std::cout << "  recovery point " << Str(rep.value("recovery_point", json()))
                << ", consistency " << Str(rep.value("consistency", json())) << ", "
                << rep.value("duration_ms", 0) << " ms\n";
    }
  }

  int Follow() {
    std::string last_line;
    for (;;) {
      auto r = Call("GET", "/v1/admin/jobs/" + std::to_string(job_id_));
      if (!r.ok()) return Fail(r.take_status());
      std::string state = (*r)["state"];
      if (state != "queued" && state != "in_progress") {
        if (as_json_)
          std::cout << r->dump() << std::endl;
        else
          PrintJob(*r);
        return StateExit(state);
      }
      const json& p = (*r)["progress"];
      std::string line = "job " + std::to_string(job_id_) + ": " + state;
      if (p.is_object() && p.contains("bytes_total") && p["bytes_total"].get<uint64_t>() > 0)
        line += ", " +
                std::to_string(100 * p["bytes_done"].get<uint64_t>() /
                               p["bytes_total"].get<uint64_t>()) +
                "% scanned, " + agent::HumanBytes(p.value("bytes_uploaded", uint64_t{0})) +
                " uploaded";
      if (line != last_line && !as_json_) std::cerr << line << std::endl;
      last_line = line;
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
  }

  int JobShow() {
    if (follow_) return Follow();
    auto r = Call("GET", "/v1/admin/jobs/" + std::to_string(job_id_));
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_)
      std::cout << r->dump() << std::endl;
    else
      PrintJob(*r);
    return 0;
  }

  int JobList() {
    auto r = Call("GET", "/v1/admin/jobs?limit=" + std::to_string(limit_) +
                             (vm_.empty() ? "" : "&vm=" + vm_));
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << json{{"jobs", *r}}.dump() << std::endl, 0;
    std::vector<std::vector<std::string>> rows;
    for (const auto& j : *r)
      rows.push_back({Str(j["id"]), Str(j["item"]), Str(j["type"]), Str(j["trigger"]),
                      Str(j["state"]), TimeOrDash(j["created_ms"]), TimeOrDash(j["ended_ms"]),
                      j["error"].is_string() ? Str(j["error"]).substr(0, 60) : ""});
    PrintTable({"JOB", "VM", "TYPE", "TRIGGER", "STATE", "CREATED", "ENDED", "ERROR"}, rows);
    return 0;
  }

  int RpList() {
    auto r = Call("GET", "/v1/admin/rps?vm=" + vm_);
    if (!r.ok()) return Fail(r.take_status());
    const json& list = (*r)["recovery_points"];
    if (as_json_) return std::cout << json{{"recovery_points", list}}.dump() << std::endl, 0;
    std::vector<std::vector<std::string>> rows;
    for (const auto& rp : list) {
      std::string kept;
      for (const auto& k : rp["kept_by"]) kept += (kept.empty() ? "" : ",") + Str(k);
      rows.push_back({Str(rp["id"]), TimeOrDash(rp["created_unix_ms"]), Str(rp["consistency"]),
                      rp["full"].get<bool>() ? "full" : "incremental",
                      agent::HumanBytes(rp["size_bytes"].get<uint64_t>()),
                      agent::HumanBytes(rp["added_bytes"].get<uint64_t>()),
                      rp["expires_ms"].is_null() ? "never" : TimeOrDash(rp["expires_ms"]),
                      kept.empty() ? "-" : kept, Str(rp["trigger"])});
    }
    PrintTable({"RECOVERY POINT", "CREATED", "CONSISTENCY", "KIND", "SIZE", "ADDED", "EXPIRES",
                "KEPT BY", "TRIGGER"},
               rows);
    return 0;
  }

  int RpRetain() {
    int64_t until = 0;
    if (clear_ && !retain_until_.empty())
      return Fail(Status::InvalidArgument("--until and --clear exclude each other"));
    if (!clear_ && retain_until_.empty())
      return Fail(Status::InvalidArgument("give --until DATE or --clear"));
    if (!clear_) {
      auto d = ParseDate(retain_until_);
      if (!d.ok()) return Fail(d.take_status());
      until = *d;
    }
    auto r = Call("POST", "/v1/admin/rps/" + rp_id_ + "/retain", {{"retain_until_ms", until}});
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << r->dump() << std::endl, 0;
    std::cout << "recovery point " << rp_id_ << ": "
              << (clear_ ? "original retention" : "kept until " + IsoTime(until)) << "\n";
    return 0;
  }

  int Unprotect() {
    if (!keep_data_ && !delete_data_)
      return Fail(Status::InvalidArgument("say what happens to the data",
                                          "add --keep-data or --delete-data"));
    auto r = Call("POST", "/v1/admin/vms/" + vm_ + "/unprotect", {{"delete_data", delete_data_}});
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << r->dump() << std::endl, 0;
    if (delete_data_)
      std::cout << "VM '" << vm_ << "' is no longer protected; its data is soft-deleted and will "
                << "be purged after " << Str((*r)["purge_after"]) << " ('vmsnap undelete " << vm_
                << "' brings it back until then)\n";
    else
      std::cout << "VM '" << vm_ << "' is no longer protected; its recovery points are kept "
                << "with no expiry ('vmsnap protect' resumes)\n";
    return 0;
  }

  int Undelete() {
    auto r = Call("POST", "/v1/admin/vms/" + vm_ + "/undelete");
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << r->dump() << std::endl, 0;
    std::cout << "VM '" << vm_ << "' undeleted: " << Str((*r)["recovery_points"])
              << " recovery points kept with no expiry; 'vmsnap protect' resumes backups\n";
    return 0;
  }

  int Cleanup() {
    if (!now_)
      return Fail(Status::InvalidArgument("cleanup runs on a schedule in the vault",
                                          "add --now to run one immediately"));
    auto r = Call("POST", "/v1/admin/cleanup");
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << r->dump() << std::endl, 0;
    std::cout << "cleanup: " << (*r)["removed"].size() << " expired points removed, "
              << (*r)["purged_items"].size() << " deleted VMs purged, " << (*r)["sessions_deleted"]
              << " old sessions deleted, " << (*r)["blocks_freed"] << " blocks ("
              << agent::HumanBytes((*r)["bytes_freed"].get<uint64_t>()) << ") freed, "
              << agent::HumanBytes((*r).value("pack_bytes_reclaimed", uint64_t{0}))
              << " of pack files reclaimed\n";
    for (const auto& id : (*r)["removed"]) std::cout << "  removed " << Str(id) << "\n";
    for (const auto& vm : (*r)["purged_items"]) std::cout << "  purged " << Str(vm) << "\n";
    return 0;
  }

  int Sessions() {
    auto r = Call("GET", "/v1/admin/sessions");
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << r->dump() << std::endl, 0;
    std::vector<std::vector<std::string>> rows;
    for (const auto& s : (*r)["sessions"]) {
      std::string alive = "-";
      if (s["since_alive_ms"].is_number_integer())
        alive = std::to_string(s["since_alive_ms"].get<int64_t>() / 1000) + " s ago (every " +
                std::to_string(s["keepalive_ms"].get<int64_t>() / 1000) + " s)";
      rows.push_back({Str(s["id"]), Str(s["vm"]), Str(s["started"]), alive, Str(s["state"])});
    }
    PrintTable({"SESSION", "VM", "STARTED", "LAST SIGN OF LIFE", "STATE"}, rows);
    return 0;
  }

  int Storage() {
    auto r = Call("GET", "/v1/admin/storage" + (vm_.empty() ? std::string() : "?vm=" + vm_));
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << r->dump() << std::endl, 0;
    std::vector<std::vector<std::string>> rows;
    for (const auto& i : (*r)["items"])
      rows.push_back({Str(i["item"]), Str(i["points"]), Str(i["blocks"]),
                      agent::HumanBytes(i["stored_bytes"].get<uint64_t>()),
                      agent::HumanBytes(i["billable_bytes"].get<uint64_t>()),
                      i["soft_deleted"].get<bool>()
                          ? "soft-deleted, purge after " + TimeOrDash(i["purge_after_ms"])
                          : ""});
    PrintTable({"VM", "POINTS", "BLOCKS", "STORED", "BILLABLE", "NOTE"}, rows);
    const json& v = (*r)["vault"];
    std::cout << "vault: " << agent::HumanBytes(v["stored_bytes"].get<uint64_t>())
              << " stored; deduplication across VMs saved "
              << agent::HumanBytes(v["dedup_saved_bytes"].get<uint64_t>()) << "; "
              << agent::HumanBytes(v["unreferenced_bytes"].get<uint64_t>())
              << " awaiting garbage collection\n";
    if (v.contains("disk")) {
      const json& d = v["disk"];
      std::cout << "disk: " << agent::HumanBytes(d["available_bytes"].get<uint64_t>())
                << " available, reserve " << agent::HumanBytes(d["reserve_bytes"].get<uint64_t>())
                << ": " << agent::HumanBytes(d["headroom_bytes"].get<uint64_t>())
                << " left for backup data"
                << (d["headroom_bytes"].get<uint64_t>() < (64ull << 20)
                        ? " (low: expire points, then 'vmsnap cleanup --now', or give the vault "
                          "a larger disk)\n"
                        : "\n");
      if (d.contains("emergency_bytes"))
        std::cout << "emergency space: "
                  << (d["emergency_bytes"].get<uint64_t>() > 0
                          ? agent::HumanBytes(d["emergency_bytes"].get<uint64_t>()) +
                                " set aside, given back if the disk fills up\n"
                          : std::string("none set aside (no reserve, or no room for it)\n"));
    }
    return 0;
  }

  int Verify() {
    auto r = Call("POST", "/v1/admin/vms/" + vm_ + "/verify", {{"rp", rp_id_}});
    if (!r.ok()) return Fail(r.take_status());
    const bool ok = (*r)["ok"].get<bool>();
    Status bad = Status::Corruption(
        "VM '" + vm_ + "': " + Str((*r)["missing"]) + " missing and " + Str((*r)["corrupt"]) +
            " corrupt block references",
        "restore from another recovery point; the next backup of the VM re-uploads only "
        "blocks the vault reports missing (a corrupt block file must be deleted first)");
    bad.InPhase("verify");
    if (as_json_) {
      std::cout << r->dump() << std::endl;
      return ok ? 0 : bad.ExitCode();
    }
    for (const auto& p : (*r)["points"]) {
      std::cout << Str(p["id"]) << ": " << Str(p["blocks"]) << " blocks, "
                << (p["ok"].get<bool>() ? "ok" : "DAMAGED") << "\n";
      for (const auto& id : p["missing"]) std::cout << "  missing " << Str(id) << "\n";
      for (const auto& id : p["corrupt"]) std::cout << "  corrupt " << Str(id) << "\n";
      for (const auto& e : p["errors"]) std::cout << "  error " << Str(e) << "\n";
    }
    if (!ok) return Fail(bad);
    std::cout << "verified " << Str((*r)["blocks_checked"]) << " distinct blocks: all intact\n";
    return 0;
  }

  int VerifyHistory() {
    auto r = Call("GET", "/v1/admin/verifications?limit=" + std::to_string(limit_) +
                             (vm_.empty() ? "" : "&vm=" + vm_));
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << json{{"verifications", *r}}.dump() << std::endl, 0;
    std::vector<std::vector<std::string>> rows;
    for (const auto& v : *r)
      rows.push_back({Str(v["id"]), Str(v["vm"]), Str(v["rp"]).empty() ? "all" : Str(v["rp"]),
                      Str(v["trigger"]), TimeOrDash(v["started_ms"]), Str(v["blocks_checked"]),
                      v["ok"].get<bool>() ? "ok" : "DAMAGED", Str(v["missing"]),
                      Str(v["corrupt"])});
    PrintTable(
        {"RUN", "VM", "POINTS", "TRIGGER", "STARTED", "BLOCKS", "RESULT", "MISSING", "CORRUPT"},
        rows);
    return 0;
  }

  int Dashboard() {
    auto r = Call("GET", "/v1/admin/dashboard");
    if (!r.ok()) return Fail(r.take_status());
    if (as_json_) return std::cout << r->dump() << std::endl, 0;
    const json& d = *r;
    std::cout << "VMs: " << d["vms"] << " registered, " << d["protected_vms"] << " protected\n"
              << "backup jobs, last 24 h: " << d["jobs_completed_24h"] << " completed, "
              << d["jobs_failed_24h"] << " failed\n"
              << "jobs now: " << d["jobs_in_progress"] << " in progress, " << d["jobs_queued"]
              << " queued\n"
              << "recovery points: " << d["recovery_points"] << "\n"
              << "verify runs that found damage, last 7 days: " << d["verify_runs_damaged_7d"]
              << "\n";
    return 0;
  }

  AdminConnection conn_;
  bool as_json_ = false;
  bool follow_ = false, clear_ = false, keep_data_ = false, delete_data_ = false, now_ = false;
  std::string rp_id_;
  std::vector<std::pair<CLI::App*, std::function<int()>>> commands_;
  std::unique_ptr<agent::VaultClient> client_;
  std::string expires_ = "1h", name_, schedule_, tz_ = "UTC", vm_, retain_until_;
  int keep_daily_ = 7, keep_weekly_ = 4, keep_monthly_ = 12, keep_yearly_ = 0;
  int limit_ = 50;
  int64_t job_id_ = 0;
  std::string rp_;
  std::vector<std::string> targets_;
  int disk_ = -1;
};

}  // namespace

std::unique_ptr<AdminCommands> AdminCommands::Add(CLI::App& app) {
  return std::make_unique<AdminCommandsImpl>(app);
}

}  // namespace vmsnap::vault

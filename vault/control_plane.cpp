#include "vault/control_plane.hpp"

#include <openssl/rand.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <ctime>
#include <set>

#include "common/block_codec.hpp"
#include "vault/schedule.hpp"

namespace vmsnap::vault {

using nlohmann::json;

namespace {

const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS agents(
  name TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, enrolled_ms INTEGER NOT NULL,
  last_seen_ms INTEGER NOT NULL, disks TEXT NOT NULL DEFAULT '[]', policy TEXT,
  protection TEXT NOT NULL DEFAULT 'unprotected', schedule_anchor_ms INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS enroll_tokens(
  token_hash TEXT PRIMARY KEY, created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
  used_ms INTEGER);
CREATE TABLE IF NOT EXISTS policies(
  name TEXT PRIMARY KEY, schedule TEXT NOT NULL, retention TEXT NOT NULL,
  created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs(
  id INTEGER PRIMARY KEY AUTOINCREMENT, item TEXT NOT NULL, type TEXT NOT NULL,
  state TEXT NOT NULL, trigger TEXT NOT NULL, created_ms INTEGER NOT NULL,
  started_ms INTEGER, ended_ms INTEGER, params TEXT NOT NULL DEFAULT '{}', report TEXT,
  error TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0, progress TEXT);
CREATE INDEX IF NOT EXISTS jobs_by_item ON jobs(item, state);
CREATE TABLE IF NOT EXISTS rp_retention(id TEXT PRIMARY KEY, retain_until_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS verifications(
  id INTEGER PRIMARY KEY AUTOINCREMENT, item TEXT NOT NULL, rp TEXT NOT NULL DEFAULT '',
  trigger TEXT NOT NULL, started_ms INTEGER NOT NULL, ended_ms INTEGER NOT NULL,
  ok INTEGER NOT NULL, blocks_checked INTEGER NOT NULL, missing INTEGER NOT NULL,
  corrupt INTEGER NOT NULL, errors INTEGER NOT NULL, report TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS verifications_by_item ON verifications(item, id);
)sql";

const char* kJobColumns =
    "id, item, type, state, trigger, created_ms, started_ms, ended_ms, params, report, error, "
    "cancel_requested, progress";

std::string RandomToken(const std::string& prefix) {
  unsigned char raw[24];
  RAND_bytes(raw, sizeof raw);
  static const char* kDigits = "0123456789abcdef";
  std::string t = prefix;
  for (unsigned char c : raw) {
    t.push_back(kDigits[c >> 4]);
    t.push_back(kDigits[c & 15]);
  }
  return t;
}

std::string HashToken(const std::string& token) {
  return Sha256Hex(token);
}

json ParseOr(const std::string& text, json fallback) {
  json j = json::parse(text, nullptr, false);
  return j.is_discarded() ? fallback : j;
}

json RowToJob(const DbRow& r) {
  auto opt_int = [&](size_t i) { return r.IsNull(i) ? json() : json(r.Int(i)); };
  return {{"id", r.Int(0)},
          {"item", r.Text(1)},
          {"type", r.Text(2)},
          {"state", r.Text(3)},
          {"trigger", r.Text(4)},
          {"created_ms", r.Int(5)},
          {"started_ms", opt_int(6)},
          {"ended_ms", opt_int(7)},
          {"params", ParseOr(r.Text(8), json::object())},
          {"report", r.IsNull(9) ? json() : ParseOr(r.Text(9), json())},
          {"error", r.IsNull(10) ? json() : json(r.Text(10))},
          {"cancel_requested", r.Int(11) != 0},
          {"progress", r.IsNull(12) ? json() : ParseOr(r.Text(12), json())}};
}

bool Terminal(const std::string& state) {
  return state == "completed" || state == "completed_with_warnings" || state == "failed" ||
         state == "cancelled";
}

Status UnknownVm(const std::string& vm) {
  return Status::NotFound("VM '" + vm + "' is not registered with this vault",
                          "list VMs with 'vmsnap vm list'; register one by enrolling its agent "
                          "('vmsnap enroll-token create', then 'vmsnap-agent enroll')");
}

}  // namespace

std::string IsoTime(int64_t unix_ms) {
  std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

ControlPlane::ControlPlane(std::unique_ptr<Db> db, Catalog* catalog, NowFn now,
                           ControlPlaneOptions options)
    : db_(std::move(db)), catalog_(catalog), now_(std::move(now)), opts_(options) {}

Status ControlPlane::Init() {
  std::lock_guard lock(mu_);
  VMSNAP_RETURN_IF_ERROR(db_->Exec(kSchema));
  // Added by issue 5; fails harmlessly ("duplicate column") on databases that have it.
  auto cols =
      db_->Query("SELECT COUNT(*) FROM pragma_table_info('agents') WHERE name='deleted_ms'");
  if (!cols.ok()) return cols.take_status();
  if ((*cols)[0].Int(0) == 0)
    VMSNAP_RETURN_IF_ERROR(db_->Exec("ALTER TABLE agents ADD COLUMN deleted_ms INTEGER"));
  return Status::Ok();
}

std::optional<std::string> ControlPlane::AgentForToken(const std::string& token) {
  std::lock_guard lock(mu_);
  auto rows = db_->Query("SELECT name FROM agents WHERE token_hash = ?1", {HashToken(token)});
  if (!rows.ok() || rows->empty()) return std::nullopt;
  std::string name = (*rows)[0].Text(0);
  db_->Query("UPDATE agents SET last_seen_ms = ?1 WHERE name = ?2", {now_(), name});
  return name;
}

Result<json> ControlPlane::CreateEnrollToken(int64_t ttl_seconds) {
  if (ttl_seconds <= 0 || ttl_seconds > 30LL * 86400)
    return Status::InvalidArgument("enrollment token lifetime must be 1 s to 30 days",
                                   "use e.g. --expires 1h");
  std::lock_guard lock(mu_);
  std::string token = RandomToken("vse_");
  int64_t now = now_();
  auto r =
      db_->Query("INSERT INTO enroll_tokens(token_hash, created_ms, expires_ms) VALUES(?1,?2,?3)",
                 {HashToken(token), now, now + ttl_seconds * 1000});
  if (!r.ok()) return r.take_status();
  return json{{"token", token},
              {"expires_ms", now + ttl_seconds * 1000},
              {"expires", IsoTime(now + ttl_seconds * 1000)}};
}

Result<json> ControlPlane::Enroll(const std::string& enroll_token, const std::string& name,
                                  const json& disks) {
  VMSNAP_RETURN_IF_ERROR(ValidateItemName(name));
  std::lock_guard lock(mu_);
  int64_t now = now_();
  auto rows = db_->Query("SELECT expires_ms, used_ms FROM enroll_tokens WHERE token_hash = ?1",
                         {HashToken(enroll_token)});
  if (!rows.ok()) return rows.take_status();
  const std::string fix =
      "ask the vault's administrator for a new one: 'vmsnap enroll-token create'";
  if (rows->empty())
    return Status::Error(Code::kUnauthenticated, "the enrollment token is not known to this vault",
                         fix);
  if ((*rows)[0].Int(0) < now)
    return Status::Error(Code::kUnauthenticated,
                         "the enrollment token expired at " + IsoTime((*rows)[0].Int(0)), fix);
  if (!(*rows)[0].IsNull(1))
    return Status::Error(Code::kUnauthenticated, "the enrollment token was already used", fix);
  VMSNAP_RETURN_IF_ERROR(db_->Exec("BEGIN IMMEDIATE"));
  std::string credential = RandomToken("vsa_");
  std::string disks_text = disks.is_array() ? disks.dump() : "[]";
  auto existing = db_->Query("SELECT name FROM agents WHERE name = ?1", {name});
  bool re_enroll = existing.ok() && !existing->empty();
  Result<std::vector<DbRow>> r =
      re_enroll
          ? db_->Query("UPDATE agents SET token_hash=?1, last_seen_ms=?2, disks=?3 WHERE name=?4",
                       {HashToken(credential), now, disks_text, name})
          : db_->Query(
                "INSERT INTO agents(name, token_hash, enrolled_ms, last_seen_ms, disks) "
                "VALUES(?1,?2,?3,?3,?4)",
                {name, HashToken(credential), now, disks_text});
  if (r.ok())
    r = db_->Query("UPDATE enroll_tokens SET used_ms=?1 WHERE token_hash=?2",
                   {now, HashToken(enroll_token)});
  if (!r.ok()) {
    db_->Exec("ROLLBACK");
    return r.take_status();
  }
  VMSNAP_RETURN_IF_ERROR(db_->Exec("COMMIT"));
  auto job = InsertJob(name, "register", "enroll", "completed",
                       {{"re_enroll", re_enroll}, {"disks", disks}}, "");
  if (!job.ok()) return job.take_status();
  spdlog::info("agent {} {}", name,
               re_enroll ? "re-enrolled (old credential revoked)" : "enrolled");
  return json{{"name", name}, {"credential", credential}, {"re_enrolled", re_enroll}};
}

Result<json> ControlPlane::CreatePolicy(const std::string& name, const std::string& schedule,
                                        const std::string& time_zone, const json& retention) {
  VMSNAP_RETURN_IF_ERROR(
      ValidateItemName(name).WithFix("policy names use 1-128 letters, digits, '.', '_' or '-'"));
  auto s = Schedule::Parse(schedule, time_zone);
  if (!s.ok()) return s.take_status();
  auto r = Retention::FromJson(retention);
  if (!r.ok()) return r.take_status();
  std::lock_guard lock(mu_);
  auto ins =
      db_->Query("INSERT INTO policies(name, schedule, retention, created_ms) VALUES(?1,?2,?3,?4)",
                 {name, s->ToJson().dump(), r->ToJson().dump(), now_()});
  if (!ins.ok()) {
    if (ins.status().code() == Code::kAlreadyExists)
      return Status::Error(Code::kAlreadyExists, "a policy named '" + name + "' already exists",
                           "pick another name, or delete the old policy first");
    return ins.take_status();
  }
  return json{{"name", name}, {"schedule", s->ToJson()}, {"retention", r->ToJson()}};
}

Result<json> ControlPlane::ListPolicies() {
  std::lock_guard lock(mu_);
  auto rows = db_->Query(
      "SELECT p.name, p.schedule, p.retention, p.created_ms, "
      "(SELECT COUNT(*) FROM agents a WHERE a.policy = p.name) FROM policies p ORDER BY p.name");
  if (!rows.ok()) return rows.take_status();
  json out = json::array();
  for (const auto& r : *rows)
    out.push_back({{"name", r.Text(0)},
                   {"schedule", ParseOr(r.Text(1), json())},
                   {"retention", ParseOr(r.Text(2), json())},
                   {"created_ms", r.Int(3)},
                   {"vms", r.Int(4)}});
  return out;
}

Result<json> ControlPlane::GetPolicy(const std::string& name) {
  auto all = ListPolicies();
  if (!all.ok()) return all.take_status();
  for (const auto& p : *all)
    if (p["name"] == name) {
      json out = p;
      std::lock_guard lock(mu_);
      auto vms = db_->Query("SELECT name FROM agents WHERE policy = ?1 ORDER BY name", {name});
      out["protected_vms"] = json::array();
      if (vms.ok())
        for (const auto& v : *vms) out["protected_vms"].push_back(v.Text(0));
      if (auto s = Schedule::FromJson(p["schedule"]); s.ok())
        out["next_run"] = IsoTime(s->NextSlotAfter(now_()));
      return out;
    }
  return Status::NotFound("policy '" + name + "' does not exist",
                          "list policies with 'vmsnap policy list'");
}

Result<json> ControlPlane::DeletePolicy(const std::string& name) {
  std::lock_guard lock(mu_);
  auto used = db_->Query("SELECT COUNT(*) FROM agents WHERE policy = ?1", {name});
  if (!used.ok()) return used.take_status();
  if ((*used)[0].Int(0) > 0)
    return Status::Error(
        Code::kConflict,
        "policy '" + name + "' still protects " + std::to_string((*used)[0].Int(0)) + " VM(s)",
        "protect those VMs with another policy first");
  auto del = db_->Query("DELETE FROM policies WHERE name = ?1", {name});
  if (!del.ok()) return del.take_status();
  if (db_->Changes() == 0)
    return Status::NotFound("policy '" + name + "' does not exist",
                            "list policies with 'vmsnap policy list'");
  return json{{"deleted", name}};
}

Result<json> ControlPlane::Protect(const std::string& vm, const std::string& policy) {
  std::lock_guard lock(mu_);
  auto p = db_->Query("SELECT schedule FROM policies WHERE name = ?1", {policy});
  if (!p.ok()) return p.take_status();
  auto state = db_->Query("SELECT protection FROM agents WHERE name = ?1", {vm});
  if (!state.ok()) return state.take_status();
  if (!state->empty() && (*state)[0].Text(0) == "deleted")
    return Status::Error(Code::kConflict, "VM '" + vm + "' was deleted with its data",
                         "undelete it first: 'vmsnap undelete " + vm + "'");
  if (p->empty())
    return Status::NotFound("policy '" + policy + "' does not exist",
                            "create it with 'vmsnap policy create'");
  auto up = db_->Query(
      "UPDATE agents SET policy=?1, protection='protected', schedule_anchor_ms=?2 WHERE name=?3",
      {policy, now_(), vm});
  if (!up.ok()) return up.take_status();
  if (db_->Changes() == 0) return UnknownVm(vm);
  auto job = InsertJob(vm, "configure-protection", "admin", "completed", {{"policy", policy}}, "");
  if (!job.ok()) return job.take_status();
  json out{{"vm", vm}, {"policy", policy}, {"job", *job}};
  if (auto s = Schedule::FromJson(ParseOr((*p)[0].Text(0), json())); s.ok())
    out["next_run"] = IsoTime(s->NextSlotAfter(now_()));
  return out;
}

Result<json> ControlPlane::ListVms() {
  std::lock_guard lock(mu_);
  auto rows = db_->Query(
      "SELECT name, enrolled_ms, last_seen_ms, disks, policy, protection FROM agents ORDER BY "
      "name");
  if (!rows.ok()) return rows.take_status();
  json out = json::array();
  int64_t now = now_();
  for (const auto& r : *rows) {
    json vm{{"name", r.Text(0)},
            {"enrolled_ms", r.Int(1)},
            {"last_seen_ms", r.Int(2)},
            {"last_seen", IsoTime(r.Int(2))},
            {"reachable", now - r.Int(2) <= opts_.agent_timeout_ms},
            {"disks", ParseOr(r.Text(3), json::array())},
            {"policy", r.IsNull(4) ? json() : json(r.Text(4))},
            {"protection", r.Text(5)}};
    auto last = db_->Query(
        "SELECT id, state, ended_ms FROM jobs WHERE item=?1 AND type='backup' ORDER BY id DESC "
        "LIMIT 1",
        {r.Text(0)});
    if (last.ok() && !last->empty())
      vm["last_backup"] = {{"job", (*last)[0].Int(0)}, {"state", (*last)[0].Text(1)}};
    out.push_back(vm);
  }
  return out;
}

std::string ControlPlane::NotReachable(int64_t last_seen_ms) const {
  return "VM not found / agent not reachable since " + IsoTime(last_seen_ms);
}

Status ControlPlane::RequireNoActiveJob(const std::string& vm) {
  auto active = ActiveJob(vm);
  if (!active.ok()) return active.take_status();
  if (!*active) return Status::Ok();
  const std::string id = std::to_string(**active);
  return Status::Error(Code::kConflict,
                       "another operation is in progress on this item (job " + id + ")",
                       "wait for job " + id + " to finish ('vmsnap job show " + id +
                           " --follow') or cancel it ('vmsnap job cancel " + id + "')");
}

Result<std::optional<int64_t>> ControlPlane::ActiveJob(const std::string& vm) {
  auto rows = db_->Query(
      "SELECT id FROM jobs WHERE item=?1 AND state IN ('queued','in_progress') ORDER BY id LIMIT 1",
      {vm});
  if (!rows.ok()) return rows.take_status();
  if (rows->empty()) return std::optional<int64_t>();
  return std::optional<int64_t>((*rows)[0].Int(0));
}

Result<int64_t> ControlPlane::InsertJob(const std::string& vm, const std::string& type,
                                        const std::string& trigger, const std::string& state,
                                        const json& params, const std::string& error) {
  int64_t now = now_();
  bool ended = Terminal(state);
  auto r = db_->Query(
      "INSERT INTO jobs(item, type, state, trigger, created_ms, started_ms, ended_ms, params, "
      "error) "
      "VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9) RETURNING id",
      {vm, type, state, trigger, now, ended ? DbValue(now) : DbValue(nullptr),
       ended ? DbValue(now) : DbValue(nullptr), params.dump(),
       error.empty() ? DbValue(nullptr) : DbValue(error)});
  if (!r.ok()) return r.take_status();
  work_.notify_all();
  return (*r)[0].Int(0);
}

Result<json> ControlPlane::StartRestore(const std::string& vm, const std::string& rp_id, int disk,
                                        const std::vector<std::string>& targets) {
  std::lock_guard lock(mu_);
  auto rp = catalog_->Get(rp_id);
  if (!rp.ok() || rp->item != vm)
    return Status::NotFound("VM '" + vm + "' has no recovery point '" + rp_id + "'",
                            "list its points with 'vmsnap rp list " + vm + "'");
  if (targets.empty())
    return Status::InvalidArgument("a restore needs at least one target",
                                   "pass --to DEVICE_OR_FILE (one per disk, or --disk N)");
  auto a = db_->Query("SELECT last_seen_ms FROM agents WHERE name=?1", {vm});
  if (!a.ok()) return a.take_status();
  if (a->empty()) return UnknownVm(vm);
  VMSNAP_RETURN_IF_ERROR(RequireNoActiveJob(vm));
  int64_t last_seen = (*a)[0].Int(0);
  bool reachable = now_() - last_seen <= opts_.agent_timeout_ms;
  auto id = InsertJob(vm, "restore", "on-demand", reachable ? "queued" : "failed",
                      {{"recovery_point", rp_id}, {"disk", disk}, {"targets", targets}},
                      reachable ? "" : NotReachable(last_seen));
  if (!id.ok()) return id.take_status();
  return JobJson(*id);
}

Result<json> ControlPlane::StartBackupLocked(const std::string& vm, const std::string& trigger,
                                             int64_t retain_until_ms) {
  auto a = db_->Query("SELECT last_seen_ms, protection FROM agents WHERE name=?1", {vm});
  if (!a.ok()) return a.take_status();
  if (a->empty()) return UnknownVm(vm);
  if ((*a)[0].Text(1) == "deleted")
    return Status::Error(Code::kConflict, "VM '" + vm + "' was deleted with its data",
                         "undelete it first: 'vmsnap undelete " + vm + "'");
  VMSNAP_RETURN_IF_ERROR(RequireNoActiveJob(vm));
  json params{{"retain_until_ms", retain_until_ms > 0 ? json(retain_until_ms) : json()}};
  int64_t last_seen = (*a)[0].Int(0);
  bool reachable = now_() - last_seen <= opts_.agent_timeout_ms;
  auto id = InsertJob(vm, "backup", trigger, reachable ? "queued" : "failed", params,
                      reachable ? "" : NotReachable(last_seen));
  if (!id.ok()) return id.take_status();
  if (!reachable) spdlog::warn("backup of {} failed at once: {}", vm, NotReachable(last_seen));
  return JobJson(*id);
}

Result<json> ControlPlane::StartBackup(const std::string& vm, int64_t retain_until_ms) {
  std::lock_guard lock(mu_);
  if (retain_until_ms != 0 && retain_until_ms <= now_())
    return Status::InvalidArgument("--retain-until " + IsoTime(retain_until_ms) + " is in the past",
                                   "give a future date, e.g. --retain-until 2027-01-31");
  return StartBackupLocked(vm, "on-demand", retain_until_ms);
}

Result<json> ControlPlane::JobJson(int64_t id) {
  auto rows = db_->Query(std::string("SELECT ") + kJobColumns + " FROM jobs WHERE id=?1", {id});
  if (!rows.ok()) return rows.take_status();
  if (rows->empty())
    return Status::NotFound("job " + std::to_string(id) + " does not exist",
                            "list jobs with 'vmsnap job list'");
  return RowToJob((*rows)[0]);
}

Result<json> ControlPlane::GetJob(int64_t id) {
  std::lock_guard lock(mu_);
  return JobJson(id);
}

Result<json> ControlPlane::ListJobs(const std::string& vm, int limit) {
  std::lock_guard lock(mu_);
  if (limit <= 0 || limit > 10000) limit = 100;
  auto rows = vm.empty() ? db_->Query(std::string("SELECT ") + kJobColumns +
                                          " FROM jobs ORDER BY id DESC LIMIT ?1",
                                      {int64_t{limit}})
                         : db_->Query(std::string("SELECT ") + kJobColumns +
                                          " FROM jobs WHERE item=?1 ORDER BY id DESC LIMIT ?2",
                                      {vm, int64_t{limit}});
  if (!rows.ok()) return rows.take_status();
  json out = json::array();
  for (const auto& r : *rows) out.push_back(RowToJob(r));
  return out;
}

Result<json> ControlPlane::CancelJob(int64_t id) {
  std::lock_guard lock(mu_);
  auto job = JobJson(id);
  if (!job.ok()) return job.take_status();
  std::string state = (*job)["state"];
  if (Terminal(state))
    return Status::Error(Code::kConflict,
                         "job " + std::to_string(id) + " already ended (" + state + ")",
                         "nothing to cancel");
  if (state == "queued") {
    db_->Query(
        "UPDATE jobs SET state='cancelled', ended_ms=?1, error='cancelled before it started' WHERE "
        "id=?2",
        {now_(), id});
  } else {
    db_->Query("UPDATE jobs SET cancel_requested=1 WHERE id=?1", {id});
  }
  return JobJson(id);
}

Result<json> ControlPlane::Dashboard() {
  std::lock_guard lock(mu_);
  int64_t since = now_() - 24LL * 3600 * 1000;
  auto one = [&](const std::string& sql, std::vector<DbValue> p = {}) -> int64_t {
    auto r = db_->Query(sql, p);
    return r.ok() && !r->empty() ? (*r)[0].Int(0) : 0;
  };
  return json{
      {"vms", one("SELECT COUNT(*) FROM agents")},
      {"protected_vms", one("SELECT COUNT(*) FROM agents WHERE protection='protected'")},
      {"jobs_completed_24h",
       one("SELECT COUNT(*) FROM jobs WHERE state IN ('completed','completed_with_warnings') "
           "AND type='backup' AND ended_ms >= ?1",
           {since})},
      {"jobs_failed_24h",
       one("SELECT COUNT(*) FROM jobs WHERE state='failed' AND type='backup' AND ended_ms >= ?1",
           {since})},
      {"jobs_in_progress", one("SELECT COUNT(*) FROM jobs WHERE state='in_progress'")},
      {"jobs_queued", one("SELECT COUNT(*) FROM jobs WHERE state='queued'")},
      {"recovery_points", static_cast<int64_t>(catalog_->List("").size())},
      {"verify_runs_damaged_7d",
       one("SELECT COUNT(*) FROM verifications WHERE ok=0 AND started_ms >= ?1",
           {since - 6LL * 24 * 3600 * 1000})},
      {"now", IsoTime(now_())}};
}

Result<json> ControlPlane::Poll(const std::string& agent, const json& body) {
  std::unique_lock lock(mu_);
  int64_t now = now_();
  if (body.contains("disks") && body["disks"].is_array())
    db_->Query("UPDATE agents SET disks=?1, last_seen_ms=?2 WHERE name=?3",
               {body["disks"].dump(), now, agent});
  // An idle agent has no job: anything still marked running for it was lost with a restart.
  if (body.value("state", "idle") == "idle") {
    db_->Query(
        "UPDATE jobs SET state='failed', ended_ms=?1, error='the agent restarted during the job; "
        "nothing was committed' WHERE item=?2 AND state='in_progress'",
        {now, agent});
  }
  auto deadline = std::chrono::steady_clock::now() +
                  std::chrono::milliseconds(std::max<int64_t>(
                      0, std::min(opts_.poll_wait_ms, body.value("wait_ms", opts_.poll_wait_ms))));
  for (;;) {
    auto rows = db_->Query(
        "SELECT id FROM jobs WHERE item=?1 AND state='queued' ORDER BY id LIMIT 1", {agent});
    if (!rows.ok()) return rows.take_status();
    if (!rows->empty()) {
      int64_t id = (*rows)[0].Int(0);
      db_->Query("UPDATE jobs SET state='in_progress', started_ms=?1 WHERE id=?2", {now_(), id});
      auto job = JobJson(id);
      if (!job.ok()) return job.take_status();
      spdlog::info("job {} ({}) handed to agent {}", id, (*job)["type"].get<std::string>(), agent);
      return json{{"job", *job}};
    }
    if (work_.wait_until(lock, deadline) == std::cv_status::timeout) {
      db_->Query("UPDATE agents SET last_seen_ms=?1 WHERE name=?2", {now_(), agent});
      return json{{"job", nullptr}};
    }
  }
}

Result<json> ControlPlane::JobProgress(const std::string& agent, int64_t id, const json& progress) {
  std::lock_guard lock(mu_);
  auto job = JobJson(id);
  if (!job.ok() || (*job)["item"] != agent)
    return Status::NotFound("job " + std::to_string(id) + " is not a job of this agent");
  if (!Terminal((*job)["state"]))
    db_->Query("UPDATE jobs SET progress=?1 WHERE id=?2", {progress.dump(), id});
  return json{{"cancel", (*job)["cancel_requested"].get<bool>()}};
}

Result<json> ControlPlane::JobResult(const std::string& agent, int64_t id, const json& result) {
  std::lock_guard lock(mu_);
  auto job = JobJson(id);
  if (!job.ok() || (*job)["item"] != agent)
    return Status::NotFound("job " + std::to_string(id) + " is not a job of this agent");
  if (Terminal((*job)["state"])) return json{{"acknowledged", true}, {"duplicate", true}};
  std::string state = result.value("state", "failed");
  if (!Terminal(state)) state = "failed";
  db_->Query(
      "UPDATE jobs SET state=?1, ended_ms=?2, report=?3, error=?4 WHERE id=?5",
      {state, now_(), result.value("report", json()).dump(),
       result.value("error", json()).is_string() ? DbValue(result["error"].get<std::string>())
                                                 : DbValue(nullptr),
       id});
  spdlog::info("job {} of {} ended: {}", id, agent, state);
  return json{{"acknowledged", true}, {"duplicate", false}};
}

void ControlPlane::Tick() {
  int64_t now = 0;
  {
    std::lock_guard lock(mu_);
    now = now_();
    TickLocked(now);
  }
  if (!lifecycle_) return;
  {
    std::lock_guard cl(cleanup_mu_);
    if (last_cleanup_ms_ != 0 && now - last_cleanup_ms_ < opts_.cleanup_interval_ms &&
        now >= last_cleanup_ms_)
      return;
  }
  auto r = Cleanup();
  if (!r.ok()) spdlog::error("scheduled cleanup failed: {}", r.status().ToString());
}

void ControlPlane::TickLocked(int64_t now) {
  auto agents = db_->Query(
      "SELECT a.name, a.schedule_anchor_ms, p.schedule, a.last_seen_ms FROM agents a "
      "JOIN policies p ON p.name = a.policy WHERE a.protection = 'protected'");
  if (agents.ok()) {
    for (const auto& a : *agents) {
      auto s = Schedule::FromJson(ParseOr(a.Text(2), json()));
      if (!s.ok()) continue;
      int64_t slot = s->LastSlotAtOrBefore(now);
      if (slot <= a.Int(1)) continue;
      db_->Query("UPDATE agents SET schedule_anchor_ms=?1 WHERE name=?2", {slot, a.Text(0)});
      auto job = StartBackupLocked(a.Text(0), "scheduled", 0);
      if (!job.ok()) {
        // Another operation runs: record the skipped run so operators see it.
        InsertJob(a.Text(0), "backup", "scheduled", "failed", json::object(),
                  "scheduled backup skipped: " + job.status().cause());
      } else {
        spdlog::info("scheduled backup of {} for slot {}: job {}", a.Text(0), IsoTime(slot),
                     (*job)["id"].get<int64_t>());
      }
    }
  }
  // Queued work of agents that stopped answering fails with the reason.
  auto stale = db_->Query(
      "SELECT j.id, a.last_seen_ms FROM jobs j JOIN agents a ON a.name = j.item "
      "WHERE j.state='queued' AND a.last_seen_ms < ?1",
      {now - opts_.agent_timeout_ms});
  if (stale.ok())
    for (const auto& r : *stale)
      db_->Query("UPDATE jobs SET state='failed', ended_ms=?1, error=?2 WHERE id=?3",
                 {now, NotReachable(r.Int(1)), r.Int(0)});
}

Result<LifecycleInputs> ControlPlane::InputsLocked() {
  LifecycleInputs in;
  in.soft_delete_ms = opts_.soft_delete_ms;
  auto items = db_->Query(
      "SELECT a.name, a.protection, a.deleted_ms, p.retention FROM agents a "
      "LEFT JOIN policies p ON p.name = a.policy");
  if (!items.ok()) return items.take_status();
  for (const auto& r : *items) {
    ItemRules rules;
    const std::string state = r.Text(1);
    if (state == "protected" && !r.IsNull(3)) {
      auto ret = Retention::FromJson(ParseOr(r.Text(3), json()));
      if (ret.ok()) {
        rules.state = ItemState::kProtected;
        rules.retention = *ret;
      }
    } else if (state == "stopped") {
      rules.state = ItemState::kStopped;
    } else if (state == "deleted") {
      rules.state = ItemState::kDeleted;
      rules.deleted_ms = r.IsNull(2) ? 0 : r.Int(2);
    }
    in.items[r.Text(0)] = rules;
  }
  auto busy = db_->Query("SELECT DISTINCT item FROM jobs WHERE state IN ('queued','in_progress')");
  if (!busy.ok()) return busy.take_status();
  for (const auto& r : *busy) in.items[r.Text(0)].busy = true;
  auto overrides = db_->Query("SELECT id, retain_until_ms FROM rp_retention");
  if (!overrides.ok()) return overrides.take_status();
  for (const auto& r : *overrides) in.retain_overrides[r.Text(0)] = r.Int(1);
  return in;
}

namespace {
Status NoLifecycle() {
  return Status::NotFound("recovery point lifecycle is not enabled in this vault");
}
}  // namespace

Result<json> ControlPlane::Cleanup() {
  if (!lifecycle_) return NoLifecycle();
  std::lock_guard cl(cleanup_mu_);
  LifecycleInputs in;
  int64_t now = 0;
  {
    std::lock_guard lock(mu_);
    auto r = InputsLocked();
    if (!r.ok()) return r.take_status();
    in = std::move(*r);
    now = now_();
  }
  auto report = lifecycle_->Cleanup(now, in);
  last_cleanup_ms_ = now;
  if (!report.ok()) return report.take_status();
  {
    std::lock_guard lock(mu_);
    for (const auto& item : report->purged_items)
      db_->Query(
          "UPDATE agents SET protection='unprotected', policy=NULL, deleted_ms=NULL "
          "WHERE name=?1 AND protection='deleted'",
          {item});
    for (const auto& id : report->removed) db_->Query("DELETE FROM rp_retention WHERE id=?1", {id});
  }
  json out = report->ToJson();
  out["now"] = IsoTime(now);
  return out;
}

Result<json> ControlPlane::Unprotect(const std::string& vm, bool delete_data) {
  std::lock_guard lock(mu_);
  auto row = db_->Query("SELECT protection FROM agents WHERE name=?1", {vm});
  if (!row.ok()) return row.take_status();
  if (row->empty()) return UnknownVm(vm);
  if ((*row)[0].Text(0) == "deleted")
    return Status::Error(Code::kConflict, "VM '" + vm + "' is already deleted with its data",
                         "undelete it with 'vmsnap undelete " + vm + "'");
  if (delete_data) {
    VMSNAP_RETURN_IF_ERROR(RequireNoActiveJob(vm));
  }
  const int64_t now = now_();
  auto up = db_->Query("UPDATE agents SET protection=?1, policy=NULL, deleted_ms=?2 WHERE name=?3",
                       {std::string(delete_data ? "deleted" : "stopped"),
                        delete_data ? DbValue(now) : DbValue(nullptr), vm});
  if (!up.ok()) return up.take_status();
  auto job = InsertJob(vm, delete_data ? "delete-data" : "configure-protection", "admin",
                       "completed", {{"unprotect", delete_data ? "delete-data" : "keep-data"}}, "");
  if (!job.ok()) return job.take_status();
  json out{{"vm", vm}, {"protection", delete_data ? "deleted" : "stopped"}, {"job", *job}};
  if (delete_data) {
    out["purge_after_ms"] = now + opts_.soft_delete_ms;
    out["purge_after"] = IsoTime(now + opts_.soft_delete_ms);
  }
  return out;
}

Result<json> ControlPlane::Undelete(const std::string& vm) {
  std::lock_guard lock(mu_);
  auto row = db_->Query("SELECT protection FROM agents WHERE name=?1", {vm});
  if (!row.ok()) return row.take_status();
  if (row->empty()) return UnknownVm(vm);
  if ((*row)[0].Text(0) != "deleted")
    return Status::Error(Code::kConflict, "VM '" + vm + "' is not deleted",
                         "nothing to undelete; its protection is " + (*row)[0].Text(0));
  auto up =
      db_->Query("UPDATE agents SET protection='stopped', deleted_ms=NULL WHERE name=?1", {vm});
  if (!up.ok()) return up.take_status();
  auto job = InsertJob(vm, "configure-protection", "admin", "completed", {{"undelete", true}}, "");
  if (!job.ok()) return job.take_status();
  return json{{"vm", vm},
              {"protection", "stopped"},
              {"recovery_points", catalog_->List(vm).size()},
              {"job", *job}};
}

Result<json> ControlPlane::RetainPoint(const std::string& rp, int64_t until_ms) {
  auto point = catalog_->Get(rp);
  if (!point.ok()) return point.take_status();
  if (until_ms < 0) return Status::InvalidArgument("retention time must not be negative");
  std::lock_guard lock(mu_);
  auto r = until_ms == 0
               ? db_->Query("DELETE FROM rp_retention WHERE id=?1", {rp})
               : db_->Query(
                     "INSERT INTO rp_retention(id, retain_until_ms) VALUES(?1,?2) "
                     "ON CONFLICT(id) DO UPDATE SET retain_until_ms=excluded.retain_until_ms",
                     {rp, until_ms});
  if (!r.ok()) return r.take_status();
  return json{{"id", rp},
              {"item", point->item},
              {"retain_until_ms", until_ms == 0 ? json() : json(until_ms)}};
}

Result<json> ControlPlane::RecoveryPoints(const std::string& vm) {
  if (!lifecycle_) return NoLifecycle();
  LifecycleInputs in;
  int64_t now = 0;
  {
    std::lock_guard lock(mu_);
    auto r = InputsLocked();
    if (!r.ok()) return r.take_status();
    in = std::move(*r);
    now = now_();
  }
  return json{{"vm", vm}, {"recovery_points", lifecycle_->Points(vm, now, in)}};
}

Result<json> ControlPlane::Sessions() {
  if (!lifecycle_) return NoLifecycle();
  int64_t now = 0;
  {
    std::lock_guard lock(mu_);
    now = now_();
  }
  json sessions = lifecycle_->Sessions(now, LifecycleInputs{});
  for (auto& s : sessions) s["started"] = IsoTime(s["started_ms"].get<int64_t>());
  return json{{"sessions", std::move(sessions)}};
}

Result<json> ControlPlane::Storage(const std::string& vm) {
  if (!lifecycle_) return NoLifecycle();
  LifecycleInputs in;
  {
    std::lock_guard lock(mu_);
    auto r = InputsLocked();
    if (!r.ok()) return r.take_status();
    in = std::move(*r);
  }
  json out = lifecycle_->Storage(vm, in);
  if (!vm.empty() && out["items"].empty() && !in.items.count(vm))
    return Status::NotFound("VM '" + vm + "' has no recovery point and is not registered",
                            "list VMs with 'vmsnap vm list'");
  return out;
}

Result<json> ControlPlane::Verify(const std::string& vm, const std::string& rp) {
  return VerifyAndRecord(vm, rp, "on-demand");
}

Result<json> ControlPlane::VerifyAndRecord(const std::string& vm, const std::string& rp,
                                           const std::string& trigger) {
  if (!lifecycle_) return NoLifecycle();
  int64_t started = 0;
  {
    std::lock_guard lock(mu_);
    started = now_();
  }
  auto report = lifecycle_->Verify(vm, rp);
  if (!report.ok()) return report;
  std::lock_guard lock(mu_);
  const json& r = *report;
  auto count = [&](const char* key) { return r.value(key, int64_t{0}); };
  auto row = db_->Query(
      "INSERT INTO verifications(item, rp, trigger, started_ms, ended_ms, ok, blocks_checked, "
      "missing, corrupt, errors, report) VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11) RETURNING id",
      {vm, rp, trigger, started, now_(), int64_t{r.value("ok", false) ? 1 : 0},
       count("blocks_checked"), count("missing"), count("corrupt"), count("errors"), r.dump()});
  if (!row.ok()) return std::move(row.take_status()).InPhase("verify");
  json out = r;
  out["verification"] = (*row)[0].Int(0);
  out["trigger"] = trigger;
  return out;
}

void ControlPlane::VerifyTick() {
  if (!lifecycle_ || opts_.verify_interval_ms <= 0) return;
  std::lock_guard one(verify_mu_);
  {
    std::lock_guard lock(mu_);
    const int64_t now = now_();
    if (verify_anchor_ms_ == 0) {
      auto last = db_->Query("SELECT MAX(started_ms) FROM verifications WHERE trigger='scheduled'");
      verify_anchor_ms_ =
          last.ok() && !last->empty() && !(*last)[0].IsNull(0) ? (*last)[0].Int(0) : now;
    }
    if (now < verify_anchor_ms_) {  // the clock went back: count the interval from now
      verify_anchor_ms_ = now;
      return;
    }
    if (now - verify_anchor_ms_ < opts_.verify_interval_ms) return;
    verify_anchor_ms_ = now;
  }
  std::set<std::string> items;
  for (const auto& rp : catalog_->List("")) items.insert(rp.item);
  spdlog::info("scheduled verify of {} VM(s)", items.size());
  for (const auto& item : items) {
    auto r = VerifyAndRecord(item, "", "scheduled");
    if (!r.ok()) {
      // The VM's last point may have expired since the listing: nothing left to verify.
      if (r.status().code() != Code::kNotFound)
        spdlog::error("scheduled verify of {} failed: {}", item, r.status().ToString());
      continue;
    }
    if (!(*r)["ok"].get<bool>())
      spdlog::error(
          "scheduled verify of {}: {} missing and {} corrupt block references; run 'vmsnap "
          "verify {}' for the list",
          item, (*r)["missing"].get<int64_t>(), (*r)["corrupt"].get<int64_t>(), item);
  }
}

Result<json> ControlPlane::Verifications(const std::string& vm, int limit) {
  std::lock_guard lock(mu_);
  if (limit <= 0 || limit > 10000) limit = 100;
  const char* cols =
      "SELECT id, item, rp, trigger, started_ms, ended_ms, ok, blocks_checked, missing, corrupt, "
      "errors FROM verifications ";
  auto rows = vm.empty()
                  ? db_->Query(std::string(cols) + "ORDER BY id DESC LIMIT ?1", {int64_t{limit}})
                  : db_->Query(std::string(cols) + "WHERE item=?1 ORDER BY id DESC LIMIT ?2",
                               {vm, int64_t{limit}});
  if (!rows.ok()) return rows.take_status();
  json out = json::array();
  for (const auto& r : *rows)
    out.push_back({{"id", r.Int(0)},
                   {"vm", r.Text(1)},
                   {"rp", r.Text(2)},
                   {"trigger", r.Text(3)},
                   {"started", IsoTime(r.Int(4))},
                   {"started_ms", r.Int(4)},
                   {"ended_ms", r.Int(5)},
                   {"ok", r.Int(6) != 0},
                   {"blocks_checked", r.Int(7)},
                   {"missing", r.Int(8)},
                   {"corrupt", r.Int(9)},
                   {"errors", r.Int(10)}});
  return out;
}

}  // namespace vmsnap::vault

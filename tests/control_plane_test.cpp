// Integration tests of the control plane (issue 4): real vault with a test clock, real agent
// daemons (`vmsnap-agent run`) enrolled with one-time tokens, driven by the real admin CLI.
#include <doctest/doctest.h>
#include <signal.h>

#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>
#include <tuple>

#include "tests/support/test_support.hpp"

using namespace vmsnap::test;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr uint64_t kBlock = 64 * 1024;

RunResult Admin(const Vault& v, std::vector<std::string> args) {
  std::vector<std::string> argv{VMSNAP_ADMIN_BINARY};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.insert(argv.end(), {"--vault-config", v.data() + "/vault.json", "--json"});
  return Run(argv);
}

json AdminJson(const Vault& v, std::vector<std::string> args) {
  auto r = Admin(v, args);
  INFO("vmsnap " << args[0] << " stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  json j = r.json();
  REQUIRE(!j.is_null());
  return j;
}

// Sets the vault's test clock (and runs the scheduler once).
void SetClock(const Vault& v, int64_t now_ms) {
  auto r =
      Run({"/usr/bin/curl", "-s", "--cacert", v.ca(), "-H", "Authorization: Bearer " + v.token(),
           "-d", json{{"now_ms", now_ms}}.dump(), v.url() + "/v1/admin/clock"});
  INFO("clock: " << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  REQUIRE(r.json()["now_ms"] == now_ms);
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// 22:01 UTC of the day after `ms`.
int64_t NextEvening(int64_t ms) {
  int64_t day = ms / 86400000 * 86400000;
  return day + 86400000 + (22 * 60 + 1) * 60000;
}

// One enrolled agent with its own disk image and a running daemon.
struct TestAgent {
  std::string name, dir, disk, config;
  std::unique_ptr<Child> daemon;

  TestAgent(const Vault& v, const TempDir& tmp, const std::string& n, uint64_t disk_mib,
            std::vector<std::string> enroll_extra = {})
      : name(n), dir(tmp / n), disk(tmp / (n + ".img")), config(tmp / n + "/agent.json") {
    CreateSparseFile(disk, disk_mib << 20);
    std::vector<uint64_t> blocks;
    for (uint64_t i = 0; i < (disk_mib << 20) / kBlock; i += 2) blocks.push_back(i);
    WriteRandomBlocks(disk, kBlock, blocks, std::hash<std::string>{}(n));
    json token = AdminJson(v, {"enroll-token", "create", "--expires", "1h"});
    json info = json::parse(ReadWhole(v.data() + "/vault.json"));
    std::vector<std::string> args{"enroll",
                                  "--vault",
                                  v.url(),
                                  "--ca-fingerprint",
                                  info["ca_fingerprint_sha256"],
                                  "--token",
                                  token["token"],
                                  "--name",
                                  name,
                                  "--disk",
                                  disk,
                                  "--config",
                                  config,
                                  "--state-dir",
                                  dir + "/state",
                                  "--json"};
    args.insert(args.end(), enroll_extra.begin(), enroll_extra.end());
    auto r = Agent(args);
    INFO("enroll stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    CHECK(r.json()["name"] == name);
  }
  void Start() {
    daemon =
        std::make_unique<Child>(std::vector<std::string>{AgentBinary(), "run", "--config", config},
                                dir + "/daemon.out", dir + "/daemon.err");
  }
  std::string Credential() const { return json::parse(ReadWhole(config))["credential"]; }
  std::string Ca() const { return json::parse(ReadWhole(config))["ca_file"]; }
};

json WaitJob(const Vault& v, int64_t id, int seconds = 60) {
  for (int i = 0; i < seconds * 10; ++i) {
    json j = AdminJson(v, {"job", "show", std::to_string(id)});
    std::string s = j["state"];
    if (s != "queued" && s != "in_progress") return j;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  FAIL("job " << id << " did not end in time");
  return {};
}

json WaitState(const Vault& v, int64_t id, const std::string& state, int seconds = 30) {
  for (int i = 0; i < seconds * 10; ++i) {
    json j = AdminJson(v, {"job", "show", std::to_string(id)});
    if (j["state"] == state) return j;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  FAIL("job " << id << " never reached " << state);
  return {};
}

}  // namespace

TEST_CASE("two enrolled agents back up on schedule; jobs and dashboard agree") {
  TempDir tmp;
  Vault vault(tmp / "vault");
  vault.Configure({"--test-clock", "--poll-wait", "1", "--agent-timeout", "604800"});
  vault.Start();
  TestAgent a(vault, tmp, "vm-a", 8), b(vault, tmp, "vm-b", 8);
  a.Start();
  b.Start();
  json vms = AdminJson(vault, {"vm", "list"})["vms"];
  REQUIRE(vms.size() == 2);
  CHECK(vms[0]["name"] == "vm-a");
  CHECK(vms[0]["protection"] == "unprotected");

  AdminJson(vault, {"policy", "create", "nightly", "--schedule", "daily 22:00", "--tz", "UTC",
                    "--keep-daily", "7"});
  json protect = AdminJson(vault, {"protect", "vm-a", "--policy", "nightly"});
  CHECK(protect["next_run"].get<std::string>().find("T22:00:00Z") != std::string::npos);
  AdminJson(vault, {"protect", "vm-b", "--policy", "nightly"});
  CHECK(AdminJson(vault, {"dashboard"})["protected_vms"] == 2);
  CHECK(AdminJson(vault, {"policy", "show", "nightly"})["protected_vms"].size() == 2);

  // Nothing fires before the slot; moving the clock past 22:00 fires one backup per VM.
  json jobs_before = AdminJson(vault, {"job", "list"})["jobs"];
  SetClock(vault, NextEvening(NowMs()));
  json jobs = AdminJson(vault, {"job", "list"})["jobs"];
  std::vector<int64_t> backups;
  for (const auto& j : jobs)
    if (j["type"] == "backup") {
      CHECK(j["trigger"] == "scheduled");
      backups.push_back(j["id"]);
    }
  REQUIRE(backups.size() == 2);
  for (int64_t id : backups) {
    json done = WaitJob(vault, id);
    INFO(done.dump());
    CHECK(done["state"] == "completed");
    CHECK(done["report"]["consistency"] == "crash");
    CHECK(done["report"]["recovery_point"].is_string());
  }
  // The same slot does not fire twice.
  SetClock(vault, NextEvening(NowMs()) + 60000);
  int scheduled = 0;
  json all_jobs = AdminJson(vault, {"job", "list"})["jobs"];
  for (const auto& j : all_jobs)
    if (j["trigger"] == "scheduled") ++scheduled;
  INFO(all_jobs.dump());
  CHECK(scheduled == 2);

  json dash = AdminJson(vault, {"dashboard"});
  CHECK(dash["jobs_completed_24h"] == 2);
  CHECK(dash["jobs_failed_24h"] == 0);
  CHECK(dash["jobs_in_progress"] == 0);
  CHECK(dash["recovery_points"] == 2);
  json rps = AdminJson(vault, {"rp", "list", "vm-a"})["recovery_points"];
  REQUIRE(rps.size() == 1);
  CHECK(rps[0]["origin"]["trigger"] == "scheduled");

  // SIGTERM while idle: the daemon exits at once.
  a.daemon->Signal(SIGTERM);
  CHECK(a.daemon->Wait() == 0);
}

TEST_CASE("one operation per item; cancel; vault restart mid-job; results arrive once") {
  TempDir tmp;
  Vault vault(tmp / "vault");
  vault.Configure({"--poll-wait", "1"}, FreePort());
  vault.Start();
  // 48 MiB of data at 8 MB/s: a backup takes a few seconds.
  TestAgent a(vault, tmp, "vm-a", 96, {"--max-rate", "8000000"});
  a.Start();

  json first = AdminJson(vault, {"backup", "vm-a"});
  int64_t id = first["id"];
  WaitState(vault, id, "in_progress");
  auto second = Admin(vault, {"backup", "vm-a"});
  CHECK(second.exit_code != 0);
  CHECK(second.err.find("another operation is in progress on this item (job " + std::to_string(id) +
                        ")") != std::string::npos);

  // Cancel during the transfer: the job ends cancelled and no recovery point appears.
  AdminJson(vault, {"job", "cancel", std::to_string(id)});
  json cancelled = WaitJob(vault, id);
  CHECK(cancelled["state"] == "cancelled");
  CHECK(AdminJson(vault, {"rp", "list", "vm-a"})["recovery_points"].empty());
  // A cancelled job cannot be cancelled again; a queued one is dropped at once.
  CHECK(Admin(vault, {"job", "cancel", std::to_string(id)}).exit_code != 0);

  // Vault killed in the middle of a job: the agent carries on once it is back, and the result
  // is recorded exactly once.
  // New content, so the next backup uploads for several seconds again.
  std::vector<uint64_t> blocks;
  for (uint64_t i = 0; i < (96u << 20) / kBlock; i += 2) blocks.push_back(i);
  WriteRandomBlocks(a.disk, kBlock, blocks, 4242);
  json again = AdminJson(vault, {"backup", "vm-a", "--retain-until", "2099-01-01"});
  int64_t id2 = again["id"];
  WaitState(vault, id2, "in_progress");
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  vault.Kill(SIGKILL);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  vault.Start();
  json done = WaitJob(vault, id2, 120);
  INFO(done.dump() << "\nagent: " << ReadWhole(a.dir + "/daemon.err"));
  CHECK(done["state"] == "completed");
  json rps = AdminJson(vault, {"rp", "list", "vm-a"})["recovery_points"];
  REQUIRE(rps.size() == 1);
  CHECK(rps[0]["origin"]["job"] == id2);
  CHECK(rps[0]["origin"]["retain_until_ms"] == int64_t{4070908800000});
  CHECK(AdminJson(vault, {"dashboard"})["jobs_completed_24h"] == 1);
}

TEST_CASE("agents are isolated; a replaced credential is refused") {
  TempDir tmp;
  Vault vault(tmp / "vault");
  vault.Configure({"--poll-wait", "1"});
  vault.Start();
  TestAgent a(vault, tmp, "vm-a", 4), b(vault, tmp, "vm-b", 4);
  b.Start();
  json job = AdminJson(vault, {"backup", "vm-b"});
  REQUIRE(WaitJob(vault, job["id"])["state"] == "completed");
  std::string b_rp = AdminJson(vault, {"rp", "list", "vm-b"})["recovery_points"][0]["id"];

  // A restore job run by B's own agent: the disk comes back identical.
  auto restored =
      Admin(vault, {"restore", "vm-b", "--rp", b_rp, "--to", tmp / "b-restored.img", "--follow"});
  INFO("restore: " << restored.out << restored.err);
  CHECK(restored.exit_code == 0);
  CHECK(FileSha256(tmp / "b-restored.img") == FileSha256(b.disk));
  CHECK(Admin(vault, {"restore", "vm-b", "--rp", "20990101T000000000Z-0000", "--to", tmp / "x.img"})
            .exit_code == 6);

  std::vector<std::string> as_a{"--vault", vault.url(), "--ca", a.Ca(), "--token", a.Credential()};
  auto with = [](std::vector<std::string> base, std::vector<std::string> more) {
    base.insert(base.begin(), more.begin(), more.end());
    return base;
  };
  // A lists nothing of B's, cannot restore B's point, cannot back up as B.
  auto list = Agent(with(as_a, {"list", "--json"}));
  REQUIRE(list.exit_code == 0);
  CHECK(list.json()["recovery_points"].empty());
  auto restore = Agent(with(as_a, {"restore", "--rp", b_rp, "--to", tmp / "stolen.img"}));
  CHECK(restore.exit_code == 6);
  auto backup =
      Agent(with(as_a, {"backup", "--disk", a.disk, "--item", "vm-b", "--state-dir", tmp / "x"}));
  CHECK(backup.exit_code == 4);
  CHECK(backup.err.find("only its own item") != std::string::npos);
  // A may back up as itself with its credential.
  auto own = Agent(with(
      as_a, {"backup", "--disk", a.disk, "--item", "vm-a", "--state-dir", tmp / "x", "--json"}));
  CHECK(own.exit_code == 0);
  // Admin endpoints are closed to agents.
  auto admin_as_agent = Run({VMSNAP_ADMIN_BINARY, "vm", "list", "--vault", vault.url(), "--ca",
                             a.Ca(), "--token", a.Credential()});
  CHECK(admin_as_agent.exit_code == 4);

  // Re-enrolling A replaces its credential: the old one gets 401.
  std::string old_credential = a.Credential();
  TestAgent a2(vault, tmp, "vm-a", 4);
  auto stale = Agent({"list", "--vault", vault.url(), "--ca", a.Ca(), "--token", old_credential});
  CHECK(stale.exit_code == 4);
  CHECK(stale.err.find("401") != std::string::npos);
  CHECK(AdminJson(vault, {"vm", "list"})["vms"].size() == 2);
}

TEST_CASE(
    "vmsnap-agent check: an enrolled agent passes every step; a stale credential, a missing disk, "
    "a host name that does not resolve, a stopped vault and a missing config each fail their "
    "step with a fix and the command's exit code") {
  TempDir tmp;
  Vault vault(tmp / "vault");
  vault.Start();
  TestAgent a(vault, tmp, "vm-c", 4);
  auto check = [&](const std::string& config) {
    auto r = Agent({"check", "--config", config, "--timeout", "5", "--json"});
    INFO("check stderr: " << r.err);
    json out = r.json();
    REQUIRE(out.is_object());
    std::map<std::string, json> steps;
    for (const auto& step : out["checks"]) steps[step["check"].get<std::string>()] = step;
    return std::make_tuple(r.exit_code, out, steps);
  };

  auto [ok_code, ok_out, ok_steps] = check(a.config);
  CHECK(ok_code == 0);
  CHECK(ok_out["ok"] == true);
  for (const char* name : {"config", "resolve vault", "reach vault", "credential",
                           "state directory", "freeze guard"}) {
    INFO("step " << name);
    REQUIRE(ok_steps.count(name) == 1);
    CHECK(ok_steps[name]["ok"] == true);
  }
  CHECK(ok_steps["disk " + a.disk]["ok"] == true);
  CHECK(ok_steps["disk " + a.disk]["detail"] == "4.0 MiB, readable");
  CHECK(ok_steps["credential"]["detail"] == "accepted; no recovery point yet");
  // The credential step reads the agent's own points.
  auto backup = Agent({"backup", "--vault", vault.url(), "--ca", a.Ca(), "--token", a.Credential(),
                       "--disk", a.disk, "--item", "vm-c", "--state-dir", tmp / "state", "--json"});
  REQUIRE_MESSAGE(backup.exit_code == 0, backup.err);
  const std::string rp = backup.json()["recovery_point"];
  auto after_steps = std::get<2>(check(a.config));
  CHECK(after_steps["credential"]["detail"].get<std::string>().find(
            "1 recovery point(s), the latest " + rp) != std::string::npos);

  // A config whose credential was replaced by enrolling again.
  const json original = json::parse(ReadWhole(a.config));
  auto write_config = [&](const std::string& name, const json& config) {
    const std::string path = tmp / name;
    std::ofstream(path) << config.dump();
    return path;
  };
  const std::string stale = write_config("stale.json", original);
  TestAgent again(vault, tmp, "vm-c", 4);
  auto [stale_code, stale_out, stale_steps] = check(stale);
  CHECK(stale_code == 4);
  CHECK(stale_out["ok"] == false);
  CHECK(stale_out["phase"] == "credential");
  CHECK(stale_steps["credential"]["code"] == "UNAUTHENTICATED");
  CHECK(stale_steps["credential"]["fix"].get<std::string>().find("enroll again") !=
        std::string::npos);
  CHECK(stale_steps["reach vault"]["ok"] == true);
  CHECK(std::get<0>(check(again.config)) == 0);

  const json current = json::parse(ReadWhole(again.config));
  json missing_disk = current;
  missing_disk["disks"] = {tmp / "gone.img"};
  auto [disk_code, disk_out, disk_steps] = check(write_config("disk.json", missing_disk));
  CHECK(disk_code == 6);
  CHECK(disk_steps["disk " + (tmp / "gone.img")]["code"] == "NOT_FOUND");

  json unresolvable = current;
  unresolvable["vault"] = "https://vmsnap-check.invalid:8443";
  auto [dns_code, dns_out, dns_steps] = check(write_config("dns.json", unresolvable));
  CHECK(dns_code == 3);
  CHECK(dns_out["phase"] == "resolve vault");
  CHECK(dns_steps["resolve vault"]["error"].get<std::string>().find(
            "cannot resolve the vault's host 'vmsnap-check.invalid'") != std::string::npos);
  CHECK(dns_steps["reach vault"]["skipped"] == true);
  CHECK(dns_steps["credential"]["skipped"] == true);
  CHECK(dns_steps["disk " + a.disk]["ok"] == true);  // the local steps still run

  // Hook scripts: one that others may change is refused by backups (which are then
  // file-system consistent at best); the check names it with the command that fixes it.
  fs::create_directories(tmp / "hooks");
  const std::string hook = tmp / "hooks/10-db";
  std::ofstream(hook) << "#!/bin/sh\nexit 0\n";
  json with_hooks = current;
  with_hooks["hooks_dir"] = tmp / "hooks";
  const std::string hooks_config = write_config("hooks.json", with_hooks);
  if (IsRoot()) {  // a trusted script must be owned by root
    fs::permissions(hook, fs::perms(0755));
    auto hooks_ok = std::get<2>(check(hooks_config));
    CHECK(hooks_ok["hooks"]["ok"] == true);
    CHECK(hooks_ok["hooks"]["detail"] ==
          "1 hook script(s) in " + (tmp / "hooks") + ", trusted: 10-db");
  }
  fs::permissions(hook, fs::perms(0777));
  auto [hooks_code, hooks_out, hooks_steps] = check(hooks_config);
  CHECK(hooks_code == 4);
  CHECK(hooks_steps["hooks"]["code"] == "PERMISSION_DENIED");
  CHECK(hooks_steps["hooks"]["error"].get<std::string>().find(hook) != std::string::npos);
  CHECK(hooks_steps["hooks"]["fix"].get<std::string>().find(
            IsRoot() ? "chmod go-w " + hook : "chown root:root " + hook) != std::string::npos);
  CHECK(hooks_steps["reach vault"]["ok"] == true);

  REQUIRE(vault.Stop() == 0);
  auto [down_code, down_out, down_steps] = check(again.config);
  CHECK(down_code == 3);
  CHECK(down_steps["reach vault"]["code"] == "UNAVAILABLE");
  CHECK(down_steps["reach vault"]["error"].get<std::string>().find("Connection refused") !=
        std::string::npos);
  CHECK(down_steps["credential"]["skipped"] == true);

  auto [none_code, none_out, none_steps] = check(tmp / "none.json");
  CHECK(none_code == 6);
  CHECK(none_steps["config"]["fix"].get<std::string>().find("enroll") != std::string::npos);
  CHECK(none_steps["reach vault"]["skipped"] == true);
}

TEST_CASE("bad input and unreachable agents give clear errors") {
  TempDir tmp;
  Vault vault(tmp / "vault");
  vault.Configure({"--test-clock", "--poll-wait", "1", "--agent-timeout", "60"});
  vault.Start();

  auto unknown = Admin(vault, {"backup", "no-such-vm"});
  CHECK(unknown.exit_code == 6);
  CHECK(unknown.err.find("not registered") != std::string::npos);
  auto bad_schedule = Admin(vault, {"policy", "create", "p1", "--schedule", "hourly 5"});
  CHECK(bad_schedule.exit_code == 2);
  CHECK(bad_schedule.err.find("daily HH:MM") != std::string::npos);
  auto bad_tz =
      Admin(vault, {"policy", "create", "p1", "--schedule", "daily 01:00", "--tz", "Mars/Base"});
  CHECK(bad_tz.exit_code == 2);
  AdminJson(vault, {"policy", "create", "p1", "--schedule", "weekly sun,wed 06:00"});
  auto clash = Admin(vault, {"policy", "create", "p1", "--schedule", "daily 01:00"});
  CHECK(clash.exit_code != 0);
  CHECK(clash.err.find("already exists") != std::string::npos);
  CHECK(Admin(vault, {"protect", "no-such-vm", "--policy", "p1"}).exit_code == 6);

  // An expired enrollment token.
  json token = AdminJson(vault, {"enroll-token", "create", "--expires", "1m"});
  int64_t now = json::parse(ReadWhole(vault.data() + "/vault.json")).is_object() ? NowMs() : 0;
  SetClock(vault, now + 10 * 60000);
  json info = json::parse(ReadWhole(vault.data() + "/vault.json"));
  CreateSparseFile(tmp / "d.img", 1 << 20);
  auto late = Agent({"enroll", "--vault", vault.url(), "--ca-fingerprint",
                     info["ca_fingerprint_sha256"], "--token", token["token"], "--name", "late",
                     "--disk", tmp / "d.img", "--config", tmp / "late/agent.json"});
  CHECK(late.exit_code == 4);
  CHECK(late.err.find("expired") != std::string::npos);
  // A wrong CA fingerprint is refused before any secret is sent.
  auto pinned = Agent({"enroll", "--vault", vault.url(), "--ca-fingerprint", std::string(64, 'A'),
                       "--token", token["token"], "--name", "x", "--disk", tmp / "d.img",
                       "--config", tmp / "x/agent.json"});
  CHECK(pinned.exit_code == 4);
  CHECK(pinned.err.find("fingerprint") != std::string::npos);

  // An agent that stops answering: its backups fail with "VM not found / agent not reachable".
  TestAgent a(vault, tmp, "vm-a", 2);
  a.Start();
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  a.daemon->Signal(SIGTERM);
  CHECK(a.daemon->Wait() == 0);
  SetClock(vault, now + 3600000);
  auto r = Admin(vault, {"backup", "vm-a"});
  CHECK(r.exit_code == 11);
  json failed = r.json();
  CHECK(failed["state"] == "failed");
  CHECK(failed["error"].get<std::string>().find("VM not found / agent not reachable since") !=
        std::string::npos);
}

TEST_CASE("cancel during the freeze window: the hooks thaw first, then the job ends cancelled") {
  if (!IsRoot()) {
    if (InCi()) FAIL("needs root (hooks must be root-owned) and CI=true forbids skipping");
    MESSAGE("skipped: hook scripts must be owned by root");
    return;
  }
  TempDir tmp;
  Vault vault(tmp / "vault");
  vault.Configure({"--poll-wait", "1"});
  vault.Start();
  // A hook that holds the freeze window open for a few seconds and records its thaw call.
  std::string hooks = tmp / "hooks";
  fs::create_directories(hooks);
  fs::permissions(tmp.path(), fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                                  fs::perms::others_read | fs::perms::others_exec);
  {
    std::ofstream h(hooks + "/10-slow");
    h << "#!/bin/sh\nif [ \"$1\" = freeze ]; then touch " << tmp / "in-freeze"
      << "; sleep 4; fi\n"
      << "if [ \"$1\" = thaw ]; then touch " << tmp / "thawed"
      << "; fi\n";
  }
  fs::permissions(hooks + "/10-slow", fs::perms::owner_all | fs::perms::group_read |
                                          fs::perms::group_exec | fs::perms::others_read |
                                          fs::perms::others_exec);
  TestAgent a(
      vault, tmp, "vm-a", 8,
      {"--hooks-dir", hooks, "--runtime-dir", tmp / "run", "--freeze-only-under", tmp.path()});
  a.Start();
  json job = AdminJson(vault, {"backup", "vm-a"});
  int64_t id = job["id"];
  for (int i = 0; i < 200 && !fs::exists(tmp / "in-freeze"); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  INFO("job: " << AdminJson(vault, {"job", "show", std::to_string(id)}).dump()
               << "\nagent: " << ReadWhole(a.dir + "/daemon.err"));
  REQUIRE(fs::exists(tmp / "in-freeze"));
  AdminJson(vault, {"job", "cancel", std::to_string(id)});
  json done = WaitJob(vault, id);
  INFO(done.dump() << "\nagent: " << ReadWhole(a.dir + "/daemon.err"));
  CHECK(done["state"] == "cancelled");
  CHECK(fs::exists(tmp / "thawed"));  // the window was closed properly before stopping
  CHECK(AdminJson(vault, {"rp", "list", "vm-a"})["recovery_points"].empty());
  CHECK_FALSE(fs::exists(tmp / "run/frozen.json"));
}

// The control plane inside vmsnap-vault (issue 4; seeds 001/002): enrolled agents (one item
// per VM), policies (schedule + retention), protection, jobs and their reports, the scheduler
// and the dashboard. Metadata lives in SQLite (DATA/control.db).
//
// Jobs: types register, configure-protection, backup, restore; states queued, in_progress,
// completed, completed_with_warnings, failed, cancelled. At most one queued or running
// operation per item. Agents long-poll for work (Poll blocks up to poll_wait), report progress
// (and learn about cancellation) and post a final result; a result for a job that already ended
// is acknowledged without changing it, so re-sent results count once.
//
// Thread-safe: one mutex guards the database; Poll waits on a condition variable. The clock
// is injected (tests move it through the admin API when the vault runs with --test-clock).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/status.hpp"
#include "vault/catalog.hpp"
#include "vault/db.hpp"
#include "vault/retention.hpp"

namespace vmsnap::vault {

struct ControlPlaneOptions {
  int64_t agent_timeout_ms = 10 * 60 * 1000;     // "not reachable" after this long without contact
  int64_t poll_wait_ms = 20 * 1000;              // how long Poll holds an idle agent's request
  int64_t cleanup_interval_ms = 3600 * 1000;     // Tick runs a cleanup when this much has passed
  int64_t soft_delete_ms = 14LL * 86400 * 1000;  // unprotect --delete-data keeps data this long
  int64_t verify_interval_ms = 7LL * 86400 * 1000;  // scheduled verify of every VM; 0: never
};

class ControlPlane {
 public:
  using NowFn = std::function<int64_t()>;  // UTC milliseconds
  ControlPlane(std::unique_ptr<Db> db, Catalog* catalog, NowFn now, ControlPlaneOptions options);
  Status Init();

  // The agent a credential belongs to (and marks it seen), or nullopt.
  std::optional<std::string> AgentForToken(const std::string& token);

  // Admin.
  Result<nlohmann::json> CreateEnrollToken(int64_t ttl_seconds);
  Result<nlohmann::json> CreatePolicy(const std::string& name, const std::string& schedule,
                                      const std::string& time_zone,
                                      const nlohmann::json& retention);
  Result<nlohmann::json> ListPolicies();
  Result<nlohmann::json> GetPolicy(const std::string& name);
  Result<nlohmann::json> DeletePolicy(const std::string& name);
  Result<nlohmann::json> Protect(const std::string& vm, const std::string& policy);
  Result<nlohmann::json> ListVms();
  Result<nlohmann::json> StartBackup(const std::string& vm, int64_t retain_until_ms);
  // Queues a restore of `rp_id` (a point of `vm`) by the VM's agent to `targets` (devices or
  // files inside the VM; disk -1: every disk, one target each). Same one-operation rule.
  Result<nlohmann::json> StartRestore(const std::string& vm, const std::string& rp_id, int disk,
                                      const std::vector<std::string>& targets);
  Result<nlohmann::json> ListJobs(const std::string& vm, int limit);
  Result<nlohmann::json> GetJob(int64_t id);
  Result<nlohmann::json> CancelJob(int64_t id);
  Result<nlohmann::json> Dashboard();

  // Agents.
  Result<nlohmann::json> Enroll(const std::string& enroll_token, const std::string& name,
                                const nlohmann::json& disks);
  Result<nlohmann::json> Poll(const std::string& agent, const nlohmann::json& body);
  Result<nlohmann::json> JobProgress(const std::string& agent, int64_t id,
                                     const nlohmann::json& progress);
  Result<nlohmann::json> JobResult(const std::string& agent, int64_t id,
                                   const nlohmann::json& result);

  // Fires due scheduled backups and fails work for agents that stopped answering; runs a
  // cleanup when cleanup_interval_ms passed since the last one (on the injected clock).
  void Tick();

  // Recovery point lifecycle (issue 5). `lifecycle` is not owned; null disables it.
  void SetLifecycle(Lifecycle* lifecycle) { lifecycle_ = lifecycle; }
  // Runs one cleanup now (expiry with merge, purge, sessions, garbage collection).
  Result<nlohmann::json> Cleanup();
  // unprotect --keep-data (delete_data false) or --delete-data (soft delete).
  Result<nlohmann::json> Unprotect(const std::string& vm, bool delete_data);
  Result<nlohmann::json> Undelete(const std::string& vm);
  // Sets the on-demand retention of one point (0: back to its original retention).
  Result<nlohmann::json> RetainPoint(const std::string& rp, int64_t until_ms);
  Result<nlohmann::json> RecoveryPoints(const std::string& vm);
  Result<nlohmann::json> Storage(const std::string& vm);
  // Backup sessions and their state (Lifecycle::Sessions): {"sessions":[...]}.
  Result<nlohmann::json> Sessions();
  // Verifies `vm` (one point when `rp` is set) now and records the run (trigger "on-demand").
  Result<nlohmann::json> Verify(const std::string& vm, const std::string& rp);
  // Scheduled verify: when verify_interval_ms (> 0) has passed on the injected clock since the
  // last scheduled run (or since the first call, so a new vault does not read everything at
  // start-up), verifies every VM that has recovery points and records one run per VM (trigger
  // "scheduled"); damage is logged as an error. Blocking for as long as reading every block
  // takes: call it from its own thread, never from the scheduler's (Tick).
  void VerifyTick();
  // Recorded verify runs, newest first (of `vm`, or of every VM when empty).
  Result<nlohmann::json> Verifications(const std::string& vm, int limit);

 private:
  Result<nlohmann::json> JobJson(int64_t id);
  Result<std::optional<int64_t>> ActiveJob(const std::string& vm);
  // kConflict "another operation is in progress on this item (job N)" when one is queued or
  // running. Called with mu_ held.
  Status RequireNoActiveJob(const std::string& vm);
  Result<int64_t> InsertJob(const std::string& vm, const std::string& type,
                            const std::string& trigger, const std::string& state,
                            const nlohmann::json& params, const std::string& error);
  Result<nlohmann::json> StartBackupLocked(const std::string& vm, const std::string& trigger,
                                           int64_t retain_until_ms);
  std::string NotReachable(int64_t last_seen_ms) const;
  Result<LifecycleInputs> InputsLocked();
  void TickLocked(int64_t now);

  Lifecycle* lifecycle_ = nullptr;
  std::mutex cleanup_mu_;  // one cleanup at a time; never held together with mu_ first
  int64_t last_cleanup_ms_ = 0;
  // Runs a verify of `vm` and stores it in the verifications table.
  Result<nlohmann::json> VerifyAndRecord(const std::string& vm, const std::string& rp,
                                         const std::string& trigger);
  std::mutex verify_mu_;          // one VerifyTick at a time
  int64_t verify_anchor_ms_ = 0;  // the last scheduled verify (0: not known yet)

  std::unique_ptr<Db> db_;
  Catalog* catalog_;
  NowFn now_;
  ControlPlaneOptions opts_;
  std::mutex mu_;
  std::condition_variable work_;
};

// Formats UTC milliseconds as "2026-11-22T01:52:00Z".
std::string IsoTime(int64_t unix_ms);

}  // namespace vmsnap::vault

// The control-plane commands of the admin CLI `vmsnap` (issue 4): enroll tokens, VMs,
// policies, protection, on-demand backups, jobs (list, show --follow, cancel), recovery points
// and the dashboard; and the recovery point lifecycle (issue 5): `rp list` (expiry, bytes
// added), `rp retain`, `unprotect --keep-data|--delete-data`, `undelete`, `cleanup --now`,
// `storage [VM]` and `verify VM [--rp ID]` (exits with the CORRUPTION code when a block is
// missing or damaged). Human tables by default, --json everywhere. Exit codes: those of
// Status::ExitCode (docs/OPERATIONS.md); `job show --follow` exits 0 when the job completed,
// 10 when it completed with warnings, 11 when it failed, 12 when it was cancelled.
#pragma once

#include <memory>

namespace CLI {
class App;
}

namespace vmsnap::vault {

class AdminCommands {
 public:
  static std::unique_ptr<AdminCommands> Add(CLI::App& app);
  virtual ~AdminCommands() = default;
  virtual bool Handles() const = 0;
  virtual int Execute() = 0;
};

}  // namespace vmsnap::vault

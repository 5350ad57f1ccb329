// vmsnap: the administration tool. Subcommands today (issue 9):
//   vmsnap mount RP MOUNTPOINT          mount a recovery point read-only (foreground)
//   vmsnap umount MOUNTPOINT            undo a mount, also after the mount process died
//   vmsnap restore-files RP --path P... --to DIR [--overwrite]
// Connection: --vault URL --ca CAFILE (--token T | --token-file F), or --vault-config FILE
// (the vault's DATA/vault.json: url, ca_file, token_file).
#include <signal.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <iostream>
#include <nlohmann/json.hpp>

#include "agent/mount/attach.hpp"
#include "agent/mount/restore_files.hpp"
#include "agent/progress.hpp"
#include "common/cli_output.hpp"
#include "common/log.hpp"
#include "platform/env.hpp"
#include "vault/admin_commands.hpp"
#include "vault/admin_connection.hpp"

using namespace vmsnap;
using namespace vmsnap::mount;
using nlohmann::json;
using vmsnap::agent::HumanBytes;

namespace {

// Connection flags and their resolution are shared with the control-plane commands.
using Connection = vmsnap::vault::AdminConnection;

int Fail(const Status& st, bool as_json) {
  return ReportFailure("vmsnap", st, as_json);
}

Result<uint64_t> ParseSize(const std::string& text) {
  size_t pos = 0;
  uint64_t v = 0;
  try {
    v = std::stoull(text, &pos);
  } catch (...) {
    pos = 0;
  }
  std::string unit = text.substr(pos);
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  uint64_t mul = 0;
  if (unit.empty() || unit == "B") mul = 1;
  if (unit == "K" || unit == "KB" || unit == "KIB") mul = 1ull << 10;
  if (unit == "M" || unit == "MB" || unit == "MIB") mul = 1ull << 20;
  if (unit == "G" || unit == "GB" || unit == "GIB") mul = 1ull << 30;
  if (pos == 0 || mul == 0 || v == 0)
    return Status::InvalidArgument("size '" + text + "' is not understood",
                                   "write a positive number with K, M or G, e.g. 256M");
  return v * mul;
}

void PrintMount(const MountReport& r) {
  std::cout << "mounted recovery point " << r.recovery_point << " (consistency: " << r.consistency
            << ") at " << r.mountpoint << "\n";
  for (const auto& d : r.disks) {
    std::cout << "  disk " << d.index << " (" << d.source << ", " << HumanBytes(d.size_bytes)
              << "): " << d.image << " on " << d.loop_device << "\n";
    for (const auto& f : d.filesystems)
      std::cout << "    " << f.name << " " << (f.type.empty() ? "-" : f.type) << " "
                << (f.path.empty() ? "not mounted: " + f.note : f.path) << "\n";
  }
  std::cout << "stop with `vmsnap umount " << r.mountpoint << "` or Ctrl-C" << std::endl;
}

}  // namespace

int main(int argc, char** argv) {
  // Termination signals are taken with sigwait by the main thread only: block them before any
  // thread (FUSE workers) starts. Child programs get an empty mask (see sys::RunCommand).
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGHUP);

  CLI::App app{"vmsnap: administration of vmsnap recovery points"};
  app.require_subcommand(1);
  std::string log_level = "info";
  bool as_json = false;
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off");
  std::string state_dir = kDefaultStateDir;
  std::string cache_size = "256M";
  uint32_t readahead = 8;

  auto* mount = app.add_subcommand("mount", "Mount a recovery point read-only, without download");
  Connection mconn;
  mconn.AddTo(mount);
  std::string rp, mountpoint;
  mount->add_option("RP", rp, "Recovery point id")->required();
  mount->add_option("MOUNTPOINT", mountpoint, "Empty directory (created if missing)")->required();
  mount->add_option("--state-dir", state_dir, "Where mount state is recorded")
      ->capture_default_str();
  mount->add_option("--cache-size", cache_size, "Block cache bound, e.g. 256M")
      ->capture_default_str();
  mount->add_option("--readahead-blocks", readahead, "Most blocks read ahead on sequential reads")
      ->capture_default_str()
      ->check(CLI::Range(0, 256));
  mount->add_flag("--json", as_json, "Print the mount report as JSON on stdout");
  mount->footer(
      "Layout: MOUNTPOINT/images/disk<N>.img (the disks, fetched lazily; stats.json has the\n"
      "counters), MOUNTPOINT/disk<N>/part<M> (partition M of disk N, read-only) or\n"
      "MOUNTPOINT/disk<N>/whole (a disk without partition table). Stays in the foreground\n"
      "until SIGTERM/SIGINT or `vmsnap umount MOUNTPOINT`. Needs root.");

  auto* umount = app.add_subcommand("umount", "Undo `vmsnap mount` (also after a crash)");
  std::string umountpoint;
  int wait_s = 60;
  umount->add_option("MOUNTPOINT", umountpoint, "The mount point given to `vmsnap mount`")
      ->required();
  umount->add_option("--state-dir", state_dir, "Where mount state is recorded")
      ->capture_default_str();
  umount->add_option("--wait", wait_s, "Seconds to wait for a live mount process to stop")
      ->capture_default_str();
  umount->add_flag("--json", as_json, "Print JSON on stdout");

  auto* restore = app.add_subcommand("restore-files", "Copy files out of a recovery point");
  Connection rconn;
  rconn.AddTo(restore);
  RestoreFilesOptions ropt;
  restore->add_option("RP", rp, "Recovery point id")->required();
  restore
      ->add_option("--path", ropt.paths,
                   "disk<N>/part<M>/path (or disk<N>/whole/path) to restore (repeatable)")
      ->required();
  restore->add_option("--to", ropt.to, "Directory to copy into (PATH -> DIR/<last component>)")
      ->required();
  restore->add_flag("--overwrite", ropt.overwrite, "Replace files that already exist in DIR");
  restore->add_option("--state-dir", state_dir, "Where mount state is recorded")
      ->capture_default_str();
  restore->add_option("--work-dir", ropt.work_dir, "Where the temporary mount point is made")
      ->capture_default_str();
  restore->add_option("--cache-size", cache_size, "Block cache bound, e.g. 256M")
      ->capture_default_str();
  restore->add_flag("--json", as_json, "Print the summary as JSON on stdout");
  restore->footer(
      "PATH is relative to the layout of `vmsnap mount`: disk<N>/part<M>/some/path, e.g.\n"
      "disk0/part1/etc/fstab or disk1/whole/home. Each PATH is copied to DIR/<last component>\n"
      "with owners, modes, timestamps, symlinks and xattrs (cp -a). Needs root.");

  // Control-plane commands (issue 4): enroll tokens, VMs, policies, jobs, dashboard.
  auto admin = vmsnap::vault::AdminCommands::Add(app);

  CLI11_PARSE(app, argc, argv);
  InitLogging("vmsnap", log_level);
  if (admin->Handles()) return admin->Execute();
  // Only the mounting commands take signals synchronously (block before FUSE threads start).
  if (*mount || *restore) pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto image_options = [&](const Connection& c) -> Result<ImageOptions> {
    auto client = c.Options();
    if (!client.ok()) return client.take_status();
    auto cache = ParseSize(cache_size);
    if (!cache.ok()) return std::move(cache.take_status()).InPhase("prepare");
    ImageOptions o;
    o.control = *client;
    o.fetch = ShortFetchOptions(*client);
    o.recovery_point = rp;
    o.cache_bytes = *cache;
    o.max_readahead_blocks = readahead;
    return o;
  };

  if (*mount) {
    auto io = image_options(mconn);
    if (!io.ok()) return Fail(io.status(), as_json);
    MountOptions mo;
    mo.images = *io;
    mo.mountpoint = mountpoint;
    mo.state_dir = state_dir;
    auto session = MountSession::Start(mo);
    if (!session.ok()) return Fail(session.status(), as_json);
    if (as_json)
      std::cout << (*session)->report().ToJson().dump() << std::endl;
    else
      PrintMount((*session)->report());
    int sig = 0;
    sigwait(&stop_signals, &sig);
    spdlog::info("signal {}: unmounting {}", sig, (*session)->report().mountpoint);
    Status st = (*session)->Teardown();
    if (!st.ok()) return Fail(st, false);
    return 0;
  }
  if (*umount) {
    auto r = UnmountRecorded(umountpoint, state_dir, wait_s);
    if (!r.ok()) return Fail(r.status(), as_json);
    if (as_json) {
      std::cout << r->ToJson().dump() << std::endl;
    } else {
      std::cout << "unmounted " << r->mountpoint;
      if (r->stopped_process) std::cout << " (stopped mount process " << r->pid << ")";
      std::cout << "\n";
      for (const auto& m : r->unmounted) std::cout << "  unmounted " << m << "\n";
      for (const auto& l : r->detached) std::cout << "  detached " << l << "\n";
    }
    return 0;
  }
  if (*restore) {
    auto io = image_options(rconn);
    if (!io.ok()) return Fail(io.status(), as_json);
    ropt.images = *io;
    ropt.state_dir = state_dir;
    auto r = RunRestoreFiles(ropt);
    if (!r.ok()) return Fail(r.status(), as_json);
    if (as_json) {
      std::cout << r->ToJson().dump() << std::endl;
    } else {
      std::cout << "restored from recovery point " << r->recovery_point
                << " (consistency: " << r->consistency << "): " << r->files << " files, "
                << r->directories << " directories, " << r->symlinks << " symlinks, "
                << HumanBytes(r->bytes) << "\n";
      for (const auto& [from, to] : r->copied) std::cout << "  " << from << " -> " << to << "\n";
    }
    return 0;
  }
  return 2;
}

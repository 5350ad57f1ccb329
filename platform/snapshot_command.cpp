#include "platform/snapshot_command.hpp"

#include <algorithm>
#include <sstream>

#include "platform/quiesce.hpp"

namespace vmsnap::platform {

namespace {
constexpr const char* kPhase = "snapshot";
}  // namespace

Result<std::vector<SnapshotDisk>> RunSnapshotCommand(const std::vector<std::string>& disks,
                                                     const SnapshotOptions& options,
                                                     std::chrono::steady_clock::time_point deadline,
                                                     bool* command_succeeded) {
  *command_succeeded = false;
  if (options.command_path.empty())
    return Status::InvalidArgument("the command provider needs an executable",
                                   "configure the snapshot command's path")
        .InPhase(kPhase);
  VMSNAP_RETURN_IF_ERROR(
      Status(CheckTrustedFile(options.command_path, "snapshot command")).InPhase(kPhase));
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  if (left.count() <= 0)
    return Status::Error(Code::kTimeout, "no time left before the freeze deadline",
                         "make the freeze scripts faster or raise the freeze deadline (max 60 s)")
        .InPhase(kPhase);
  ProcessSpec spec;
  spec.path = options.command_path;
  spec.args = options.command_args;
  spec.args.insert(spec.args.end(), disks.begin(), disks.end());
  spec.timeout = std::min(left, options.command_timeout);
  auto run = RunProcess(spec);
  if (!run.ok()) return run.take_status().InPhase(kPhase);
  if (run->timed_out)
    return Status::Error(Code::kTimeout,
                         "snapshot command " + options.command_path +
                             " ran past the freeze deadline and was killed after " +
                             std::to_string(run->duration_ms) + " ms",
                         "make the command faster or raise the freeze deadline (max 60 s)")
        .InPhase(kPhase);
  if (!run->succeeded())
    return Status::IoError("snapshot command " + options.command_path +
                               " failed: " + run->Describe() + "; output: " + run->output_tail,
                           "see the command's output")
        .InPhase(kPhase);
  *command_succeeded = true;
  std::vector<std::string> paths;
  std::istringstream lines(run->stdout_text);
  for (std::string line; std::getline(lines, line);) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (!line.empty()) paths.push_back(line);
  }
  if (paths.size() != disks.size())
    return Status::InvalidArgument("snapshot command printed " + std::to_string(paths.size()) +
                                       " paths for " + std::to_string(disks.size()) + " disks",
                                   "print exactly one path to read per disk, in order")
        .InPhase(kPhase);
  std::vector<SnapshotDisk> taken;
  for (size_t i = 0; i < disks.size(); ++i)
    taken.push_back({disks[i], paths[i], "command", /*point_in_time=*/true, ""});
  return taken;
}

}  // namespace vmsnap::platform

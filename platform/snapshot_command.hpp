// The "command" snapshot provider's run, the same on both platforms (platform/linux/snapshot.cpp
// and platform/windows/snapshot.cpp keep what it returns in their Snapshot).
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "common/status.hpp"
#include "platform/snapshot.hpp"

namespace vmsnap::platform {

// Checks options.command_path (CheckTrustedFile), runs it with options.command_args followed
// by `disks`, for at most min(time left before `deadline`, options.command_timeout), and
// returns the disks with what it printed on its standard output as their read paths: one path
// per disk, in order (one per line; trailing CR and spaces dropped, empty lines skipped).
// `*command_succeeded` is set to true once the command exited 0: its cleanup command must run then,
// even when the answer is unusable. Errors (kInvalidArgument, kTimeout, kIoError) are in the phase
// "snapshot" and say how to fix the command. Blocks the calling thread while the command runs.
Result<std::vector<SnapshotDisk>> RunSnapshotCommand(const std::vector<std::string>& disks,
                                                     const SnapshotOptions& options,
                                                     std::chrono::steady_clock::time_point deadline,
                                                     bool* command_succeeded);

}  // namespace vmsnap::platform

// Small, safe wrappers of the Linux facilities the mount code needs: running helper programs
// (losetup, blkid, cp), reading the mount table and loop devices from /proc and /sys, mount(2)
// and umount2(2). No OS header leaks from here.
//
// Threads: every function is thread-safe (no shared state). Failures are Status values that
// name the command or path and the errno text.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/status.hpp"

namespace vmsnap::mount::sys {

struct CommandResult {
  int exit_code = -1;  // 128+N when killed by signal N
  std::string out;
  std::string err;
};

// Runs argv (argv[0] searched in PATH) to completion with stdin = /dev/null, an empty signal
// mask and default signal dispositions; captures stdout and stderr. Fails only if the program
// cannot be started (then the fix names the Debian package in `package`).
Result<CommandResult> RunCommand(const std::vector<std::string>& argv,
                                 const std::string& package = {});

// Mount points from /proc/self/mountinfo (octal escapes decoded), in table order.
std::vector<std::string> MountPoints();
bool IsMountPoint(const std::string& path);

// "/dev/loop3" -> the loop device's backing file path, or "" if it has none / does not exist.
std::string LoopBackingFile(const std::string& device);
// Partition device nodes of a loop device ("/dev/loop3p1", ...) sorted by partition number,
// with their numbers. Waits up to `wait_ms` for the device nodes to appear.
struct Partition {
  int number = 0;
  std::string device;
};
std::vector<Partition> LoopPartitions(const std::string& device, int wait_ms = 5000);

// Start time of a process (clock ticks since boot, /proc/PID/stat field 22); nullopt if the
// process does not exist or has exited (a zombie counts as gone). Together with the pid it names
// one process, across pid reuse.
std::optional<uint64_t> ProcessStartTime(int pid);
int CurrentPid();

// mount(2) read-only, nosuid, nodev. `options` is the filesystem's data string.
Status MountReadOnly(const std::string& device, const std::string& target,
                     const std::string& fstype, const std::string& options);
// umount2(2): a plain unmount; if busy, a lazy detach (and `lazy` is set). Ok if `path` is
// not a mount point any more.
Status Unmount(const std::string& path, bool* lazy = nullptr);
// Aborts a FUSE connection and unmounts (MNT_FORCE, then MNT_DETACH if still busy).
Status ForceUnmountFuse(const std::string& path);

// Sends SIGTERM to pid.
Status Terminate(int pid);

}  // namespace vmsnap::mount::sys

// Quiescing a machine's filesystems for a consistent backup (issue 3), platform-neutral.
//
// Three pieces:
//  1. Mount discovery: which mounted filesystems live on a set of disks (block devices with
//     their partitions, or disk image files through the loop devices backed by them).
//  2. A freeze session that always thaws: a separate guard process freezes and thaws; the
//     agent keeps its own descriptors and thaws itself at the deadline if the guard did not
//     confirm (guard stuck, stopped or killed). A marker under the runtime dir lets a restarted
//     agent thaw leftovers (RecoverLeftoverFreeze).
//  3. Running owner-supplied programs (hook scripts, snapshot commands) with a timeout that
//     kills the whole process group, and the ownership/mode check for such programs.
//
// No OS header is included here. Every function returns a Status or Result; none throws.
// Times named *_us are microseconds of the monotonic clock (std::chrono::steady_clock, which
// is CLOCK_MONOTONIC on Linux and therefore comparable between processes).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.hpp"

namespace vmsnap::platform {

// Microseconds of the monotonic clock now.
int64_t MonotonicNowUs();

// ---------------------------------------------------------------------------------------------
// Running owner-supplied programs.

struct ProcessSpec {
  std::string path;               // the executable (not looked up in PATH)
  std::vector<std::string> args;  // argv[1..]
  std::chrono::milliseconds timeout{30000};
  size_t output_tail_bytes = 4096;          // how much of stdout+stderr to keep (the end)
  size_t stdout_limit_bytes = 1024 * 1024;  // stdout kept separately, from the start
};

struct ProcessOutcome {
  int exit_code = -1;       // valid when the program exited (term_signal == 0, !timed_out)
  int term_signal = 0;      // > 0 when a signal ended it
  bool timed_out = false;   // it ran past the timeout; its whole process group was killed
  int64_t duration_ms = 0;  // start to exit (or to the kill at the timeout)
  std::string stdout_text;  // stdout alone, up to stdout_limit_bytes
  std::string output_tail;  // the last output_tail_bytes of stdout and stderr, interleaved
  bool succeeded() const { return !timed_out && term_signal == 0 && exit_code == 0; }
  // "exit code 3", "killed by signal 9", "timed out after 30000 ms".
  std::string Describe() const;
};

// Runs the program in a new session (its own process group), stdin from /dev/null, stdout
// and stderr captured through pipes, default signal dispositions and an empty signal mask.
// At the timeout the whole process group gets SIGTERM, then SIGKILL one second later.
// Returns an error only when the program could not be started (not found, not executable);
// a program that fails or times out is a successful call with an unsuccessful outcome.
// Safe in a multi-threaded process (posix_spawn: nothing but exec runs in the child).
Result<ProcessOutcome> RunProcess(const ProcessSpec& spec);

// Refuses a file that another user could have changed: it must exist, be a regular file,
// be owned by root and not be writable by group or others. The error (kPermissionDenied)
// names `what`, the file and the exact chown/chmod command that fixes it.
Status CheckTrustedFile(const std::string& path, const std::string& what);

// True when `path` is a regular file this platform can run as a program: Linux: any execute
// bit set; Windows (no execute bit): a .exe, .com, .cmd, .bat or .ps1 file (case-insensitive).
bool IsProgramFile(const std::string& path);

// ---------------------------------------------------------------------------------------------
// Mount discovery.

struct MountedFilesystem {
  std::string mount_point;        // the shallowest mount of this device (bind mounts deduplicated)
  std::string fs_type;            // "ext4", "xfs", ...
  std::string source;             // mount source, e.g. "/dev/loop3p1"
  std::string disk;               // the caller's disk path this filesystem lives on
  uint64_t device = 0;            // the block device's id (OS encoding of major:minor)
  bool freezable = false;         // ext3, ext4, xfs or btrfs
  std::string why_not_freezable;  // set when !freezable
  std::vector<std::string> other_mount_points;  // bind mounts of the same device (not frozen)
};

struct DiscoveryOptions {
  std::string mountinfo_path = "/proc/self/mountinfo";
  std::string sysfs_root = "/sys";
};

// The mounted filesystems on `disks`: each disk is a block device (its partitions count too)
// or a disk image file (the loop devices backed by it, and their partitions, count). One
// entry per device (bind mounts folded into other_mount_points). Ordered for freezing:
// freezable ones first, deepest mount point first, "/" last; then the unfreezable ones.
// A disk that does not exist is kNotFound; a disk with no mounted filesystem gives no entry.
Result<std::vector<MountedFilesystem>> DiscoverFilesystems(const std::vector<std::string>& disks,
                                                           const DiscoveryOptions& options = {});

// The loop devices ("/dev/loopN") whose backing file is `image_file` (compared by canonical
// path), in name order. Empty when none.
std::vector<std::string> LoopDevicesBackedBy(const std::string& image_file,
                                             const std::string& sysfs_root = "/sys");

// The backing file of a loop device, e.g. "/var/lib/img/disk0.img". kNotFound when the device
// is not a bound loop device.
Result<std::string> LoopBackingFile(const std::string& loop_device,
                                    const std::string& sysfs_root = "/sys");

// ---------------------------------------------------------------------------------------------
// Freezing.

inline constexpr std::chrono::milliseconds kDefaultFreezeDeadline{10000};
inline constexpr std::chrono::milliseconds kMaxFreezeDeadline{60000};
inline constexpr const char* kDefaultRuntimeDir = "/run/vmsnap";
inline constexpr const char* kFrozenMarkerName = "frozen.json";
// When set (paths separated by ':'), the guard and FreezeSession refuse every mount point that
// is not strictly below one of these directories (and always "/"). Tests set it.
inline constexpr const char* kFreezeOnlyUnderEnv = "VMSNAP_FREEZE_ONLY_UNDER";

struct FreezeOptions {
  std::string guard_binary;                      // path of vmsnap-freeze-guard (required)
  std::string runtime_dir = kDefaultRuntimeDir;  // holds the frozen marker; must not be frozen
  std::chrono::milliseconds deadline = kDefaultFreezeDeadline;  // (0, 60 s], from Start()
  // Safety restriction (tests): mount points must be strictly below one of these dirs, and
  // "/" is always refused. Combined with the environment variable kFreezeOnlyUnderEnv.
  std::vector<std::string> only_under;
  // How long Thaw() waits for the guard's confirmation before thawing through its own
  // descriptors (it does that anyway, afterwards; FITHAW of a thawed filesystem is harmless).
  std::chrono::milliseconds thaw_confirm_wait{2000};
};

// What happened to one filesystem during a freeze session.
struct FilesystemFreezeReport {
  std::string mount_point;
  std::string fs_type;
  bool frozen = false;     // FIFREEZE succeeded
  std::string why_not;     // when !frozen: "busy (EBUSY)", "not supported (EOPNOTSUPP)", ...
  std::string thawed_by;   // "guard", "agent" (the second path) or "" (never frozen/unknown)
  std::string thaw_error;  // non-empty when no thaw could be confirmed
  int64_t frozen_at_us = 0;
  int64_t thawed_at_us = 0;
  double window_ms() const {
    return frozen && thawed_at_us > 0 ? (thawed_at_us - frozen_at_us) / 1000.0 : 0.0;
  }
};

// A running freeze. Created by Start() with every filesystem frozen (or recorded as not
// frozen); thawed by Thaw(), by the destructor, by the guard at the deadline, by the guard
// when this process dies, and by this object's watchdog thread at the deadline (second path).
// Methods are thread-safe. Never block past the deadline + thaw_confirm_wait.
class FreezeSession {
 public:
  virtual ~FreezeSession() = default;  // implementations thaw (Thaw()) and reap the guard

  // Writes the marker, opens its own descriptors of the mount points, starts the guard and
  // waits until the guard has tried every filesystem (or the deadline). `filesystems` must be
  // freezable, deduplicated and in freeze order (as DiscoverFilesystems returns them).
  // EBUSY/EOPNOTSUPP on a filesystem: recorded as not frozen, the session still starts. Any
  // other freeze error: everything is thawed and the error is returned (phase "freeze").
  // Refused mount points (safety restriction, "/" under it) are kPermissionDenied.
  static Result<std::unique_ptr<FreezeSession>> Start(
      const std::vector<MountedFilesystem>& filesystems, const FreezeOptions& options);

  virtual std::chrono::steady_clock::time_point deadline() const = 0;

  // Asks the guard to thaw, waits for its confirmation (bounded), then thaws through the
  // agent's own descriptors too, reaps the guard and removes the marker. Idempotent. An error
  // means some filesystem could not be confirmed thawed (the marker is then kept).
  virtual Status Thaw() = 0;

  // Per filesystem, in freeze order. Complete after Thaw().
  virtual std::vector<FilesystemFreezeReport> Filesystems() const = 0;
  // True when a thaw was caused by the deadline (guard's or agent's) rather than Thaw().
  virtual bool deadline_hit() const = 0;
  // The earliest moment any filesystem was thawed (0 if none yet).
  virtual int64_t first_thaw_us() const = 0;
  // The guard's process id (for tests that stop or kill it).
  virtual int guard_pid() const = 0;
};

// What a restarting agent found in the runtime dir's marker.
struct LeftoverFreeze {
  bool found = false;  // a marker existed: a previous backup was interrupted
  std::string marker_path;
  std::string marker_text;  // the marker's contents (for the report)
  struct Entry {
    std::string mount_point;
    std::string outcome;  // "thawed" (it was frozen), "not frozen", or an error text
  };
  std::vector<Entry> filesystems;
};

// Serialises the consistency steps (leftover recovery, pre scripts, freeze, snapshot, thaw)
// of the agents that share a runtime dir: the frozen marker is one file per runtime dir, so a
// second agent must neither overwrite it nor "recover" (thaw) a freeze that is still running.
// Held from before RecoverLeftoverFreeze until the freeze is over; released on destruction
// (and by the kernel when the process dies). Movable, not copyable.
class RuntimeDirLock {
 public:
  RuntimeDirLock() = default;
  RuntimeDirLock(RuntimeDirLock&& other) noexcept;
  RuntimeDirLock& operator=(RuntimeDirLock&& other) noexcept;
  RuntimeDirLock(const RuntimeDirLock&) = delete;
  RuntimeDirLock& operator=(const RuntimeDirLock&) = delete;
  ~RuntimeDirLock();
  // False when the runtime dir could not be created or opened for lack of permission (an
  // unprivileged agent, which cannot freeze anything either); why_not says so.
  bool held() const { return handle_ != -1; }
  const std::string& why_not() const { return why_not_; }

 private:
  friend Result<RuntimeDirLock> LockRuntimeDir(const std::string&, std::chrono::milliseconds);
  intptr_t handle_ = -1;  // the OS lock object (Linux: a descriptor; Windows: a HANDLE); -1: none
  std::string why_not_;
};

// Creates runtime_dir if needed and takes an exclusive lock on runtime_dir/agent.lock, waiting
// up to `wait` while another agent holds it. kConflict when it is still held then (the error
// names the holder's pid and the fix). Lack of permission is not an error: see held().
Result<RuntimeDirLock> LockRuntimeDir(const std::string& runtime_dir,
                                      std::chrono::milliseconds wait);

// Thaws every mount point the marker in runtime_dir lists (FITHAW, EINVAL = was not frozen)
// and removes the marker when every thaw was confirmed. Call at agent start-up, before any
// backup starts. Not finding a marker is success with found == false.
Result<LeftoverFreeze> RecoverLeftoverFreeze(const std::string& runtime_dir = kDefaultRuntimeDir);

}  // namespace vmsnap::platform

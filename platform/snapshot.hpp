// Snapshot providers (issue 3, "Snapshot providers"): turn the disks being backed up into
// point-in-time copies to read, taken inside the freeze window.
//
//   "file"          a disk that is an image file: FICLONE copy next to it when its filesystem
//                   supports reflinks; otherwise a guarded read of the file itself
//                   (point_in_time == false: the reader must compare the file's identity
//                   before and after reading; unchanged gives at best `crash`).
//   "loop-reflink"  a loop device whose backing file sits on a reflink-capable filesystem
//                   (btrfs, XFS with reflink): FICLONE copy of the backing file. No fallback.
//   "command"       an owner-supplied executable (root-owned, not group/other-writable), run
//                   with the disk paths as its last arguments; it prints one path to read per
//                   disk, one per line, in order. Its timeout is the time left until the
//                   freeze deadline. An optional cleanup executable gets those paths later.
//   "lvm"           a disk that is an LVM logical volume: an LVM snapshot (thin for thin
//                   volumes, classic copy-on-write at 10 % of the origin otherwise) created
//                   inside the freeze window with lvcreate, read via /dev/VG/SNAP, removed with
//                   lvremove. Needs device-mapper (/dev/mapper/control) and lvm2; without
//                   them a clear kInvalidArgument.
//   "auto"          per disk: loop device -> loop-reflink, image file -> file, else error.
//
// No OS header is included. Thread-compatible (one Snapshot per backup).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.hpp"

namespace vmsnap::platform {

struct SnapshotOptions {
  std::string provider = "auto";          // "auto", "file", "loop-reflink", "command", "lvm"
  std::string command_path;               // "command": the executable
  std::vector<std::string> command_args;  // "command": arguments before the disk paths
  std::string cleanup_command_path;       // "command": optional, run with the printed paths
  bool command_is_atomic = false;         // "command": all disks captured at one instant
  std::chrono::milliseconds command_timeout{60000};  // also bounded by the freeze deadline
};

struct SnapshotDisk {
  std::string disk;           // the caller's disk path
  std::string read_path;      // what to read instead of the disk
  std::string provider;       // the provider that handled this disk
  bool point_in_time = true;  // false: a guarded read of the live file (see above)
  std::string note;           // e.g. why a clone fell back to a guarded read
};

// The snapshots of one backup. Owns what the providers created: Delete() (or the destructor)
// removes the clones and runs the command provider's cleanup. Reading the read_paths after
// Delete() is a caller bug.
class Snapshot {
 public:
  virtual ~Snapshot() = default;  // implementations call Delete() and ignore its error
  virtual const std::vector<SnapshotDisk>& disks() const = 0;
  // True when all disks were captured at one instant (a single disk always is).
  virtual bool atomic() const = 0;
  // Monotonic microseconds when the last disk's snapshot completed.
  virtual int64_t completed_at_us() const = 0;
  virtual const std::string& provider() const = 0;
  // Idempotent. Errors name the clone or command that could not be removed.
  virtual Status Delete() = 0;
};

// Takes the snapshots of `disks`, all before `deadline` (monotonic clock). On any error the
// snapshots already taken are deleted. A provider running past the deadline is killed and the
// result is kTimeout (phase "snapshot").
Result<std::unique_ptr<Snapshot>> TakeSnapshot(const std::vector<std::string>& disks,
                                               const SnapshotOptions& options,
                                               std::chrono::steady_clock::time_point deadline);

// Makes `target` a reflink copy of `source` (FICLONE). `target` must not exist. Fails with
// kInvalidArgument ("... not supported") when the filesystem cannot share extents or the two
// are on different filesystems; other failures are kIoError. Never leaves `target` behind.
Status ReflinkCopy(const std::string& source, const std::string& target);

}  // namespace vmsnap::platform

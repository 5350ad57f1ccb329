// Mounting a recovery point: the FUSE image filesystem, loop devices, and read-only mounts of
// every recognised filesystem, recorded in a state file so that everything can be undone even
// after the mounting process died.
//
// Layout under MOUNTPOINT (an empty or new directory):
//   MOUNTPOINT/images/disk<N>.img   the disk images (FUSE, see image_fs.hpp), stats.json
//   MOUNTPOINT/disk<N>/part<M>      partition M of disk N (M as in the partition table)
//   MOUNTPOINT/disk<N>/whole        the whole disk, when it has no partition table
// Each image is attached read-only with partition scanning (`losetup --read-only --partscan`,
// then `partx --add` if the kernel itself found no partitions);
// each partition is probed with `blkid -p` and mounted read-only, nosuid, nodev: ext2/3/4
// (noload), xfs (norecovery,nouuid), btrfs (rescue=nologreplay), vfat, ntfs (kernel ntfs3).
// A partition that holds nothing recognised, or fails to mount, is reported, not fatal.
//
// State file: STATE_DIR/<first 16 hex of SHA-256(MOUNTPOINT)>.json, written atomically before
// each step that creates something (dirs, FUSE mount, each mount) and right after each loop
// attach. Teardown only ever touches what is recorded there and lies under MOUNTPOINT; loop
// devices are detached only if their backing file is one of MOUNTPOINT/images/*.
//
// Needs root. Threads: a MountSession is used from one thread; the FUSE workers run inside.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "agent/mount/image_source.hpp"
#include "common/status.hpp"

namespace vmsnap::mount {

inline constexpr const char* kDefaultStateDir = "/run/vmsnap/mounts";

struct MountOptions {
  ImageOptions images;
  std::string mountpoint;
  std::string state_dir = kDefaultStateDir;
};

struct FilesystemReport {
  std::string name;    // "part1", "whole"
  std::string device;  // "/dev/loop3p1"
  std::string type;    // blkid TYPE, "" if none
  std::string path;    // where it is mounted, "" if not
  std::string note;    // why it is not mounted
  nlohmann::json ToJson() const;
};

struct DiskReport {
  uint32_t index = 0;
  std::string source;
  uint64_t size_bytes = 0;
  std::string image;
  std::string loop_device;
  std::vector<FilesystemReport> filesystems;
  nlohmann::json ToJson() const;
};

struct MountReport {
  std::string mountpoint;
  std::string recovery_point;
  std::string consistency;
  std::string state_file;
  std::vector<DiskReport> disks;
  nlohmann::json ToJson() const;
};

class MountSession {
 public:
  // Opens the recovery point, mounts the images, attaches and mounts every filesystem. On any
  // fatal error everything done so far is undone before returning.
  static Result<std::unique_ptr<MountSession>> Start(const MountOptions& options);
  // Tears down (see Teardown) and logs a failure.
  ~MountSession();
  MountSession(const MountSession&) = delete;
  MountSession& operator=(const MountSession&) = delete;

  // Unmounts filesystems, detaches loop devices, unmounts the images, removes the directories
  // it created and the state file. Idempotent; continues past errors and returns the first.
  Status Teardown();

  const MountReport& report() const { return report_; }
  RecoveryPointImages& images() { return *images_; }

  class State;

 private:
  MountSession();
  Status Setup(const MountOptions& options);

  std::unique_ptr<RecoveryPointImages> images_;
  std::unique_ptr<class ImageFilesystem> fs_;
  std::unique_ptr<State> state_;
  MountReport report_;
  bool torn_down_ = false;
};

struct UnmountReport {
  std::string mountpoint;
  bool stopped_process = false;  // a live mount process was asked to stop (SIGTERM)
  int pid = 0;
  std::vector<std::string> unmounted;
  std::vector<std::string> detached;
  nlohmann::json ToJson() const;
};

// `vmsnap umount`: undoes the mount recorded for `mountpoint` in `state_dir`. A live mount
// process is sent SIGTERM and given `wait_seconds` to tear down itself; a dead one (crash,
// kill -9) is cleaned up from its state file. kNotFound if nothing is recorded.
Result<UnmountReport> UnmountRecorded(const std::string& mountpoint, const std::string& state_dir,
                                      int wait_seconds = 60);

}  // namespace vmsnap::mount

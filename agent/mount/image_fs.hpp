// A read-only FUSE filesystem (libfuse3) that exposes the disks of a recovery point as files:
//
//   DIR/disk<N>.img   one per disk, N = the disk's index in the recovery point, of the disk's
//                     size; reads go to RecoveryPointImages::Read (lazy, verified, cached)
//   DIR/stats.json    RecoveryPointImages::StatsJson(), generated at each open
//
// A failed read (vault unreachable, corrupt block) answers EIO; RecoveryPointImages logs why.
//
// Ownership: the ImageFilesystem borrows `images`, which must outlive it. The destructor
// unmounts (Unmount()). Threads: requests are served by libfuse's worker threads, started by
// Mount() and joined by Unmount(). Needs root (the unmount aborts the FUSE connection with
// MNT_FORCE so that no request can stay blocked).
#pragma once

#include <memory>
#include <string>

#include "agent/mount/image_source.hpp"
#include "common/status.hpp"

namespace vmsnap::mount {

class ImageFilesystem {
 public:
  // Mounts at `dir` (an existing empty directory) and starts serving.
  static Result<std::unique_ptr<ImageFilesystem>> Mount(RecoveryPointImages& images,
                                                        const std::string& dir);
  ~ImageFilesystem();
  ImageFilesystem(const ImageFilesystem&) = delete;
  ImageFilesystem& operator=(const ImageFilesystem&) = delete;

  // Unmounts and joins the worker threads. Idempotent.
  Status Unmount();

  const std::string& dir() const;
  // File name of the disk at position `disk_pos` of images.disks(), e.g. "disk0.img".
  static std::string ImageName(uint32_t disk_index);

 private:
  class Impl;
  explicit ImageFilesystem(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace vmsnap::mount

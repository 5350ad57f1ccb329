// A whole physical disk read through its volumes' VSS shadow copies (issue 8).
//
// On Windows a disk (\\.\PhysicalDriveN) is backed up as one image, composed of:
//  - every volume VSS snapshotted (NTFS/ReFS, platform::VolumesOnDisk), read from its shadow
//    copy device at the volume-relative offset: point in time;
//  - every other byte, read from the disk itself: live. That is the partition tables (MBR or
//    protective MBR, GPT header and entries at the start, the GPT backup at the end), the gaps
//    between partitions, and the partitions without a snapshotted volume (the FAT32 EFI system
//    partition, the MSR, FAT/exFAT data partitions).
// A restore of the disk thus has the volumes as they were at the snapshot and a layout that
// boots. Platform-neutral: it only composes platform::DiskReader objects.
//
// Contract:
//  - Ownership: the reader owns the disk's reader and every shadow reader; they are closed with
//    it. Destroy it before the shadow copies are deleted (ConsistentView::Cleanup()).
//  - Threads: immutable after Create(); ReadAt and NextData may be called from several threads
//    at once (the backup's workers do), as the underlying readers allow.
//  - Reads: ReadAt splits a request at the volumes' boundaries and reads each piece from where
//    it lives; bytes past the end of the disk read as zero. Pieces start and end at partition
//    boundaries (sector multiples), so raw device reads stay sector-aligned when requests are.
//    A failed piece fails the whole request (buffer content then undefined) with the
//    underlying Status, its cause prefixed with the volume and device it came from.
//  - NextData composes the underlying readers' answers (devices: everything is data).
//  - Identity and is_block_device are the disk's.
//  - Create refuses (no reader built, the readers given are closed):
//    platform::CheckDiskVolumeLayout failures (a spanned/striped/mirrored volume, extents out
//    of the disk or overlapping, kInvalidArgument, phase "vss volumes"); a missing reader
//    (kInternal); a shadow copy smaller than its volume's extent (kConflict: its end would read
//    as zeros); a BitLocker-encrypted partition (the disk shows "-FVE-FS-" where the shadow
//    copy shows the decrypted file system, which would not match the encrypted partition in a
//    restore; kInvalidArgument, fix: back up the volume itself).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/status.hpp"
#include "platform/env.hpp"
#include "platform/vss.hpp"

namespace vmsnap::agent {

// One snapshotted volume of the disk.
struct ShadowedVolume {
  platform::VssDiskVolume layout;  // the volume's name and its (single) extent on the disk
  std::string device_path;         // its shadow copy device, for errors and evidence
  std::unique_ptr<platform::DiskReader> shadow;  // device_path opened for reading
};

class ComposedDiskReader final : public platform::DiskReader {
 public:
  // A range of the disk and where it is read from: volume >= 0 is an index into volumes()
  // (its shadow copy), -1 the disk itself (live).
  struct Piece {
    uint64_t begin = 0;
    uint64_t end = 0;
    int volume = -1;
  };

  // `disk`: the physical drive opened for reading (size and identity of the whole). `volumes`:
  // in any order; may be empty (then everything is read live).
  static Result<std::unique_ptr<ComposedDiskReader>> Create(
      std::unique_ptr<platform::DiskReader> disk, std::vector<ShadowedVolume> volumes);

  const std::string& path() const override { return disk_->path(); }
  uint64_t size() const override { return size_; }
  bool is_block_device() const override { return disk_->is_block_device(); }
  Status ReadAt(uint64_t offset, std::span<std::byte> buf) override;
  Result<std::optional<platform::ByteRange>> NextData(uint64_t offset) override;
  Result<platform::FileIdentity> Identity() override { return disk_->Identity(); }

  // The disk cut into pieces, in disk order, covering [0, size()) without gaps.
  const std::vector<Piece>& pieces() const { return pieces_; }
  // The volumes, sorted by their extent on the disk (the order pieces() refers to).
  const std::vector<ShadowedVolume>& volumes() const { return volumes_; }
  // The ranges read from the disk itself (not point in time), and their total size.
  std::vector<platform::ByteRange> LiveRanges() const;
  uint64_t live_bytes() const;

 private:
  ComposedDiskReader() = default;
  // The first piece whose end is after `offset` (pieces_.end() when none).
  std::vector<Piece>::const_iterator PieceAt(uint64_t offset) const;
  Status Annotate(const Piece& piece, Status st) const;

  std::unique_ptr<platform::DiskReader> disk_;
  std::vector<ShadowedVolume> volumes_;
  std::vector<Piece> pieces_;
  uint64_t size_ = 0;
};

}  // namespace vmsnap::agent

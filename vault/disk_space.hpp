// The vault's reserve of free disk space: uploads stop before the disk is full.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>

#include "common/status.hpp"

namespace vmsnap::vault {

// Backup data (sessions, blocks, manifests) is refused while the filesystem holding the data
// directory would have less than the reserve available after the request: what is left is for
// what a vault must still do when backups no longer fit (commit points whose blocks it has,
// write its index, expire points and compact packs, restart, serve restores).
//
// "Available" is statvfs's f_bavail: the space unprivileged users may take (ext4 keeps a
// further 5 % for root by default), less the bytes of admitted requests still in flight, so
// that uploads arriving together cannot all pass the check and overshoot the reserve.
// Thread-safe: every call asks the kernel; freed space counts at once.
class DiskSpaceReserve {
 public:
  static constexpr uint64_t kDefault = UINT64_MAX;  // 1 % of the filesystem, at most 1 GiB

  // `dir`: the vault's data directory. `reserve_bytes`: kDefault, 0 (no reserve) or bytes.
  DiskSpaceReserve(std::string dir, uint64_t reserve_bytes);

  // Holds an admitted request's bytes as in flight until it is destroyed (after the request
  // has written them, or failed). Move-only.
  class Ticket {
   public:
    Ticket() = default;
    Ticket(Ticket&& other) noexcept;
    Ticket& operator=(Ticket&& other) noexcept;
    ~Ticket();

   private:
    friend class DiskSpaceReserve;
    Ticket(const DiskSpaceReserve* owner, uint64_t bytes) : owner_(owner), bytes_(bytes) {}
    const DiskSpaceReserve* owner_ = nullptr;
    uint64_t bytes_ = 0;
  };

  // A ticket when `incoming_bytes` more leave the reserve free. Otherwise kResourceExhausted
  // naming the directory, the space available, the reserve and the fix. When the filesystem
  // cannot be asked (statvfs fails) the request is admitted: its own write reports the error.
  Result<Ticket> Admit(uint64_t incoming_bytes) const;

  // The reserve in bytes now (the default depends on the filesystem's size); 0 if unknown.
  uint64_t ReserveBytes() const;

  // For the storage report: available bytes (as Admit counts them), the reserve, and the
  // room left above it for backup data (0: every upload is refused).
  struct Report {
    uint64_t available_bytes = 0;
    uint64_t reserve_bytes = 0;
    uint64_t headroom_bytes = 0;
  };
  Report Now() const;

 private:
  std::string dir_;
  uint64_t reserve_bytes_;
  mutable std::atomic<uint64_t> in_flight_{0};
};

// Space set aside in a file of the data directory (DATA/emergency-space, fully allocated) for the
// moment another writer has taken the disk's last free block. The reserve above cannot help
// then, and every administrator's way to free space (expire a point, run a cleanup) writes
// metadata first. An administrator's request that fails for lack of space makes the API
// delete this file and run the request once more (VaultApi); the space is set aside again at
// the next start or after a `vmsnap cleanup --now` (not the scheduled cleanups), when the disk has
// room for it above the reserve.
//
// Its size: the reserve, at most kMaxBytes; none when the reserve is 0. Thread-safe.
class EmergencySpace {
 public:
  static constexpr uint64_t kMaxBytes = 32u << 20;
  static constexpr const char* kFileName = "emergency-space";

  // `reserve`: not owned, must outlive this object.
  EmergencySpace(std::string dir, const DiskSpaceReserve* reserve);

  // Creates the file if it is missing and `available - size >= reserve`. A failed attempt
  // leaves no file behind (it is written under a temporary name and renamed). Returns the
  // bytes set aside afterwards; errors are logged, never fatal.
  uint64_t Ensure();

  // Deletes the file, giving its space back to the filesystem. Returns the bytes released (0
  // if none were set aside).
  uint64_t Release();

  uint64_t held_bytes() const;
  std::string path() const { return dir_ + "/" + kFileName; }

 private:
  std::string dir_;
  const DiskSpaceReserve* reserve_;
  mutable std::mutex mu_;
};

}  // namespace vmsnap::vault

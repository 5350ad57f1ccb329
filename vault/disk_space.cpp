#include "vault/disk_space.hpp"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include "common/cli_output.hpp"
#include "platform/linux/fd.hpp"

namespace vmsnap::vault {
namespace {

// The configured reserve, or the default for the filesystem `st` describes.
uint64_t ReserveOn(const struct statvfs& st, uint64_t configured) {
  if (configured != DiskSpaceReserve::kDefault) return configured;
  const uint64_t size = static_cast<uint64_t>(st.f_blocks) * st.f_frsize;
  return std::min<uint64_t>(size / 100, uint64_t{1} << 30);
}

}  // namespace

DiskSpaceReserve::DiskSpaceReserve(std::string dir, uint64_t reserve_bytes)
    : dir_(std::move(dir)), reserve_bytes_(reserve_bytes) {}

uint64_t DiskSpaceReserve::ReserveBytes() const {
  if (reserve_bytes_ != kDefault) return reserve_bytes_;
  struct statvfs st {};
  return ::statvfs(dir_.c_str(), &st) == 0 ? ReserveOn(st, reserve_bytes_) : 0;
}

DiskSpaceReserve::Ticket::Ticket(Ticket&& other) noexcept
    : owner_(std::exchange(other.owner_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DiskSpaceReserve::Ticket& DiskSpaceReserve::Ticket::operator=(Ticket&& other) noexcept {
  if (this != &other) {
    if (owner_) owner_->in_flight_ -= bytes_;
    owner_ = std::exchange(other.owner_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

DiskSpaceReserve::Ticket::~Ticket() {
  if (owner_) owner_->in_flight_ -= bytes_;
}

DiskSpaceReserve::Report DiskSpaceReserve::Now() const {
  Report r;
  struct statvfs st {};
  if (::statvfs(dir_.c_str(), &st) != 0) return r;  // unknown: all zero
  r.reserve_bytes = ReserveOn(st, reserve_bytes_);
  const uint64_t free = static_cast<uint64_t>(st.f_bavail) * st.f_frsize;
  const uint64_t others = in_flight_.load();
  r.available_bytes = free > others ? free - others : 0;
  r.headroom_bytes = r.available_bytes > r.reserve_bytes ? r.available_bytes - r.reserve_bytes : 0;
  return r;
}

Result<DiskSpaceReserve::Ticket> DiskSpaceReserve::Admit(uint64_t incoming_bytes) const {
  if (reserve_bytes_ == 0) return Ticket();
  struct statvfs st {};
  if (::statvfs(dir_.c_str(), &st) != 0) return Ticket();
  const uint64_t free = static_cast<uint64_t>(st.f_bavail) * st.f_frsize;
  const uint64_t reserve = ReserveOn(st, reserve_bytes_);  // one statvfs per request
  // Taken first, so that two requests checking together both count each other.
  const uint64_t others = in_flight_.fetch_add(incoming_bytes);
  Ticket ticket(this, incoming_bytes);
  const uint64_t available = free > others ? free - others : 0;
  if (available >= reserve && available - reserve >= incoming_bytes) return ticket;
  return Status::Error(
      Code::kResourceExhausted,
      "the vault's disk under " + dir_ + " has " + HumanBytes(available) +
          " available, and its reserve (--min-free-space) is " + HumanBytes(reserve) +
          (incoming_bytes ? " (this request brings " + HumanBytes(incoming_bytes) + ")" : "") +
          ": it takes no more backup data until space is freed",
      "free space on the vault's disk: expire recovery points and run 'vmsnap cleanup --now', "
      "or give the vault a larger disk, then run the backup again (blocks already stored are "
      "not sent again); restores and cleanups work meanwhile");
}

EmergencySpace::EmergencySpace(std::string dir, const DiskSpaceReserve* reserve)
    : dir_(std::move(dir)), reserve_(reserve) {}

uint64_t EmergencySpace::held_bytes() const {
  struct stat st {};
  if (::stat(path().c_str(), &st) != 0) return 0;
  // Counted only when its blocks are really allocated: a sparse file would give back nothing.
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  return static_cast<uint64_t>(st.st_blocks) * 512 >= size ? size : 0;
}

uint64_t EmergencySpace::Ensure() {
  std::lock_guard lock(mu_);
  if (const uint64_t held = held_bytes(); held > 0) return held;
  const auto disk = reserve_->Now();  // one statvfs: the reserve and the space available
  const uint64_t size = std::min(disk.reserve_bytes, kMaxBytes);
  if (size == 0) return 0;
  if (disk.available_bytes < size || disk.available_bytes - size < disk.reserve_bytes) {
    spdlog::warn(
        "no room to set aside {} of emergency space in {}: {} available, reserve {} (it is set "
        "aside at the next start or 'vmsnap cleanup --now' that finds room)",
        HumanBytes(size), path(), HumanBytes(disk.available_bytes), HumanBytes(disk.reserve_bytes));
    return 0;
  }
  const std::string tmp = path() + ".tmp";
  int err = 0;
  {
    platform::Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (!fd.valid()) err = errno;
    // posix_fallocate allocates every block (glibc writes them where the filesystem has no
    // fallocate), so the space is really taken, unlike a sparse file's.
    if (err == 0) err = ::posix_fallocate(fd.get(), 0, static_cast<off_t>(size));
    if (err == 0 && ::fsync(fd.get()) != 0) err = errno;
  }
  if (err == 0 && ::rename(tmp.c_str(), path().c_str()) != 0) err = errno;
  if (err != 0) {
    ::unlink(tmp.c_str());
    spdlog::warn("cannot set aside {} of emergency space in {}: {}", HumanBytes(size), path(),
                 std::strerror(err));
    return 0;
  }
  spdlog::info(
      "set aside {} of emergency space in {} (given back when the disk is full, so that "
      "points can still be expired and cleaned up)",
      HumanBytes(size), path());
  return size;
}

uint64_t EmergencySpace::Release() {
  std::lock_guard lock(mu_);
  const uint64_t held = held_bytes();
  if (held == 0) return 0;
  if (::unlink(path().c_str()) != 0) {
    spdlog::error("cannot delete the emergency space file {}: {}", path(), std::strerror(errno));
    return 0;
  }
  return held;
}

}  // namespace vmsnap::vault

#include "agent/composed_disk_reader.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

namespace vmsnap::agent {

namespace {

// BitLocker's boot sector carries this OEM id (bytes 3..10) on the disk; the unlocked volume,
// and so its shadow copy, shows the decrypted file system instead.
constexpr char kBitLockerSignature[] = "-FVE-FS-";
// Read at the start of a partition: a whole sector on 512-byte and 4 KiB-sector disks alike.
constexpr size_t kBootSectorRead = 4096;

bool HasBitLockerSignature(std::span<const std::byte> sector) {
  return sector.size() >= 11 &&
         std::memcmp(sector.data() + 3, kBitLockerSignature, sizeof kBitLockerSignature - 1) == 0;
}

}  // namespace

Result<std::unique_ptr<ComposedDiskReader>> ComposedDiskReader::Create(
    std::unique_ptr<platform::DiskReader> disk, std::vector<ShadowedVolume> volumes) {
  if (!disk) return Status::Internal("composed disk reader without a disk reader");
  const std::string& path = disk->path();
  const uint64_t size = disk->size();
  std::vector<platform::VssDiskVolume> layouts;
  for (const auto& v : volumes) layouts.push_back(v.layout);
  VMSNAP_RETURN_IF_ERROR(platform::CheckDiskVolumeLayout(path, layouts, size));
  std::sort(volumes.begin(), volumes.end(), [](const ShadowedVolume& a, const ShadowedVolume& b) {
    return a.layout.extents.front().disk_offset < b.layout.extents.front().disk_offset;
  });

  for (auto& v : volumes) {
    const auto& e = v.layout.extents.front();
    if (!v.shadow)
      return Status::Internal("composed disk reader: no reader for the shadow copy " +
                              v.device_path + " of volume " + v.layout.volume);
    if (v.shadow->size() < e.length)
      return Status::Error(Code::kConflict,
                           "the shadow copy " + v.device_path + " of volume " + v.layout.volume +
                               " holds " + std::to_string(v.shadow->size()) +
                               " bytes, fewer than the volume's " + std::to_string(e.length) +
                               " bytes on " + path,
                           "the volume was resized during the backup: run the backup again, or "
                           "back up the volume " +
                               v.layout.volume + " itself")
          .InPhase("open snapshot");
    if (e.length >= kBootSectorRead) {
      std::array<std::byte, kBootSectorRead> live{}, shadow{};
      VMSNAP_RETURN_IF_ERROR(disk->ReadAt(e.disk_offset, live).InPhase("open snapshot"));
      if (HasBitLockerSignature(live)) {
        VMSNAP_RETURN_IF_ERROR(v.shadow->ReadAt(0, shadow).InPhase("open snapshot"));
        if (!HasBitLockerSignature(shadow))
          return Status::InvalidArgument(
                     "volume " + v.layout.volume + " is encrypted with BitLocker on " + path +
                         ": its shadow copy holds the decrypted file system, which does not "
                         "fit into the encrypted partition of a whole-disk image",
                     "back up the volume " + v.layout.volume + " itself (--disk " +
                         v.layout.volume + ") instead of the physical drive " + path)
              .InPhase("open snapshot");
      }
    }
  }

  std::unique_ptr<ComposedDiskReader> r(new ComposedDiskReader());
  r->size_ = size;
  uint64_t pos = 0;
  for (size_t i = 0; i < volumes.size(); ++i) {
    const auto& e = volumes[i].layout.extents.front();
    if (e.disk_offset > pos) r->pieces_.push_back({pos, e.disk_offset, -1});
    r->pieces_.push_back({e.disk_offset, e.disk_offset + e.length, static_cast<int>(i)});
    pos = e.disk_offset + e.length;
  }
  if (pos < size) r->pieces_.push_back({pos, size, -1});
  r->disk_ = std::move(disk);
  r->volumes_ = std::move(volumes);
  return r;
}

std::vector<ComposedDiskReader::Piece>::const_iterator ComposedDiskReader::PieceAt(
    uint64_t offset) const {
  return std::upper_bound(pieces_.begin(), pieces_.end(), offset,
                          [](uint64_t off, const Piece& p) { return off < p.end; });
}

Status ComposedDiskReader::Annotate(const Piece& piece, Status st) const {
  if (st.ok() || piece.volume < 0) return st;
  const ShadowedVolume& v = volumes_[static_cast<size_t>(piece.volume)];
  return Status::Error(st.code(),
                       "volume " + v.layout.volume + " of " + disk_->path() +
                           " from its shadow copy " + v.device_path + ": " + st.cause(),
                       st.fix().empty() ? "VSS may have deleted the shadow copy (its shadow "
                                          "storage was full): enlarge it (vssadmin resize "
                                          "shadowstorage) and run the backup again"
                                        : st.fix())
      .InPhase(st.phase());
}

Status ComposedDiskReader::ReadAt(uint64_t offset, std::span<std::byte> buf) {
  const uint64_t end =
      offset >= size_ ? offset : offset + std::min<uint64_t>(buf.size(), size_ - offset);
  uint64_t pos = offset;
  for (auto p = PieceAt(pos); pos < end && p != pieces_.end(); ++p) {
    const uint64_t n = std::min(end, p->end) - pos;
    std::span<std::byte> part = buf.subspan(pos - offset, n);
    Status st = p->volume < 0
                    ? disk_->ReadAt(pos, part)
                    : volumes_[static_cast<size_t>(p->volume)].shadow->ReadAt(pos - p->begin, part);
    if (!st.ok()) return Annotate(*p, std::move(st));
    pos += n;
  }
  const size_t filled = static_cast<size_t>(end - offset);
  if (filled < buf.size()) std::memset(buf.data() + filled, 0, buf.size() - filled);
  return Status::Ok();
}

Result<std::optional<platform::ByteRange>> ComposedDiskReader::NextData(uint64_t offset) {
  using Range = std::optional<platform::ByteRange>;
  for (auto p = PieceAt(offset); p != pieces_.end(); ++p) {
    const uint64_t start = std::max(offset, p->begin);
    // The source's coordinates: the disk's for live pieces, the volume's for shadow pieces.
    const uint64_t base = p->volume < 0 ? 0 : p->begin;
    platform::DiskReader& src =
        p->volume < 0 ? *disk_ : *volumes_[static_cast<size_t>(p->volume)].shadow;
    auto r = src.NextData(start - base);
    if (!r.ok()) return Annotate(*p, r.take_status());
    if (!*r) continue;  // only holes follow in this source: try the next piece
    const uint64_t b = (*r)->begin + base, e = std::min((*r)->end + base, p->end);
    if (b >= p->end) continue;  // its next data is beyond this piece
    return Range(platform::ByteRange{std::max(b, start), e});
  }
  return Range();
}

std::vector<platform::ByteRange> ComposedDiskReader::LiveRanges() const {
  std::vector<platform::ByteRange> out;
  for (const auto& p : pieces_)
    if (p.volume < 0) out.push_back({p.begin, p.end});
  return out;
}

uint64_t ComposedDiskReader::live_bytes() const {
  uint64_t n = 0;
  for (const auto& p : pieces_)
    if (p.volume < 0) n += p.end - p.begin;
  return n;
}

}  // namespace vmsnap::agent

#include "common/manifest.hpp"

#include "common/bytes.hpp"

namespace vmsnap {
namespace {
constexpr std::string_view kMagic = "VMSNAPM1";
constexpr uint8_t kZeroEntry = 0;
constexpr uint8_t kDataEntry = 1;
}  // namespace

std::string EncodeManifest(const Manifest& m) {
  ByteWriter w;
  w.str().reserve(64 + m.parent.size() + m.entries.size() * 41);
  w.bytes(kMagic);
  w.u64(m.disk_size);
  w.u32(m.block_size);
  w.u16(static_cast<uint16_t>(m.parent.size()));
  w.bytes(m.parent);
  w.u64(m.entries.size());
  for (const auto& e : m.entries) {
    w.u64(e.index);
    if (e.id) {
      w.u8(kDataEntry);
      w.bytes(e.id->bytes.data(), 32);
    } else {
      w.u8(kZeroEntry);
    }
  }
  BlockId sum = Sha256Block(std::as_bytes(std::span(w.str().data(), w.str().size())));
  w.bytes(sum.bytes.data(), 32);
  return w.take();
}

Result<Manifest> DecodeManifest(std::string_view data) {
  auto bad = [](const std::string& why) {
    return Status::Corruption("manifest is invalid: " + why,
                              "if the vault sent it, its copy is damaged: restore another "
                              "recovery point; if the agent sent it, rerun the backup");
  };
  if (data.size() < kMagic.size() + 32) return bad("too short");
  std::string_view body = data.substr(0, data.size() - 32);
  BlockId sum = Sha256Block(std::as_bytes(std::span(body.data(), body.size())));
  if (std::memcmp(sum.bytes.data(), data.data() + body.size(), 32) != 0)
    return bad("checksum mismatch");
  ByteReader r(body);
  std::string_view magic, parent;
  Manifest m;
  uint16_t parent_len = 0;
  uint64_t count = 0;
  if (!r.view(kMagic.size(), magic) || magic != kMagic) return bad("bad magic");
  if (!r.u64(m.disk_size) || !r.u32(m.block_size) || !r.u16(parent_len) ||
      !r.view(parent_len, parent) || !r.u64(count))
    return bad("truncated header");
  if (!ValidateBlockSize(m.block_size).ok()) return bad("bad block size");
  m.parent.assign(parent);
  if (count > r.remaining() / 9) return bad("entry count too large");
  m.entries.reserve(count);
  const uint64_t blocks = m.block_count();
  for (uint64_t i = 0; i < count; ++i) {
    ManifestEntry e;
    uint8_t kind = 0;
    if (!r.u64(e.index) || !r.u8(kind)) return bad("truncated entry");
    if (kind == kDataEntry) {
      BlockId id;
      if (!r.bytes(id.bytes.data(), 32)) return bad("truncated entry");
      e.id = id;
    } else if (kind != kZeroEntry || m.is_full()) {
      return bad("bad entry kind");
    }
    if (e.index >= blocks) return bad("block index out of range");
    if (!m.entries.empty() && e.index <= m.entries.back().index) return bad("entries unsorted");
    m.entries.push_back(e);
  }
  if (r.remaining() != 0) return bad("trailing bytes");
  return m;
}

Result<Manifest> ApplyDelta(const Manifest& base, const Manifest& delta) {
  if (base.disk_size != delta.disk_size || base.block_size != delta.block_size)
    return Status::InvalidArgument("incremental manifest geometry differs from its parent");
  Manifest out;
  out.disk_size = base.disk_size;
  out.block_size = base.block_size;
  out.entries.reserve(base.entries.size() + delta.entries.size());
  size_t i = 0, j = 0;
  while (i < base.entries.size() || j < delta.entries.size()) {
    bool take_delta = j < delta.entries.size() &&
                      (i >= base.entries.size() || delta.entries[j].index <= base.entries[i].index);
    if (take_delta) {
      if (i < base.entries.size() && base.entries[i].index == delta.entries[j].index) ++i;
      if (delta.entries[j].id) out.entries.push_back(delta.entries[j]);
      ++j;
    } else {
      out.entries.push_back(base.entries[i++]);
    }
  }
  return out;
}

}  // namespace vmsnap

#include "common/manifest.hpp"

#include <cstring>
#include <utility>

#include "common/bytes.hpp"

namespace vmsnap {
namespace {
constexpr std::string_view kMagic = "VMSNAPM1";
constexpr uint8_t kZeroEntry = 0;
constexpr uint8_t kDataEntry = 1;
}  // namespace

ManifestEncoder::ManifestEncoder(uint64_t disk_size, uint32_t block_size, std::string_view parent,
                                 uint64_t entry_count)
    : sum_(std::make_unique<Sha256Stream>()), expected_(entry_count) {
  ByteWriter w;
  w.bytes(kMagic);
  w.u64(disk_size);
  w.u32(block_size);
  w.u16(static_cast<uint16_t>(parent.size()));
  w.bytes(parent);
  w.u64(entry_count);
  out_ = w.take();
}

ManifestEncoder::~ManifestEncoder() = default;

void ManifestEncoder::Add(const ManifestEntry& e) {
  char entry[41];
  for (int i = 0; i < 8; ++i) entry[i] = static_cast<char>((e.index >> (8 * i)) & 0xff);
  entry[8] = static_cast<char>(e.id ? kDataEntry : kZeroEntry);
  if (e.id) std::memcpy(entry + 9, e.id->bytes.data(), 32);
  out_.append(entry, e.id ? 41 : 9);
  ++added_;
}

std::string ManifestEncoder::Take() {
  sum_->Update(out_);
  return std::exchange(out_, std::string());
}

Result<std::string> ManifestEncoder::Finish() {
  if (added_ != expected_)
    return Status::Internal("manifest encoder: " + std::to_string(added_) + " entries added, " +
                            std::to_string(expected_) + " announced");
  std::string rest = Take();
  BlockId sum = sum_->Finish();
  rest.append(reinterpret_cast<const char*>(sum.bytes.data()), 32);
  return rest;
}

std::string EncodeManifest(const Manifest& m) {
  ManifestEncoder enc(m.disk_size, m.block_size, m.parent, m.entries.size());
  for (const auto& e : m.entries) enc.Add(e);
  std::string out = enc.Take();
  out += *enc.Finish();  // the count matches by construction
  return out;
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

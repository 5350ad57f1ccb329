#include "common/manifest.hpp"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <utility>

#include "common/bytes.hpp"

namespace vmsnap {
namespace {
constexpr std::string_view kMagic = "VMSNAPM1";
constexpr uint8_t kZeroEntry = 0;
constexpr uint8_t kDataEntry = 1;
constexpr uint8_t kCheckedDataEntry = 2;  // id, then the XXH3-128 of the plaintext
constexpr size_t kMaxEntrySize = kMaxManifestEntrySize;
}  // namespace

size_t EncodeManifestEntry(const ManifestEntry& e, char* out) {
  StoreLe64(out, e.index);
  if (!e.id) {
    out[8] = static_cast<char>(kZeroEntry);
    return 9;
  }
  out[8] = static_cast<char>(e.check ? kCheckedDataEntry : kDataEntry);
  std::memcpy(out + 9, e.id->bytes.data(), 32);
  if (!e.check) return 41;
  StoreLe64(out + 41, e.check->low);
  StoreLe64(out + 49, e.check->high);
  return 57;
}

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
  char entry[kMaxEntrySize];
  out_.append(entry, EncodeManifestEntry(e, entry));
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

namespace {
Status BadManifest(const std::string& why) {
  return Status::Corruption("manifest is invalid: " + why,
                            "if the vault sent it, its copy is damaged: restore another "
                            "recovery point; if the agent sent it, rerun the backup");
}
constexpr size_t kChecksumSize = 32;
constexpr size_t kReadChunk = 1 << 20;
}  // namespace

ManifestReader::ManifestReader(Source source, uint64_t total_size, bool verify_checksum)
    : source_(std::move(source)),
      total_(total_size),
      body_size_(total_size - kChecksumSize),
      sum_(verify_checksum ? std::make_unique<Sha256Stream>() : nullptr) {}

ManifestReader::~ManifestReader() = default;

Result<std::unique_ptr<ManifestReader>> ManifestReader::Open(Source source, uint64_t total_size,
                                                             bool verify_checksum) {
  if (total_size < kMagic.size() + kChecksumSize) return BadManifest("too short");
  std::unique_ptr<ManifestReader> r(
      new ManifestReader(std::move(source), total_size, verify_checksum));
  VMSNAP_RETURN_IF_ERROR(r->ReadHeader());
  return r;
}

Result<std::unique_ptr<ManifestReader>> ManifestReader::OpenFile(const std::string& path,
                                                                 bool verify_checksum, Tee tee) {
  std::error_code ec;
  const uint64_t size = std::filesystem::file_size(path, ec);
  if (ec) {
    if (ec == std::errc::no_such_file_or_directory)
      return Status::NotFound(path + " does not exist");
    return Status::IoError("size of " + path + ": " + ec.message());
  }
  auto file = std::make_shared<std::ifstream>(path, std::ios::binary);
  if (!*file) return Status::IoError("open " + path);
  return Open(
      [file, path, tee = std::move(tee)](std::span<char> out) -> Result<size_t> {
        file->read(out.data(), static_cast<std::streamsize>(out.size()));
        if (file->bad()) return Status::IoError("read " + path);
        const auto got = static_cast<size_t>(file->gcount());
        if (tee && got > 0) VMSNAP_RETURN_IF_ERROR(tee(std::string_view(out.data(), got)));
        return got;
      },
      size, verify_checksum);
}

Result<bool> ManifestReader::Fill(size_t n) {
  while (buf_.size() - pos_ < n && pulled_ < body_size_) {
    if (pos_ > 0) {  // what is left unparsed is less than one entry or header
      buf_.erase(0, pos_);
      pos_ = 0;
    }
    const size_t want = static_cast<size_t>(std::min<uint64_t>(kReadChunk, total_ - pulled_));
    const size_t old = buf_.size();
    buf_.resize(old + want);
    auto got = source_(std::span(buf_.data() + old, want));
    if (!got.ok()) {
      buf_.resize(old);
      return got.take_status();
    }
    buf_.resize(old + std::min(*got, want));
    if (buf_.size() == old) return false;
    const uint64_t end = pulled_ + (buf_.size() - old);
    if (end > body_size_) {  // the checksum began in this piece
      const size_t extra = static_cast<size_t>(end - body_size_);
      trailer_.append(buf_, buf_.size() - extra, extra);
      buf_.resize(buf_.size() - extra);
    }
    if (sum_) sum_->Update(std::string_view(buf_).substr(old));
    pulled_ = end;
  }
  return true;
}

Status ManifestReader::ReadHeader() {
  constexpr size_t kFixed = kMagic.size() + 8 + 4 + 2;
  auto filled = Fill(kFixed);
  if (!filled.ok()) return filled.take_status();
  ByteReader r(std::string_view(buf_).substr(pos_));
  std::string_view magic, parent;
  uint16_t parent_len = 0;
  if (!*filled || !r.view(kMagic.size(), magic) || magic != kMagic) return BadManifest("bad magic");
  if (!r.u64(header_.disk_size) || !r.u32(header_.block_size) || !r.u16(parent_len))
    return BadManifest("truncated header");
  pos_ += r.position();
  filled = Fill(parent_len + 8);
  if (!filled.ok()) return filled.take_status();
  ByteReader rest(std::string_view(buf_).substr(pos_));
  if (!*filled || !rest.view(parent_len, parent) || !rest.u64(header_.entry_count))
    return BadManifest("truncated header");
  pos_ += rest.position();
  if (!ValidateBlockSize(header_.block_size).ok()) return BadManifest("bad block size");
  header_.parent.assign(parent);
  const uint64_t header_size = kFixed + parent_len + 8;
  if (header_.entry_count > (body_size_ - header_size) / 9)
    return BadManifest("entry count too large");
  return Status::Ok();
}

Status ManifestReader::Next(std::vector<ManifestEntry>& out, size_t max) {
  out.clear();
  if (done_) return Status::Ok();
  if (returned_ == header_.entry_count) {
    VMSNAP_RETURN_IF_ERROR(Finish());
    done_ = true;
    return Status::Ok();
  }
  const uint64_t blocks = header_.block_count();
  const bool full = header_.is_full();
  out.reserve(static_cast<size_t>(std::min<uint64_t>(max, header_.entry_count - returned_)));
  while (out.size() < max && returned_ < header_.entry_count) {
    auto filled = Fill(kMaxEntrySize);
    if (!filled.ok()) return filled.take_status();
    ByteReader r(std::string_view(buf_).substr(pos_));
    ManifestEntry e;
    uint8_t kind = 0;
    if (!*filled || !r.u64(e.index) || !r.u8(kind)) return BadManifest("truncated entry");
    if (kind == kDataEntry || kind == kCheckedDataEntry) {
      BlockId id;
      if (!r.bytes(id.bytes.data(), 32)) return BadManifest("truncated entry");
      e.id = id;
      if (kind == kCheckedDataEntry) {
        FastHash check;
        if (!r.u64(check.low) || !r.u64(check.high)) return BadManifest("truncated entry");
        e.check = check;
      }
    } else if (kind != kZeroEntry || full) {
      return BadManifest("bad entry kind");
    }
    if (e.index >= blocks) return BadManifest("block index out of range");
    if (returned_ > 0 && e.index <= last_index_) return BadManifest("entries unsorted");
    pos_ += r.position();
    last_index_ = e.index;
    ++returned_;
    out.push_back(e);
  }
  return Status::Ok();
}

Status ManifestReader::Finish() {
  if (pos_ != buf_.size() || pulled_ < body_size_) return BadManifest("trailing bytes");
  char extra[kChecksumSize + 1];
  for (;;) {  // the checksum, then the source must end
    auto got = source_(std::span(extra, sizeof extra));
    if (!got.ok()) return got.take_status();
    if (*got == 0) break;
    trailer_.append(extra, std::min(*got, sizeof extra));
    if (trailer_.size() > kChecksumSize) return BadManifest("trailing bytes");
  }
  if (trailer_.size() < kChecksumSize) return BadManifest("truncated checksum");
  if (sum_) {
    const BlockId sum = sum_->Finish();
    if (std::memcmp(sum.bytes.data(), trailer_.data(), kChecksumSize) != 0)
      return BadManifest("checksum mismatch");
  }
  return Status::Ok();
}

Result<Manifest> DecodeManifest(std::string_view data) {
  if (data.size() < kMagic.size() + kChecksumSize) return BadManifest("too short");
  // The checksum first: damage is reported as such, not as whatever it made the entries say.
  std::string_view body = data.substr(0, data.size() - kChecksumSize);
  BlockId sum = Sha256Block(std::as_bytes(std::span(body.data(), body.size())));
  if (std::memcmp(sum.bytes.data(), data.data() + body.size(), kChecksumSize) != 0)
    return BadManifest("checksum mismatch");
  size_t at = 0;
  auto reader = ManifestReader::Open(
      [&](std::span<char> out) -> Result<size_t> {
        const size_t n = std::min(out.size(), data.size() - at);
        std::memcpy(out.data(), data.data() + at, n);
        at += n;
        return n;
      },
      data.size(), /*verify_checksum=*/false);
  if (!reader.ok()) return reader.take_status();
  const ManifestHeader& h = (*reader)->header();
  Manifest m{h.disk_size, h.block_size, h.parent, {}};
  if (h.entry_count > 0)
    VMSNAP_RETURN_IF_ERROR((*reader)->Next(m.entries, static_cast<size_t>(h.entry_count)));
  std::vector<ManifestEntry> end;  // nothing but the checksum may follow the entries
  VMSNAP_RETURN_IF_ERROR((*reader)->Next(end, 1));
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

#include "agent/local_state.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/bytes.hpp"
#include "platform/env.hpp"

namespace vmsnap::agent {

using nlohmann::json;
constexpr std::string_view kMagic = "VMSTATE1";
// Hashes moved per read or write: 1 MiB.
constexpr uint64_t kHashChunk = 64 * 1024;

std::string DiskStatePath(const std::string& state_dir, const std::string& vault_url,
                          const std::string& item, const std::string& disk_key) {
  std::string key = vault_url + "\n" + item + "\n" + disk_key;
  return state_dir + "/disks/" + Sha256Hex(key).substr(0, 32) + ".state";
}

namespace {
// The hashes as stored: (low64, high64) little-endian per block.
void PutHashes(std::span<const FastHash> in, std::string& out) {
  ByteWriter w;
  w.str().reserve(in.size() * 16);
  for (const auto& fh : in) {
    w.u64(fh.low);
    w.u64(fh.high);
  }
  out = w.take();
}
}  // namespace

Status SaveDiskState(const std::string& path, const DiskStateInfo& s, const HashSource& source) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  if (ec)
    return Status::IoError("create state directory for " + path + ": " + ec.message(),
                           "pass a writable --state-dir");
  json header = {{"vault", s.vault_url},     {"item", s.item},
                 {"disk", s.disk_key},       {"recovery_point", s.recovery_point},
                 {"disk_size", s.disk_size}, {"block_size", s.block_size},
                 {"blocks", s.blocks}};
  std::string h = header.dump();
  auto writer = platform::Env::Default()->CreateFileAtomic(path, 0600);
  if (!writer.ok()) return writer.take_status();
  Sha256Stream sum;
  auto append = [&](std::string_view piece) {
    sum.Update(piece);
    return (*writer)->Append(piece);
  };
  ByteWriter w;
  w.bytes(kMagic);
  w.u32(static_cast<uint32_t>(h.size()));
  w.bytes(h);
  VMSNAP_RETURN_IF_ERROR(append(w.str()));
  std::vector<FastHash> chunk(std::min(kHashChunk, s.blocks));
  std::string bytes;
  for (uint64_t first = 0; first < s.blocks; first += kHashChunk) {
    std::span<FastHash> part(chunk.data(), std::min(kHashChunk, s.blocks - first));
    VMSNAP_RETURN_IF_ERROR(source(first, part));
    PutHashes(part, bytes);
    VMSNAP_RETURN_IF_ERROR(append(bytes));
  }
  BlockId checksum = sum.Finish();
  VMSNAP_RETURN_IF_ERROR((*writer)->Append(
      std::string_view(reinterpret_cast<const char*>(checksum.bytes.data()), 32)));
  return (*writer)->Commit();
}

Status SaveDiskState(const std::string& path, const DiskState& state) {
  DiskStateInfo info = state.info;
  info.blocks = state.hashes.size();
  return SaveDiskState(path, info, [&](uint64_t first, std::span<FastHash> out) {
    std::copy_n(state.hashes.begin() + static_cast<long>(first), out.size(), out.begin());
    return Status::Ok();
  });
}

DiskStateReader::~DiskStateReader() = default;

Result<std::unique_ptr<DiskStateReader>> DiskStateReader::Open(const std::string& path) {
  auto file = platform::Env::Default()->OpenDiskForRead(path);
  if (!file.ok()) return file.take_status();
  auto bad = [&](const char* why) {
    return Status::Corruption("agent state " + path + " is unusable: " + why,
                              "nothing to do: the next backup compares with the vault instead");
  };
  const uint64_t size = (*file)->size();
  if (size < kMagic.size() + 4 + 32) return bad("too short");
  // The checksum over everything before it, streamed.
  Sha256Stream sum;
  std::string buf;
  std::string head;
  for (uint64_t off = 0; off < size - 32;) {
    buf.resize(std::min<uint64_t>(1 << 20, size - 32 - off));
    VMSNAP_RETURN_IF_ERROR(
        (*file)->ReadAt(off, std::as_writable_bytes(std::span(buf.data(), buf.size()))));
    if (off == 0) head = buf.substr(0, 1 << 16);
    sum.Update(buf);
    off += buf.size();
  }
  std::array<char, 32> stored{};
  VMSNAP_RETURN_IF_ERROR(
      (*file)->ReadAt(size - 32, std::as_writable_bytes(std::span(stored.data(), 32))));
  if (std::memcmp(sum.Finish().bytes.data(), stored.data(), 32) != 0)
    return bad("checksum mismatch");
  ByteReader r(head);
  std::string_view magic, header_text;
  uint32_t hlen = 0;
  if (!r.view(kMagic.size(), magic) || magic != kMagic || !r.u32(hlen) ||
      !r.view(hlen, header_text))
    return bad("bad header");
  json h = json::parse(header_text, nullptr, false);
  if (!h.is_object()) return bad("bad header");
  std::unique_ptr<DiskStateReader> reader(new DiskStateReader());
  DiskStateInfo& s = reader->info_;
  try {
    s.vault_url = h.at("vault");
    s.item = h.at("item");
    s.disk_key = h.at("disk");
    s.recovery_point = h.at("recovery_point");
    s.disk_size = h.at("disk_size");
    s.block_size = h.at("block_size");
    s.blocks = h.at("blocks");
  } catch (const std::exception&) {
    return bad("bad header fields");
  }
  reader->hashes_offset_ = kMagic.size() + 4 + hlen;
  if (size - 32 - reader->hashes_offset_ != s.blocks * 16) return bad("wrong length");
  reader->file_ = std::move(*file);
  return reader;
}

Status DiskStateReader::ReadHashes(uint64_t first, std::span<FastHash> out) {
  if (first > info_.blocks || out.size() > info_.blocks - first)
    return Status::Internal("hashes of blocks beyond the disk were asked for");
  std::string bytes(out.size() * 16, '\0');
  VMSNAP_RETURN_IF_ERROR(file_->ReadAt(
      hashes_offset_ + first * 16, std::as_writable_bytes(std::span(bytes.data(), bytes.size()))));
  ByteReader r(bytes);
  for (auto& fh : out) {
    r.u64(fh.low);
    r.u64(fh.high);
  }
  return Status::Ok();
}

Result<DiskState> LoadDiskState(const std::string& path) {
  auto reader = DiskStateReader::Open(path);
  if (!reader.ok()) return reader.take_status();
  DiskState s{(*reader)->info(), std::vector<FastHash>((*reader)->info().blocks)};
  VMSNAP_RETURN_IF_ERROR((*reader)->ReadHashes(0, s.hashes));
  return s;
}

}  // namespace vmsnap::agent

#include "agent/local_state.hpp"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/bytes.hpp"
#include "platform/env.hpp"

namespace vmsnap::agent {

using nlohmann::json;
constexpr std::string_view kMagic = "VMSTATE1";

std::string DiskStatePath(const std::string& state_dir, const std::string& vault_url,
                          const std::string& item, const std::string& disk_key) {
  std::string key = vault_url + "\n" + item + "\n" + disk_key;
  return state_dir + "/disks/" + Sha256Hex(key).substr(0, 32) + ".state";
}

Status SaveDiskState(const std::string& path, const DiskState& s) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  if (ec)
    return Status::IoError("create state directory for " + path + ": " + ec.message(),
                           "pass a writable --state-dir");
  json header = {{"vault", s.vault_url},     {"item", s.item},
                 {"disk", s.disk_key},       {"recovery_point", s.recovery_point},
                 {"disk_size", s.disk_size}, {"block_size", s.block_size},
                 {"blocks", s.hashes.size()}};
  std::string h = header.dump();
  ByteWriter w;
  w.str().reserve(64 + h.size() + s.hashes.size() * 16);
  w.bytes(kMagic);
  w.u32(static_cast<uint32_t>(h.size()));
  w.bytes(h);
  for (const auto& fh : s.hashes) {
    w.u64(fh.low);
    w.u64(fh.high);
  }
  BlockId sum = Sha256Block(std::as_bytes(std::span(w.str().data(), w.str().size())));
  w.bytes(sum.bytes.data(), 32);
  return platform::Env::Default()->WriteFileAtomic(path, w.str(), 0600);
}

Result<DiskState> LoadDiskState(const std::string& path) {
  auto data = platform::Env::Default()->ReadFile(path);
  if (!data.ok()) return data.take_status();
  auto bad = [&](const char* why) {
    return Status::Corruption("agent state " + path + " is unusable: " + why,
                              "nothing to do: the next backup compares with the vault instead");
  };
  if (data->size() < kMagic.size() + 4 + 32) return bad("too short");
  std::string_view body(data->data(), data->size() - 32);
  BlockId sum = Sha256Block(std::as_bytes(std::span(body.data(), body.size())));
  if (std::memcmp(sum.bytes.data(), data->data() + body.size(), 32) != 0)
    return bad("checksum mismatch");
  ByteReader r(body);
  std::string_view magic, header_text;
  uint32_t hlen = 0;
  if (!r.view(kMagic.size(), magic) || magic != kMagic || !r.u32(hlen) ||
      !r.view(hlen, header_text))
    return bad("bad header");
  json h = json::parse(header_text, nullptr, false);
  if (!h.is_object()) return bad("bad header");
  DiskState s;
  try {
    s.vault_url = h.at("vault");
    s.item = h.at("item");
    s.disk_key = h.at("disk");
    s.recovery_point = h.at("recovery_point");
    s.disk_size = h.at("disk_size");
    s.block_size = h.at("block_size");
    uint64_t blocks = h.at("blocks");
    if (r.remaining() != blocks * 16) return bad("wrong length");
    s.hashes.resize(blocks);
    for (auto& fh : s.hashes) {
      r.u64(fh.low);
      r.u64(fh.high);
    }
  } catch (const std::exception&) {
    return bad("bad header fields");
  }
  return s;
}

}  // namespace vmsnap::agent

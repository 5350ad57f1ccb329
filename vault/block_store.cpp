#include "vault/block_store.hpp"

#include <filesystem>
#include <random>

#include "platform/env.hpp"

namespace vmsnap::vault {

namespace fs = std::filesystem;

BlockStore::BlockStore(std::string root) : root_(std::move(root)) {}

Status BlockStore::Open() {
  std::error_code ec;
  static const char* kHex = "0123456789abcdef";
  for (int i = 0; i < 256; ++i) {
    std::string shard = root_ + "/" + kHex[i >> 4] + kHex[i & 15];
    fs::create_directories(shard, ec);
    if (ec)
      return Status::IoError("create " + shard + ": " + ec.message(),
                             "check that the vault's data directory is writable");
    for (auto it = fs::directory_iterator(shard, ec); !ec && it != fs::directory_iterator();
         it.increment(ec)) {
      if (it->path().filename().string().find(".tmp") != std::string::npos)
        fs::remove(it->path(), ec);
    }
  }
  return Status::Ok();
}

std::string BlockStore::PathOf(const BlockId& id) const {
  std::string hex = id.Hex();
  return root_ + "/" + hex.substr(0, 2) + "/" + hex;
}

bool BlockStore::Has(const BlockId& id) const {
  std::error_code ec;
  return fs::exists(PathOf(id), ec);
}

Result<PutStats> BlockStore::Put(const std::vector<EncodedBlock>& blocks) {
  auto* env = platform::Env::Default();
  PutStats stats;
  stats.received = blocks.size();
  std::vector<const EncodedBlock*> fresh;
  std::vector<std::byte> plain;
  for (const auto& b : blocks) {
    if (Has(b.id)) {
      stats.already_present++;
      continue;
    }
    Status st = DecodeBlock(b, plain);
    if (!st.ok())
      return std::move(st)
          .InPhase("store block")
          .WithFix("the agent sent data that does not match its id; rerun the backup (it resends)");
    fresh.push_back(&b);
  }
  if (fresh.empty()) return stats;
  thread_local std::mt19937_64 rng(std::random_device{}());
  std::vector<std::pair<std::string, std::string>> renames;
  Status st;
  for (const EncodedBlock* b : fresh) {
    std::string final_path = PathOf(b->id);
    std::string tmp = final_path + ".tmp" + std::to_string(rng());
    st = env->WriteFileUnsynced(tmp, EncodeBatch(std::span(b, 1)), 0640);
    if (!st.ok()) break;
    renames.emplace_back(tmp, final_path);
    stats.bytes_stored += b->payload.size();
  }
  if (st.ok()) st = env->SyncFilesystem(root_);
  std::error_code ec;
  if (st.ok()) {
    for (auto& [tmp, final_path] : renames) {
      fs::rename(tmp, final_path, ec);
      if (ec) {
        st = Status::IoError("rename " + tmp + ": " + ec.message());
        break;
      }
    }
  }
  if (st.ok()) st = env->SyncFilesystem(root_);
  if (!st.ok()) {
    for (auto& [tmp, final_path] : renames) fs::remove(tmp, ec);
    return std::move(st).InPhase("store block").WithFix("check free space on the vault's disk");
  }
  stats.stored = fresh.size();
  return stats;
}

Result<EncodedBlock> BlockStore::Get(const BlockId& id) const {
  auto data = platform::Env::Default()->ReadFile(PathOf(id));
  if (!data.ok()) {
    if (data.status().code() == Code::kNotFound)
      return Status::NotFound("block " + id.Hex() + " is not in the vault");
    return data.take_status();
  }
  auto batch = DecodeBatch(*data);
  if (!batch.ok() || batch->size() != 1 || (*batch)[0].id != id)
    return Status::Corruption(
        "stored block file " + PathOf(id) + " is damaged",
        "restore another recovery point; a full backup (new --state-dir) cannot repair it yet "
        "because the vault still lists the block as present");
  return std::move((*batch)[0]);
}

}  // namespace vmsnap::vault

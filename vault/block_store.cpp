#include "vault/block_store.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include <filesystem>
#include <mutex>
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

namespace {
constexpr uint64_t kBatchFraming = 8 + 41;  // VMB1 header + one record header

int64_t MtimeMs(const struct stat& st) {
  return int64_t{st.st_mtim.tv_sec} * 1000 + st.st_mtim.tv_nsec / 1000000;
}
}  // namespace

bool BlockStore::HasForUploadLocked(const BlockId& id) {
  // utimensat(NULL) sets mtime to now; it fails with ENOENT when the block is absent.
  return ::utimensat(AT_FDCWD, PathOf(id).c_str(), nullptr, 0) == 0;
}

bool BlockStore::HasForUpload(const BlockId& id) {
  std::shared_lock gc_lock(gc_mu_);
  return HasForUploadLocked(id);
}

uint64_t BlockStore::StoredBytes(const BlockId& id) const {
  struct stat st {};
  if (::stat(PathOf(id).c_str(), &st) != 0) return 0;
  uint64_t size = static_cast<uint64_t>(st.st_size);
  return size > kBatchFraming ? size - kBatchFraming : 0;
}

void BlockStore::ForEach(const std::function<void(const BlockId&, uint64_t, int64_t)>& fn) const {
  std::error_code ec;
  for (auto shard = fs::directory_iterator(root_, ec); !ec && shard != fs::directory_iterator();
       shard.increment(ec)) {
    std::error_code ec2;
    for (auto it = fs::directory_iterator(shard->path(), ec2);
         !ec2 && it != fs::directory_iterator(); it.increment(ec2)) {
      std::string name = it->path().filename().string();
      auto id = BlockId::FromHex(name);
      if (!id.ok()) continue;
      struct stat st {};
      if (::stat(it->path().c_str(), &st) != 0) continue;
      uint64_t size = static_cast<uint64_t>(st.st_size);
      fn(*id, size > kBatchFraming ? size - kBatchFraming : 0, MtimeMs(st));
    }
  }
}

Result<uint64_t> BlockStore::RemoveIfUntouchedSince(const BlockId& id, int64_t cutoff_unix_ms) {
  std::unique_lock gc_lock(gc_mu_);
  const std::string path = PathOf(id);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return uint64_t{0};
  if (MtimeMs(st) >= cutoff_unix_ms) return uint64_t{0};
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return Status::FromErrno(errno, "delete block " + path);
  uint64_t size = static_cast<uint64_t>(st.st_size);
  return size > kBatchFraming ? size - kBatchFraming : 0;
}

Result<PutStats> BlockStore::Put(const std::vector<EncodedBlock>& blocks) {
  std::shared_lock gc_lock(gc_mu_);
  auto* env = platform::Env::Default();
  PutStats stats;
  stats.received = blocks.size();
  std::vector<const EncodedBlock*> fresh;
  std::vector<std::byte> plain;
  for (const auto& b : blocks) {
    if (HasForUploadLocked(b.id)) {
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

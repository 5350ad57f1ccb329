#include "agent/mount/image_source.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>

#include "agent/scratch.hpp"
#include "agent/vault_client.hpp"

namespace vmsnap::mount {

using nlohmann::json;

ClientOptions ShortFetchOptions(const ClientOptions& base) {
  ClientOptions o = base;
  o.max_attempts = 3;
  o.initial_backoff = std::chrono::milliseconds(100);
  o.max_backoff = std::chrono::milliseconds(500);
  o.io_timeout = std::chrono::seconds(10);
  return o;
}

struct RecoveryPointImages::Disk {
  DiskImageInfo info;
  uint64_t disk_size = 0;
  uint32_t block_size = 0;
  // The resolved map, the entry of block i in slot i (agent/scratch.hpp): read from the vault
  // page by page and kept out of memory, like a restore's.
  std::unique_ptr<platform::ScratchFile> map;
  std::mutex seq_mu;
  uint64_t next_offset = 0;  // where a sequential reader would continue
  uint32_t window = 0;       // current read-ahead in blocks

  uint64_t block_count() const { return (disk_size + block_size - 1) / block_size; }
  uint64_t BlockLength(uint64_t index) const {
    uint64_t off = index * block_size;
    return std::min<uint64_t>(block_size, disk_size - off);
  }
  // The block's id into `id`, or nullopt for a zero block; its check too when asked for.
  // Thread-safe.
  Status Find(uint64_t index, std::optional<BlockId>& id,
              std::optional<FastHash>* check = nullptr) const {
    std::vector<ManifestEntry> slot;
    std::string buf;
    VMSNAP_RETURN_IF_ERROR(agent::ReadEntrySlots(*map, index, 1, slot, buf));
    id = slot[0].id;
    if (check) *check = slot[0].check;
    return Status::Ok();
  }
};

RecoveryPointImages::RecoveryPointImages(ImageOptions options, json rp)
    : options_(std::move(options)), rp_(std::move(rp)), cache_(options_.cache_bytes) {}

RecoveryPointImages::~RecoveryPointImages() = default;

Result<std::unique_ptr<RecoveryPointImages>> RecoveryPointImages::Open(
    const ImageOptions& options) {
  auto control = agent::VaultClient::Create(options.control);
  if (!control.ok()) return std::move(control.take_status()).InPhase("connect to vault");
  auto rp = (*control)->GetRecoveryPoint(options.recovery_point);
  if (!rp.ok()) {
    Status st = rp.take_status();
    if (st.code() == Code::kNotFound)
      st.WithFix("list the recovery points with `vmsnap-agent list` and pass one of their ids");
    return std::move(st).InPhase("find recovery point");
  }
  std::unique_ptr<RecoveryPointImages> images(new RecoveryPointImages(options, *rp));
  for (const auto& rd : (*rp)["disks"]) {
    auto d = std::make_unique<Disk>();
    d->info.index = rd.value("index", 0u);
    d->info.source = rd.value("key", "");
    auto scratch = agent::CreateScratch(options.scratch_dir);
    if (!scratch.ok()) return scratch.take_status();
    d->map = std::move(*scratch);
    std::string buf;
    Status st = (*control)->ResolvedManifestPages(
        options.recovery_point, static_cast<int>(d->info.index), options.map_page_entries,
        [&](const Manifest& page) {
          d->disk_size = page.disk_size;
          d->block_size = page.block_size;
          d->info.data_blocks += page.entries.size();
          return agent::WriteEntriesAtTheirIndex(*d->map, page.entries, page.block_count(), buf);
        });
    if (!st.ok())
      return std::move(st).InPhase("read block map of disk " + std::to_string(d->info.index));
    d->info.size_bytes = d->disk_size;
    d->info.block_size = d->block_size;
    images->info_.push_back(d->info);
    images->disks_.push_back(std::move(d));
  }
  if (images->disks_.empty())
    return Status::NotFound("recovery point " + options.recovery_point + " has no disks")
        .InPhase("find recovery point");
  return images;
}

std::unique_ptr<agent::VaultClient> RecoveryPointImages::AcquireClient(Status& error) {
  {
    std::lock_guard lock(pool_mu_);
    if (!pool_.empty()) {
      auto c = std::move(pool_.back());
      pool_.pop_back();
      return c;
    }
  }
  auto c = agent::VaultClient::Create(options_.fetch);
  if (!c.ok()) {
    error = c.take_status();
    return nullptr;
  }
  return std::move(*c);
}

void RecoveryPointImages::ReleaseClient(std::unique_ptr<agent::VaultClient> client) {
  std::lock_guard lock(pool_mu_);
  pool_.push_back(std::move(client));
}

Status RecoveryPointImages::FetchBlocks(Disk& d, const std::vector<uint64_t>& indexes,
                                        std::unordered_map<uint64_t, BlockData>& got) {
  std::vector<BlockId> ids;
  // Per distinct block: the disk's blocks that hold it, and the check its manifest entry
  // carries (XXH3-128), which verifies its bytes as a restore does; without one, their
  // SHA-256 does (DecodeBlockInto).
  struct Wanted {
    std::vector<uint64_t> indexes;
    std::optional<FastHash> check;
  };
  std::unordered_map<BlockId, Wanted, BlockIdHash> where;
  for (uint64_t index : indexes) {
    std::optional<BlockId> id;
    std::optional<FastHash> check;
    VMSNAP_RETURN_IF_ERROR(d.Find(index, id, &check));
    if (!id) continue;
    Wanted& w = where[*id];
    if (w.indexes.empty()) ids.push_back(*id);
    w.indexes.push_back(index);
    if (check && !w.check) w.check = check;
  }
  if (ids.empty()) return Status::Ok();
  Status error;
  auto client = AcquireClient(error);
  if (!client) return error;
  ++fetch_requests_;
  std::string body;
  auto blocks = client->Fetch(ids, body);
  ReleaseClient(std::move(client));
  if (!blocks.ok()) return blocks.take_status();
  if (blocks->size() != ids.size())
    return Status::Unavailable("the vault answered " + std::to_string(blocks->size()) +
                               " blocks for a request of " + std::to_string(ids.size()));
  for (auto& enc : *blocks) {
    auto w = where.find(enc.id);
    if (w == where.end())
      return Status::Unavailable("the vault sent block " + enc.id.Hex() +
                                 " that was not asked for");
    auto plain = std::make_shared<std::vector<std::byte>>(enc.plain_size);
    const Wanted& wanted = w->second;
    Status st = DecodeBlockInto(enc, *plain, wanted.check ? &*wanted.check : nullptr);
    if (!st.ok())
      return Status::Corruption("block " + std::to_string(wanted.indexes.front()) + " (id " +
                                    enc.id.Hex() + ") of disk " + std::to_string(d.info.index) +
                                    " is corrupt on the vault: " + st.cause(),
                                "the vault's copy is damaged; use another recovery point");
    for (uint64_t index : wanted.indexes)
      if (plain->size() != d.BlockLength(index))
        return Status::Corruption("block " + std::to_string(index) + " of disk " +
                                  std::to_string(d.info.index) + " has " +
                                  std::to_string(plain->size()) + " bytes, expected " +
                                  std::to_string(d.BlockLength(index)));
    ++blocks_fetched_;
    bytes_fetched_ += enc.payload.size();
    BlockData shared = std::move(plain);
    for (uint64_t index : wanted.indexes) {
      cache_.Insert(d.info.index, index, shared);
      got[index] = shared;
    }
  }
  return Status::Ok();
}

Result<size_t> RecoveryPointImages::Read(size_t disk_pos, uint64_t offset,
                                         std::span<std::byte> out) {
  if (disk_pos >= disks_.size()) return Status::InvalidArgument("no such disk");
  Disk& d = *disks_[disk_pos];
  if (offset >= d.disk_size || out.empty()) return size_t{0};
  const size_t len = static_cast<size_t>(std::min<uint64_t>(out.size(), d.disk_size - offset));
  ++reads_;
  const uint64_t bs = d.block_size;
  const uint64_t first = offset / bs, last = (offset + len - 1) / bs;

  uint32_t window = 0;
  {
    std::lock_guard lock(d.seq_mu);
    if (offset == d.next_offset && offset != 0)
      d.window = std::min(options_.max_readahead_blocks, std::max<uint32_t>(2, d.window * 2));
    else
      d.window = 0;
    d.next_offset = offset + len;
    window = d.window;
  }

  std::vector<BlockData> have(last - first + 1);
  std::vector<uint64_t> missing;
  std::optional<BlockId> id;
  for (uint64_t b = first; b <= last; ++b) {
    VMSNAP_RETURN_IF_ERROR(d.Find(b, id));
    if (!id) {
      ++zero_block_reads_;
      continue;
    }
    have[b - first] = cache_.Lookup(d.info.index, b);
    if (!have[b - first]) missing.push_back(b);
  }
  if (!missing.empty()) {
    std::vector<uint64_t> want = missing;
    for (uint64_t b = last + 1, added = 0; added < window && b < d.block_count(); ++b, ++added) {
      VMSNAP_RETURN_IF_ERROR(d.Find(b, id));
      if (id && !cache_.Contains(d.info.index, b)) {
        want.push_back(b);
        ++readahead_blocks_;
      }
    }
    std::unordered_map<uint64_t, BlockData> got;
    Status st = FetchBlocks(d, want, got);
    if (!st.ok()) {
      ++fetch_errors_;
      spdlog::error("read of disk {} ({} bytes at offset {}) failed, answering EIO: {}",
                    d.info.index, len, offset,
                    std::move(st).InPhase("fetch blocks from vault").ToString());
      failing_ = true;
      return st;
    }
    if (failing_.exchange(false))
      spdlog::info("the vault answers again: reads of recovery point {} work",
                   options_.recovery_point);
    for (uint64_t b : missing) {
      have[b - first] = got[b];
      if (!have[b - first])
        return Status::Internal("block " + std::to_string(b) + " was not fetched");
    }
  }
  size_t done = 0;
  for (uint64_t b = first; b <= last; ++b) {
    uint64_t block_start = b * bs;
    uint64_t from = std::max<uint64_t>(offset, block_start) - block_start;
    uint64_t to = std::min<uint64_t>(offset + len, block_start + d.BlockLength(b)) - block_start;
    std::byte* dst = out.data() + done;
    if (const auto& data = have[b - first])
      std::memcpy(dst, data->data() + from, to - from);
    else
      std::memset(dst, 0, to - from);
    done += to - from;
  }
  return done;
}

json RecoveryPointImages::StatsJson() const {
  BlockCacheStats c = cache_.Stats();
  return {{"recovery_point", options_.recovery_point},
          {"reads", reads_.load()},
          {"fetch_requests", fetch_requests_.load()},
          {"blocks_fetched", blocks_fetched_.load()},
          {"bytes_fetched", bytes_fetched_.load()},
          {"readahead_blocks", readahead_blocks_.load()},
          {"zero_block_reads", zero_block_reads_.load()},
          {"fetch_errors", fetch_errors_.load()},
          {"cache_hits", c.hits},
          {"cache_misses", c.misses},
          {"cache_evictions", c.evictions},
          {"cache_bytes", c.bytes},
          {"cache_blocks", c.entries},
          {"cache_capacity_bytes", c.capacity}};
}

}  // namespace vmsnap::mount

#include "agent/backup.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "agent/bounded_queue.hpp"
#include "agent/local_state.hpp"
#include "agent/progress.hpp"
#include "agent/vault_client.hpp"
#include "common/manifest.hpp"
#include "platform/env.hpp"

namespace vmsnap::agent {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

json DiskReport::ToJson() const {
  return {{"index", index},
          {"path", path},
          {"size_bytes", size_bytes},
          {"block_size", block_size},
          {"mode", mode},
          {"parent", parent},
          {"blocks_total", blocks_total},
          {"blocks_zero", blocks_zero},
          {"blocks_read", blocks_read},
          {"blocks_changed", blocks_changed},
          {"blocks_uploaded", blocks_uploaded},
          {"bytes_uploaded", bytes_uploaded},
          {"bytes_changed", bytes_changed}};
}

json BackupReport::ToJson() const {
  json d = json::array();
  for (const auto& disk : disks) d.push_back(disk.ToJson());
  return {{"recovery_point", recovery_point},
          {"item", item},
          {"consistency", consistency},
          {"consistency_evidence", evidence},
          {"duration_ms", duration_ms},
          {"bytes_sent", bytes_sent},
          {"disks", d}};
}

namespace {

enum class Mode { kFull, kLocalState, kVaultMap };

// Everything the pipeline knows about one disk. Counters are atomics (workers and uploaders
// update them concurrently); new_hashes[i] is written only by the worker owning block i.
struct DiskJob {
  int index = 0;
  std::string path;
  std::unique_ptr<platform::DiskReader> reader;
  uint64_t size = 0;
  uint64_t blocks = 0;
  Mode mode = Mode::kFull;
  std::string parent;
  std::string state_path;
  std::vector<FastHash> old_hashes;           // kLocalState
  std::vector<ManifestEntry> parent_entries;  // kVaultMap: the parent's full map
  std::vector<FastHash> new_hashes;
  platform::FileIdentity identity_before;

  std::mutex entries_mu;
  std::vector<ManifestEntry> entries;

  std::atomic<uint64_t> zero{0}, read{0}, changed{0}, uploaded{0}, bytes_uploaded{0},
      bytes_changed{0}, bytes_done{0};

  // The parent's id of block `idx` in kVaultMap mode (nullopt: zero in the parent).
  std::optional<BlockId> ParentId(uint64_t idx) const {
    auto it = std::lower_bound(parent_entries.begin(), parent_entries.end(), idx,
                               [](const ManifestEntry& e, uint64_t i) { return e.index < i; });
    if (it != parent_entries.end() && it->index == idx) return it->id;
    return std::nullopt;
  }
};

struct Segment {
  DiskJob* disk;
  uint64_t first_block;
  uint64_t count;
};

struct UploadItem {
  DiskJob* disk;
  EncodedBlock block;
};

// Shared upload budget for --max-rate (token bucket with no burst).
class RateLimiter {
 public:
  explicit RateLimiter(uint64_t bytes_per_s) : rate_(bytes_per_s), start_(Clock::now()) {}
  void Acquire(uint64_t bytes) {
    if (rate_ == 0) return;
    Clock::time_point when;
    {
      std::lock_guard lock(mu_);
      granted_ += bytes;
      when = start_ + std::chrono::microseconds(granted_ * 1000000 / rate_);
    }
    std::this_thread::sleep_until(when);
  }

 private:
  uint64_t rate_;
  Clock::time_point start_;
  std::mutex mu_;
  uint64_t granted_ = 0;
};

// The first error wins; everyone else stops at the next check.
class FailureLatch {
 public:
  void Set(Status st) {
    std::lock_guard lock(mu_);
    if (status_.ok()) status_ = std::move(st);
    failed_ = true;
  }
  bool failed() const { return failed_.load(); }
  Status status() const {
    std::lock_guard lock(mu_);
    return status_;
  }

 private:
  mutable std::mutex mu_;
  Status status_;
  std::atomic<bool> failed_{false};
};

// The disk's identity across backups: its absolute path (symlinks such as /dev/disk/by-id/...
// are kept as given, so a stable name stays stable).
std::string DiskKey(const std::string& path) {
  std::error_code ec;
  auto abs = std::filesystem::absolute(path, ec);
  return ec ? path : abs.lexically_normal().string();
}

// Decides how each disk is compared: with the local state, with the vault's map of the
// parent, or not at all (full).
Status PlanDisk(DiskJob& d, const BackupOptions& opt, const std::optional<json>& latest,
                VaultClient& control) {
  d.mode = Mode::kFull;
  if (!latest) return Status::Ok();
  int parent_index = -1;
  for (const auto& pd : (*latest)["disks"])
    if (pd.value("key", "") == DiskKey(d.path) && pd.value("size_bytes", 0ull) == d.size &&
        pd.value("block_size", 0u) == opt.block_size)
      parent_index = pd.value("index", -1);
  if (parent_index < 0) {
    spdlog::info("disk {}: no matching disk in the latest recovery point: full backup", d.path);
    return Status::Ok();
  }
  d.parent = (*latest)["id"];
  auto state = LoadDiskState(d.state_path);
  if (state.ok() && state->recovery_point == d.parent && state->vault_url == opt.client.url &&
      state->item == opt.item && state->disk_size == d.size &&
      state->block_size == opt.block_size && state->hashes.size() == d.blocks) {
    d.mode = Mode::kLocalState;
    d.old_hashes = std::move(state->hashes);
    return Status::Ok();
  }
  spdlog::info(
      "disk {}: local change-tracking state {} the latest recovery point; comparing "
      "with the vault's block map instead",
      d.path, state.ok() ? "does not match" : "is missing for");
  auto map = control.ResolvedManifest(d.parent, parent_index);
  if (!map.ok()) return std::move(map.take_status()).InPhase("read parent block map");
  d.mode = Mode::kVaultMap;
  d.parent_entries = std::move(map->entries);
  return Status::Ok();
}

void ProcessSegment(const Segment& seg, uint32_t bs, std::vector<std::byte>& buf,
                    std::vector<char>& has_data, BoundedQueue<UploadItem>& queue,
                    std::mutex& dedup_mu, std::unordered_set<BlockId, BlockIdHash>& dedup,
                    FailureLatch& failure) {
  DiskJob& d = *seg.disk;
  const uint64_t start = seg.first_block * bs;
  const uint64_t end = std::min(d.size, start + seg.count * bs);
  // Which blocks hold data? Holes of sparse files are never read.
  std::fill(has_data.begin(), has_data.begin() + static_cast<long>(seg.count), 0);
  for (uint64_t off = start; off < end;) {
    auto range = d.reader->NextData(off);
    if (!range.ok()) return failure.Set(std::move(range.take_status()).InPhase("read disk"));
    if (!*range || (*range)->begin >= end) break;
    uint64_t b = std::max((*range)->begin, start), e = std::min((*range)->end, end);
    for (uint64_t i = (b - start) / bs; i <= (e - 1 - start) / bs; ++i) has_data[i] = 1;
    off = (*range)->end;
  }
  // Read runs of data blocks with one call each.
  for (uint64_t i = 0; i < seg.count;) {
    if (!has_data[i]) {
      ++i;
      continue;
    }
    uint64_t j = i;
    while (j < seg.count && has_data[j]) ++j;
    uint64_t off = start + i * bs, len = std::min(end, start + j * bs) - off;
    Status st = d.reader->ReadAt(off, std::span(buf.data() + i * bs, len));
    if (!st.ok()) return failure.Set(std::move(st).InPhase("read disk"));
    i = j;
  }
  std::vector<ManifestEntry> local_entries;
  for (uint64_t i = 0; i < seg.count; ++i) {
    const uint64_t idx = seg.first_block + i;
    const uint64_t len = std::min<uint64_t>(bs, end - (start + i * bs));
    std::span<const std::byte> block(buf.data() + i * bs, len);
    d.bytes_done += len;
    if (has_data[i]) d.read++;
    if (!has_data[i] || IsAllZero(block)) {
      d.new_hashes[idx] = FastHash{};
      d.zero++;
      bool was_data = d.mode == Mode::kLocalState ? d.old_hashes[idx] != FastHash{}
                      : d.mode == Mode::kVaultMap ? d.ParentId(idx).has_value()
                                                  : false;
      if (was_data) {
        local_entries.push_back({idx, std::nullopt});
        d.changed++;
      }
      continue;
    }
    FastHash fh = FastHashBlock(block);
    d.new_hashes[idx] = fh;
    if (d.mode == Mode::kLocalState && d.old_hashes[idx] == fh) continue;
    BlockId id = Sha256Block(block);
    if (d.mode == Mode::kVaultMap && d.ParentId(idx) == id) continue;
    local_entries.push_back({idx, id});
    d.changed++;
    d.bytes_changed += len;
    {
      std::lock_guard lock(dedup_mu);
      if (!dedup.insert(id).second) continue;  // same content already queued in this backup
    }
    EncodedBlock enc = EncodeBlock(id, block);
    uint64_t cost = enc.payload.size() + 64;
    if (!queue.Push(UploadItem{&d, std::move(enc)}, cost)) return;
  }
  std::lock_guard lock(d.entries_mu);
  d.entries.insert(d.entries.end(), local_entries.begin(), local_entries.end());
}

// Uploads queued blocks in batches: ask which ids are missing, send only those.
void UploadLoop(const BackupOptions& opt, VaultClient& client, BoundedQueue<UploadItem>& queue,
                RateLimiter& limiter, FailureLatch& failure) {
  std::vector<UploadItem> batch;
  uint64_t batch_bytes = 0;
  auto flush = [&]() -> Status {
    if (batch.empty()) return Status::Ok();
    std::vector<BlockId> ids;
    ids.reserve(batch.size());
    for (const auto& it : batch) ids.push_back(it.block.id);
    auto missing = client.Missing(ids);
    if (!missing.ok()) return missing.take_status();
    std::unordered_set<BlockId, BlockIdHash> want(missing->begin(), missing->end());
    std::vector<EncodedBlock> send;
    std::vector<DiskJob*> owners;
    uint64_t bytes = 0;
    for (auto& it : batch) {
      if (!want.count(it.block.id)) continue;
      bytes += it.block.payload.size();
      owners.push_back(it.disk);
      send.push_back(std::move(it.block));
    }
    if (!send.empty()) {
      limiter.Acquire(bytes);
      VMSNAP_RETURN_IF_ERROR(client.Upload(send));
      for (size_t i = 0; i < send.size(); ++i) {
        owners[i]->uploaded++;
        owners[i]->bytes_uploaded += send[i].payload.size();
      }
    }
    batch.clear();
    batch_bytes = 0;
    return Status::Ok();
  };
  for (;;) {
    bool finished = false;
    auto item = queue.Pop(std::chrono::milliseconds(100), finished);
    if (item) {
      batch_bytes += item->block.payload.size();
      batch.push_back(std::move(*item));
    }
    if (failure.failed()) {
      queue.Cancel();
      return;
    }
    bool full = batch_bytes >= opt.batch_bytes || batch.size() >= 2048;
    if (full || (!item && !batch.empty())) {
      Status st = flush();
      if (!st.ok()) {
        failure.Set(std::move(st).InPhase("upload blocks"));
        queue.Cancel();
        return;
      }
    }
    if (finished) return;
  }
}

Status CancelledStatus() {
  return Status::Error(Code::kCancelled, "the backup was cancelled; nothing was committed")
      .InPhase("transfer");
}

std::string DefaultItem() {
  return platform::Env::Default()->HostName();
}

}  // namespace

Result<BackupReport> RunBackup(const BackupOptions& in) {
  const auto t0 = Clock::now();
  BackupOptions opt = in;
  if (opt.item.empty()) opt.item = DefaultItem();
  if (opt.disks.empty())
    return Status::InvalidArgument("no disk to back up", "pass --disk PATH (repeatable)")
        .InPhase("prepare");
  VMSNAP_RETURN_IF_ERROR(ValidateBlockSize(opt.block_size).InPhase("prepare"));
  if (opt.workers <= 0)
    opt.workers = static_cast<int>(std::max(2u, std::thread::hardware_concurrency()));
  opt.uploaders = std::max(1, opt.uploaders);
  auto* env = platform::Env::Default();

  // 1. Open every disk first: a missing disk fails before any network traffic.
  std::vector<std::unique_ptr<DiskJob>> disks;
  for (size_t i = 0; i < opt.disks.size(); ++i) {
    for (size_t j = 0; j < i; ++j)
      if (opt.disks[j] == opt.disks[i])
        return Status::InvalidArgument("disk " + opt.disks[i] + " is named twice",
                                       "name each disk once")
            .InPhase("prepare");
    auto d = std::make_unique<DiskJob>();
    d->index = static_cast<int>(i);
    d->path = opt.disks[i];
    auto reader = env->OpenDiskForRead(d->path);
    if (!reader.ok()) return std::move(reader.take_status()).InPhase("open disk");
    d->reader = std::move(*reader);
    d->size = d->reader->size();
    if (d->size == 0)
      return Status::InvalidArgument("disk " + d->path + " is empty (0 bytes)",
                                     "pass a disk or image that holds data")
          .InPhase("open disk");
    d->blocks = (d->size + opt.block_size - 1) / opt.block_size;
    d->new_hashes.resize(d->blocks);
    d->state_path = DiskStatePath(opt.state_dir, opt.client.url, opt.item, DiskKey(d->path));
    disks.push_back(std::move(d));
  }

  // 2. Ask the vault what it has; plan each disk.
  auto control = VaultClient::Create(opt.client);
  if (!control.ok()) return std::move(control.take_status()).InPhase("connect to vault");
  auto latest = (*control)->LatestRecoveryPoint(opt.item);
  if (!latest.ok()) return std::move(latest.take_status()).InPhase("connect to vault");
  for (auto& d : disks) VMSNAP_RETURN_IF_ERROR(PlanDisk(*d, opt, *latest, **control));
  auto session = (*control)->CreateSession(opt.item);
  if (!session.ok()) return std::move(session.take_status()).InPhase("start backup session");

  // 3. Identity before reading: proves (for image files) that nothing wrote during the read.
  for (auto& d : disks) {
    auto id = d->reader->Identity();
    if (!id.ok()) return std::move(id.take_status()).InPhase("read disk");
    d->identity_before = *id;
  }

  // 4. The pipeline.
  const uint32_t bs = opt.block_size;
  const uint64_t seg_blocks = std::max<uint64_t>(1, (4ull << 20) / bs);
  std::vector<Segment> segments;
  {
    std::vector<std::vector<Segment>> per_disk;
    for (auto& d : disks) {
      per_disk.emplace_back();
      for (uint64_t b = 0; b < d->blocks; b += seg_blocks)
        per_disk.back().push_back({d.get(), b, std::min(seg_blocks, d->blocks - b)});
    }
    for (size_t k = 0;; ++k) {  // interleave so that all disks advance together
      bool any = false;
      for (auto& v : per_disk)
        if (k < v.size()) {
          segments.push_back(v[k]);
          any = true;
        }
      if (!any) break;
    }
  }
  std::vector<std::unique_ptr<VaultClient>> upload_clients;
  for (int i = 0; i < opt.uploaders; ++i) {
    auto c = VaultClient::Create(opt.client);
    if (!c.ok()) return std::move(c.take_status()).InPhase("connect to vault");
    upload_clients.push_back(std::move(*c));
  }
  BoundedQueue<UploadItem> queue(opt.queue_bytes);
  FailureLatch failure;
  RateLimiter limiter(opt.max_rate_bytes_per_s);
  std::mutex dedup_mu;
  std::unordered_set<BlockId, BlockIdHash> dedup;
  std::atomic<size_t> next_segment{0};
  std::vector<std::thread> uploaders, workers;
  for (auto& c : upload_clients)
    uploaders.emplace_back(
        [&, client = c.get()] { UploadLoop(opt, *client, queue, limiter, failure); });
  std::atomic<int> workers_running{opt.workers};
  for (int w = 0; w < opt.workers; ++w) {
    workers.emplace_back([&] {
      std::vector<std::byte> buf(seg_blocks * bs);
      std::vector<char> has_data(seg_blocks);
      for (size_t s; !failure.failed() && (s = next_segment++) < segments.size();)
        ProcessSegment(segments[s], bs, buf, has_data, queue, dedup_mu, dedup, failure);
      if (failure.failed()) queue.Cancel();  // release everyone blocked on the queue
      workers_running--;
    });
  }
  uint64_t total_bytes = 0;
  for (auto& d : disks) total_bytes += d->size;
  ProgressReporter progress("backup", total_bytes, opt.progress);
  auto last_progress = Clock::now();
  while (workers_running.load() > 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    uint64_t done = 0, up = 0;
    for (auto& d : disks) {
      done += d->bytes_done;
      up += d->bytes_uploaded;
    }
    progress.Update(done, "uploaded " + HumanBytes(up));
    if (opt.on_progress && Clock::now() - last_progress >= std::chrono::seconds(1)) {
      last_progress = Clock::now();
      opt.on_progress({{"phase", "transfer"},
                       {"bytes_done", done},
                       {"bytes_total", total_bytes},
                       {"bytes_uploaded", up}});
    }
    if (opt.cancel && opt.cancel->load() && !failure.failed()) {
      failure.Set(CancelledStatus());
      queue.Cancel();
    }
  }
  for (auto& t : workers) t.join();
  queue.Close();
  for (auto& t : uploaders) t.join();
  if (failure.failed()) return failure.status();

  // 5. Consistency, from evidence. Without a freeze or snapshot (the consistency engine),
  // the best honest level is "crash", and only for image files provably unchanged while read.
  json evidence = {{"method", "direct-read"}, {"disks", json::array()}};
  bool all_unchanged_files = true;
  for (auto& d : disks) {
    auto after = d->reader->Identity();
    if (!after.ok()) return std::move(after.take_status()).InPhase("read disk");
    bool unchanged = !d->reader->is_block_device() && *after == d->identity_before;
    std::string why = d->reader->is_block_device()
                          ? "live block device read without freeze or snapshot"
                          : (unchanged ? "image file unchanged (size, mtime, ctime) during the read"
                                       : "image file was modified during the read");
    if (!unchanged) all_unchanged_files = false;
    evidence["disks"].push_back(
        {{"path", d->path}, {"unchanged_during_read", unchanged}, {"reason", why}});
    if (!unchanged) spdlog::warn("disk {}: {}: recovery point is not consistent", d->path, why);
  }
  const std::string consistency = all_unchanged_files ? "crash" : "none";

  // 6. Manifests, then the atomic commit.
  BackupReport report;
  report.item = opt.item;
  report.consistency = consistency;
  report.evidence = evidence;
  for (auto& d : disks) {
    std::sort(d->entries.begin(), d->entries.end(),
              [](const ManifestEntry& a, const ManifestEntry& b) { return a.index < b.index; });
    Manifest m;
    m.disk_size = d->size;
    m.block_size = bs;
    m.parent = d->mode == Mode::kFull ? "" : d->parent;
    m.entries = std::move(d->entries);
    Status st = (*control)->PutManifest(*session, d->index, m);
    if (!st.ok()) return std::move(st).InPhase("upload manifest");
    DiskReport r;
    r.index = d->index;
    r.path = d->path;
    r.size_bytes = d->size;
    r.block_size = bs;
    r.mode = d->mode == Mode::kFull         ? "full"
             : d->mode == Mode::kLocalState ? "incremental"
                                            : "incremental-vault-map";
    r.parent = m.parent;
    r.blocks_total = d->blocks;
    r.blocks_zero = d->zero;
    r.blocks_read = d->read;
    r.blocks_changed = d->changed;
    r.blocks_uploaded = d->uploaded;
    r.bytes_uploaded = d->bytes_uploaded;
    r.bytes_changed = d->bytes_changed;
    report.disks.push_back(r);
  }
  json commit = {{"consistency", consistency}, {"disks", json::array()}};
  for (const auto& r : report.disks)
    commit["disks"].push_back(
        {{"index", r.index}, {"key", DiskKey(r.path)}, {"stats", r.ToJson()}});
  report.duration_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count();
  commit["report"] = report.ToJson();
  commit["origin"] = opt.origin;
  if (opt.cancel && opt.cancel->load()) return CancelledStatus();  // last safe point
  auto rp = (*control)->Commit(*session, commit);
  if (!rp.ok()) return std::move(rp.take_status()).InPhase("commit recovery point");
  report.recovery_point = rp->value("id", "");

  // 7. Remember what was backed up, for the next incremental.
  for (auto& d : disks) {
    DiskState s{opt.client.url, opt.item, DiskKey(d->path),        report.recovery_point,
                d->size,        bs,       std::move(d->new_hashes)};
    Status st = SaveDiskState(d->state_path, s);
    if (!st.ok())
      spdlog::warn(
          "could not save change-tracking state ({}); the next backup compares with the "
          "vault instead",
          st.ToString());
  }
  report.bytes_sent = (*control)->bytes_sent();
  for (auto& c : upload_clients) report.bytes_sent += c->bytes_sent();
  report.duration_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count();
  progress.Done();
  return report;
}

}  // namespace vmsnap::agent

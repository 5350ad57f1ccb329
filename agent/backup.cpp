#include "agent/backup.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "agent/bounded_queue.hpp"
#include "agent/composed_disk_reader.hpp"
#include "agent/local_state.hpp"
#include "agent/progress.hpp"
#include "agent/vault_client.hpp"
#include "common/manifest.hpp"
#include "platform/env.hpp"
#include "platform/quiesce.hpp"
#include "platform/vss.hpp"

namespace vmsnap::agent {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

json DiskReport::ToJson() const {
  return {{"index", index},
          {"path", path},
          {"read_path", read_path},
          {"provider", provider},
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
  return {{"recovery_point", recovery_point}, {"item", item},
          {"consistency", consistency},       {"consistency_evidence", evidence},
          {"duration_ms", duration_ms},       {"phases_ms", phases_ms},
          {"bytes_sent", bytes_sent},         {"disks", d}};
}

namespace {

enum class Mode { kFull, kLocalState, kVaultMap };

// Everything the pipeline knows about one disk. Counters are atomics (workers and uploaders
// update them concurrently); new_hashes[i] is written only by the worker owning block i.
struct DiskJob {
  int index = 0;
  std::string path;       // as named: the key in the vault and the local state (DiskKey)
  std::string read_path;  // what is read: the snapshot, or the disk itself
  std::string provider;   // the snapshot provider that produced read_path
  bool guarded = false;   // a live read of an image file, valid only if its identity holds
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
  // A physical drive read through its volumes' shadow copies: what came from where (merged
  // into the consistency evidence of this disk); null otherwise.
  json composition;

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

// Encoded blocks of one segment, in disk order. The vault appends each upload to its packs as
// it arrives, so a group queued and sent whole lands as one run of adjacent records, which a
// restore reads back with one large read instead of one read per block (docs/PERFORMANCE.md).
struct UploadItem {
  DiskJob* disk;
  std::vector<EncodedBlock> blocks;
  uint64_t payload_bytes = 0;
};

// Encoded bytes gathered from a segment before they are queued.
constexpr uint64_t kUploadGroupBytes = 1 << 20;

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

// No --block-size: the block size the latest point used for one of these disks, so that a
// changed default never turns the next incremental into a full backup; else the default.
uint32_t BlockSizeOfLatest(const std::optional<json>& latest,
                           const std::vector<std::unique_ptr<DiskJob>>& disks) {
  if (latest)
    for (const auto& pd : (*latest)["disks"])
      for (const auto& d : disks)
        if (pd.value("key", "") == DiskKey(d->path))
          if (uint32_t bs = pd.value("block_size", 0u); ValidateBlockSize(bs).ok()) return bs;
  return kDefaultBlockSize;
}

// Bytes read with one call and hashed before the next read (fits a core's L2 cache).
constexpr uint64_t kHashPieceBytes = 256 << 10;

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
  // Read runs of data blocks with one call each, in pieces small enough to stay in the CPU's
  // cache while they are hashed right after the read (4 MiB reads then hashing was slower).
  const uint64_t piece_blocks = std::max<uint64_t>(1, kHashPieceBytes / bs);
  std::vector<ManifestEntry> local_entries;
  UploadItem group{&d, {}, 0};
  auto push_group = [&] {
    if (group.blocks.empty()) return true;
    const uint64_t cost = group.payload_bytes + 64 * group.blocks.size();
    bool pushed = queue.Push(std::move(group), cost);
    group = UploadItem{&d, {}, 0};
    return pushed;
  };
  for (uint64_t i = 0; i < seg.count;) {
    uint64_t j = i + 1;
    while (j < seg.count && has_data[j] == has_data[i] && (!has_data[i] || j - i < piece_blocks))
      ++j;
    if (has_data[i]) {
      uint64_t off = start + i * bs, len = std::min(end, start + j * bs) - off;
      Status st = d.reader->ReadAt(off, std::span(buf.data() + i * bs, len));
      if (!st.ok()) return failure.Set(std::move(st).InPhase("read disk"));
    }
    for (; i < j; ++i) {
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
      group.payload_bytes += enc.payload.size();
      group.blocks.push_back(std::move(enc));
      if (group.payload_bytes >= kUploadGroupBytes && !push_group()) return;
    }
  }
  if (!push_group()) return;
  std::lock_guard lock(d.entries_mu);
  d.entries.insert(d.entries.end(), local_entries.begin(), local_entries.end());
}

// Uploads queued blocks in batches: ask which ids are missing, send only those.
void UploadLoop(const BackupOptions& opt, VaultClient& client, BoundedQueue<UploadItem>& queue,
                RateLimiter& limiter, FailureLatch& failure) {
  std::vector<UploadItem> batch;
  uint64_t batch_bytes = 0;
  size_t batch_blocks = 0;
  auto flush = [&]() -> Status {
    if (batch.empty()) return Status::Ok();
    std::vector<BlockId> ids;
    ids.reserve(batch_blocks);
    for (const auto& it : batch)
      for (const auto& b : it.blocks) ids.push_back(b.id);
    auto missing = client.Missing(ids);
    if (!missing.ok()) return missing.take_status();
    std::unordered_set<BlockId, BlockIdHash> want(missing->begin(), missing->end());
    std::vector<EncodedBlock> send;
    std::vector<DiskJob*> owners;
    uint64_t bytes = 0;
    for (auto& it : batch)
      for (auto& b : it.blocks) {
        if (!want.count(b.id)) continue;
        bytes += b.payload.size();
        owners.push_back(it.disk);
        send.push_back(std::move(b));
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
    batch_blocks = 0;
    return Status::Ok();
  };
  for (;;) {
    bool finished = false;
    auto item = queue.Pop(std::chrono::milliseconds(100), finished);
    if (item) {
      batch_bytes += item->payload_bytes;
      batch_blocks += item->blocks.size();
      batch.push_back(std::move(*item));
    }
    if (failure.failed()) {
      queue.Cancel();
      return;
    }
    bool full = batch_bytes >= opt.batch_bytes || batch_blocks >= 2048;
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

// The pipeline, once over every disk: W workers read, hash and encode segments of all disks
// interleaved; U uploaders send what the vault is missing. Returns the first error.
Status Transfer(std::vector<std::unique_ptr<DiskJob>>& disks, const BackupOptions& opt,
                std::vector<std::unique_ptr<VaultClient>>& upload_clients,
                ProgressReporter& progress) {
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
  BoundedQueue<UploadItem> queue(opt.queue_bytes);
  FailureLatch failure;
  RateLimiter limiter(opt.max_rate_bytes_per_s);
  std::mutex dedup_mu;
  std::unordered_set<BlockId, BlockIdHash> dedup;
  std::atomic<size_t> next_segment{0};
  std::vector<std::thread> uploaders, workers;
  // The watcher below wakes when a worker or uploader ends (not only every 200 ms), so the
  // last upload is followed at once by the commit.
  std::mutex running_mu;
  std::condition_variable running_cv;
  int uploaders_running = static_cast<int>(upload_clients.size());
  int workers_running = opt.workers;
  auto finished = [&](int& running) {
    {
      std::lock_guard lock(running_mu);
      --running;
    }
    running_cv.notify_all();
  };
  for (auto& c : upload_clients)
    uploaders.emplace_back([&, client = c.get()] {
      UploadLoop(opt, *client, queue, limiter, failure);
      finished(uploaders_running);
    });
  for (int w = 0; w < opt.workers; ++w) {
    workers.emplace_back([&] {
      std::vector<std::byte> buf(seg_blocks * bs);
      std::vector<char> has_data(seg_blocks);
      for (size_t s; !failure.failed() && (s = next_segment++) < segments.size();)
        ProcessSegment(segments[s], bs, buf, has_data, queue, dedup_mu, dedup, failure);
      if (failure.failed()) queue.Cancel();  // release everyone blocked on the queue
      finished(workers_running);
    });
  }
  uint64_t total_bytes = 0;
  for (auto& d : disks) total_bytes += d->size;
  auto last_progress = Clock::now();
  // Progress and cancellation are watched until the last upload is done, not only the reads.
  bool queue_closed = false;
  for (;;) {
    int workers_left = 0;
    {
      std::unique_lock lock(running_mu);
      const int workers_before = workers_running, uploaders_before = uploaders_running;
      running_cv.wait_for(lock, std::chrono::milliseconds(200), [&] {
        return workers_running != workers_before || uploaders_running != uploaders_before;
      });
      if (workers_running == 0 && uploaders_running == 0) break;
      workers_left = workers_running;
    }
    if (!queue_closed && workers_left == 0) {
      queue.Close();  // everything is read: uploaders drain what is left, then stop
      queue_closed = true;
    }
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
  return failure.failed() ? failure.status() : Status::Ok();
}

// Forgets what one transfer found, for a second attempt (blocks already uploaded stay in the
// vault; its "missing" answer keeps them from being sent twice).
void ResetForRetry(DiskJob& d) {
  d.entries.clear();
  std::fill(d.new_hashes.begin(), d.new_hashes.end(), FastHash{});
  d.zero = 0;
  d.read = 0;
  d.changed = 0;
  d.bytes_changed = 0;
  d.bytes_done = 0;
}

// A leftover freeze, for the evidence and the log.
json LeftoverToJson(const platform::LeftoverFreeze& l) {
  if (!l.found) return {{"found", false}};
  json fss = json::array();
  for (const auto& e : l.filesystems)
    fss.push_back({{"mount_point", e.mount_point}, {"outcome", e.outcome}});
  json marker = json::parse(l.marker_text, nullptr, false);
  return {{"found", true},
          {"interrupted_backup", true},
          {"marker_path", l.marker_path},
          {"marker", marker.is_discarded() ? json(l.marker_text) : marker},
          {"filesystems", fss}};
}

// A physical drive on the VSS path: the disk itself (live) composed with each volume's shadow
// copy device (agent/composed_disk_reader.hpp).
Result<std::unique_ptr<ComposedDiskReader>> OpenComposedDisk(platform::Env& env,
                                                             const DiskToRead& r) {
  auto disk = env.OpenDiskForRead(r.read_path);
  if (!disk.ok()) return disk.take_status();
  std::vector<ShadowedVolume> volumes;
  for (const auto& v : r.volume_shadows) {
    if (v.device_path.empty())
      return Status::Internal("no shadow copy device for volume " + v.volume + " of " + r.disk);
    auto shadow = env.OpenDiskForRead(v.device_path);
    if (!shadow.ok())
      return Status::Error(shadow.status().code(),
                           "the shadow copy " + v.device_path + " of volume " + v.volume + " of " +
                               r.disk + " cannot be opened: " + shadow.status().cause(),
                           shadow.status().fix());
    volumes.push_back(
        {{v.volume, v.extents, v.extents_on_other_disks}, v.device_path, std::move(*shadow)});
  }
  return ComposedDiskReader::Create(std::move(*disk), std::move(volumes));
}

// Where each byte of a composed disk came from, for the evidence: the volumes (their extents,
// from their shadow copies, point in time) are listed by the consistency engine; this adds the
// ranges read live and the totals, and makes point_in_time exact for the whole disk.
json CompositionEvidence(const ComposedDiskReader& c) {
  json live = json::array();
  for (const auto& r : c.LiveRanges()) live.push_back({{"begin", r.begin}, {"end", r.end}});
  const uint64_t live_bytes = c.live_bytes();
  return {{"point_in_time", live_bytes == 0},
          {"live_ranges", live},
          {"live_ranges_count", live.size()},
          {"live_bytes", live_bytes},
          {"shadow_bytes", c.size() - live_bytes}};
}

// Under the runtime dir's lock: thaw what an interrupted backup left frozen, then run the
// consistency engine (scripts, freeze, snapshot, thaw). The lock is released on return, when
// nothing is frozen any more.
Result<ConsistentView> PrepareView(const BackupOptions& opt, json& leftover_evidence) {
  const std::string& runtime_dir = opt.consistency.runtime_dir;
  auto lock = platform::LockRuntimeDir(runtime_dir, opt.runtime_lock_wait);
  if (!lock.ok()) return lock.take_status();
  if (!lock->held()) spdlog::debug("runtime dir not locked: {}", lock->why_not());

  auto leftover = platform::RecoverLeftoverFreeze(runtime_dir);
  if (!leftover.ok()) return leftover.take_status();
  leftover_evidence = LeftoverToJson(*leftover);
  if (leftover->found) {
    std::string what, unthawed;
    for (const auto& e : leftover->filesystems) {
      what += (what.empty() ? "" : ", ") + e.mount_point + ": " + e.outcome;
      if (e.outcome != "thawed" && e.outcome != "not frozen" &&
          e.outcome != "mount point no longer exists")
        unthawed += (unthawed.empty() ? "" : ", ") + e.mount_point + " (" + e.outcome + ")";
    }
    spdlog::warn("a previous backup was interrupted while filesystems were frozen (marker {}): {}",
                 leftover->marker_path, what.empty() ? "no filesystems listed" : what);
    if (!unthawed.empty())
      return Status::IoError(
                 "a previous backup left filesystems frozen that could not be "
                 "thawed: " +
                     unthawed,
                 "run `fsfreeze -u <mount point>` for each, then delete " + leftover->marker_path)
          .InPhase("recover leftover freeze");
  }

  ConsistencyOptions copt = opt.consistency;
  copt.disks = opt.disks;
  json evidence;
  auto view = PrepareConsistentView(copt, &evidence);
  for (const auto& script : evidence.value("scripts", json::array()))
    if (!script.value("ok", false))
      spdlog::warn("{} script {} ({}): {}", script.value("source", ""), script.value("path", ""),
                   script.value("phase", ""), script.value("error", ""));
  if (!view.ok()) spdlog::debug("consistency evidence: {}", evidence.dump());
  return view;
}

}  // namespace

Result<BackupReport> RunBackup(const BackupOptions& in) {
  const auto t0 = Clock::now();
  BackupOptions opt = in;
  if (opt.item.empty()) opt.item = DefaultItem();
  if (opt.disks.empty())
    return Status::InvalidArgument("no disk to back up", "pass --disk PATH (repeatable)")
        .InPhase("prepare");
  if (opt.block_size != 0)
    VMSNAP_RETURN_IF_ERROR(ValidateBlockSize(opt.block_size).InPhase("prepare"));
  if (opt.workers <= 0)
    opt.workers = static_cast<int>(std::max(2u, std::thread::hardware_concurrency()));
  opt.uploaders = std::max(1, opt.uploaders);
  auto* env = platform::Env::Default();

  // 1. Check every disk as named first: a missing disk fails before any network traffic.
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
    if (!reader.ok()) {
      // A volume or physical drive is only ever read through a VSS shadow copy, never live:
      // when VSS cannot be used at all (e.g. under Wine), that is the cause to report.
      if (!platform::VolumeNameOfDisk(d->path).empty() || platform::IsPhysicalDrivePath(d->path))
        if (auto vss = platform::OpenSystemVss(); !vss.ok())
          return Status::Error(vss.status().code(),
                               "VSS unavailable: disk " + d->path +
                                   " is read only through a VSS shadow copy, and VSS cannot "
                                   "be used here (" +
                                   vss.status().cause() +
                                   "); refusing a live read (opening the device also failed: " +
                                   reader.status().cause() + ")",
                               "run the agent on Windows as Administrator or SYSTEM with the "
                               "Volume Shadow Copy service enabled")
              .InPhase("open disk");
      return std::move(reader.take_status()).InPhase("open disk");
    }
    d->size = (*reader)->size();
    if (d->size == 0)
      return Status::InvalidArgument("disk " + d->path + " is empty (0 bytes)",
                                     "pass a disk or image that holds data")
          .InPhase("open disk");
    d->state_path = DiskStatePath(opt.state_dir, opt.client.url, opt.item, DiskKey(d->path));
    disks.push_back(std::move(d));
  }

  // 2. Ask the vault what it has; plan each disk (by its key, the path as named).
  auto control = VaultClient::Create(opt.client);
  if (!control.ok()) return std::move(control.take_status()).InPhase("connect to vault");
  auto latest = (*control)->LatestRecoveryPoint(opt.item);
  if (!latest.ok()) return std::move(latest.take_status()).InPhase("connect to vault");
  if (opt.block_size == 0) opt.block_size = BlockSizeOfLatest(*latest, disks);
  for (auto& d : disks) {
    d->blocks = (d->size + opt.block_size - 1) / opt.block_size;
    d->new_hashes.resize(d->blocks);
    VMSNAP_RETURN_IF_ERROR(PlanDisk(*d, opt, *latest, **control));
  }

  auto ms_since = [](Clock::time_point from) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - from).count();
  };
  json phases_ms = {{"prepare", ms_since(t0)}};
  const auto consistency_start = Clock::now();

  // 3. A consistent view: leftover recovery, scripts, freeze, snapshot, thaw. `view` owns
  // the snapshot and deletes it when it goes out of scope (any failure below) or at step 5.
  if (opt.on_progress)
    opt.on_progress(
        {{"phase", "consistency"}, {"bytes_done", 0}, {"bytes_total", 0}, {"bytes_uploaded", 0}});
  json leftover_evidence;
  auto view = PrepareView(opt, leftover_evidence);
  if (!view.ok()) return view.take_status();
  if (view->disks().size() != disks.size())
    return Status::Internal("consistency view has " + std::to_string(view->disks().size()) +
                            " disks for " + std::to_string(disks.size()))
        .InPhase("consistency");
  const json& view_disks = view->evidence().value("disks", json::array());
  for (auto& d : disks) {
    const DiskToRead& r = view->disks()[d->index];
    if (r.disk != d->path)
      return Status::Internal("consistency view lists " + r.disk + " where " + d->path +
                              " was expected")
          .InPhase("consistency");
    d->read_path = r.read_path;
    d->guarded = r.guarded_read;
    if (static_cast<size_t>(d->index) < view_disks.size())
      d->provider = view_disks[d->index].value("provider", "");
    if (r.volume_shadows.empty()) {
      auto reader = env->OpenDiskForRead(d->read_path);
      if (!reader.ok()) return std::move(reader.take_status()).InPhase("open snapshot");
      d->reader = std::move(*reader);
    } else {
      auto composed = OpenComposedDisk(*env, r);
      if (!composed.ok()) return std::move(composed.take_status()).InPhase("open snapshot");
      d->composition = CompositionEvidence(**composed);
      d->reader = std::move(*composed);
    }
    if (d->reader->size() != d->size)
      return Status::Error(Code::kConflict,
                           "the snapshot " + d->read_path + " of disk " + d->path + " holds " +
                               std::to_string(d->reader->size()) + " bytes, the disk " +
                               std::to_string(d->size),
                           "a loop device with an offset or size limit cannot be snapshotted "
                           "by cloning its backing file; use the command provider")
          .InPhase("open snapshot");
  }
  if (opt.cancel && opt.cancel->load()) return CancelledStatus();

  phases_ms["consistency"] = ms_since(consistency_start);
  const auto transfer_start = Clock::now();

  // 4. Session, then the pipeline over the snapshot. A guarded (live) read of an image file
  // is valid only if the file's identity did not change while it was read: retry once.
  auto session = (*control)->CreateSession(opt.item);
  if (!session.ok()) return std::move(session.take_status()).InPhase("start backup session");
  std::vector<std::unique_ptr<VaultClient>> upload_clients;
  for (int i = 0; i < opt.uploaders; ++i) {
    auto c = VaultClient::Create(opt.client);
    if (!c.ok()) return std::move(c.take_status()).InPhase("connect to vault");
    upload_clients.push_back(std::move(*c));
  }
  uint64_t total_bytes = 0;
  for (auto& d : disks) total_bytes += d->size;
  ProgressReporter progress("backup", total_bytes, opt.progress);
  json guarded_reads = json::array();
  for (int attempt = 1;; ++attempt) {
    for (auto& d : disks) {
      if (!d->guarded) continue;
      auto id = d->reader->Identity();
      if (!id.ok()) return std::move(id.take_status()).InPhase("read disk");
      d->identity_before = *id;
    }
    VMSNAP_RETURN_IF_ERROR(Transfer(disks, opt, upload_clients, progress));
    std::string changed;
    for (auto& d : disks) {
      if (!d->guarded) continue;
      auto after = d->reader->Identity();
      if (!after.ok()) return std::move(after.take_status()).InPhase("read disk");
      const bool unchanged = *after == d->identity_before;
      guarded_reads.push_back(
          {{"disk", d->path}, {"attempt", attempt}, {"unchanged_during_read", unchanged}});
      if (!unchanged) changed += (changed.empty() ? "" : ", ") + d->path;
    }
    if (changed.empty()) break;
    if (attempt >= 2)
      return Status::Error(Code::kConflict,
                           "image file " + changed +
                               " was modified while it was read, twice (size, mtime or "
                               "ctime changed), so no consistent copy was read",
                           "stop writing to it during the backup, keep it on a reflink-capable "
                           "filesystem (btrfs, XFS with reflink=1) so it can be cloned, or "
                           "configure the command snapshot provider")
          .InPhase("read disk");
    spdlog::warn("image file {} was modified while it was read; reading it once more", changed);
    for (auto& d : disks) ResetForRetry(*d);
  }

  phases_ms["transfer"] = ms_since(transfer_start);
  const auto commit_start = Clock::now();

  // 5. Every block is read: close the readers and delete the snapshot.
  for (auto& d : disks) d->reader.reset();
  BackupReport report;
  report.phases_ms = phases_ms;
  report.item = opt.item;
  report.consistency = view->level_name();
  report.evidence = view->evidence();
  report.evidence["leftover_freeze"] = leftover_evidence;
  report.evidence["guarded_reads"] = guarded_reads;
  for (const auto& d : disks)
    if (!d->composition.is_null() && report.evidence["disks"].is_array() &&
        static_cast<size_t>(d->index) < report.evidence["disks"].size())
      report.evidence["disks"][d->index].update(d->composition);
  // VSS: Cleanup() is BackupComplete, after which writers of a full backup may truncate their
  // logs, so it waits for the vault's commit (step 6); a backup that ends before it leaves the
  // view to its destructor, which aborts the VSS backup. Other snapshots go now.
  const bool complete_after_commit = view->evidence().contains("vss");
  auto release_view = [&] {
    Status cleanup = view->Cleanup();
    if (!cleanup.ok()) {
      spdlog::warn("{}", cleanup.ToString());
      report.evidence["snapshot_cleanup_error"] = cleanup.ToString();
    }
  };
  if (!complete_after_commit) release_view();
  const std::string consistency = report.consistency;
  const uint32_t bs = opt.block_size;

  // 6. Manifests, then the atomic commit.
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
    r.read_path = d->read_path;
    r.provider = d->provider;
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
  if (complete_after_commit) {
    release_view();
    // The writers' states after BackupComplete: in this report, not in the committed one.
    report.evidence["vss"] = view->evidence()["vss"];
  }

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
  report.phases_ms["commit"] = ms_since(commit_start);
  report.duration_ms = ms_since(t0);
  progress.Done();
  return report;
}

}  // namespace vmsnap::agent

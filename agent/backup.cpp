#include "agent/backup.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "agent/bounded_queue.hpp"
#include "agent/composed_disk_reader.hpp"
#include "agent/local_state.hpp"
#include "agent/progress.hpp"
#include "agent/scratch.hpp"
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
          {"blocks_hashed", blocks_hashed},
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
          {"phases_ms", phases_ms},
          {"bytes_sent", bytes_sent},
          {"peak_memory_bytes", peak_memory_bytes},
          {"disks", d}};
}

namespace {

enum class Mode { kFull, kLocalState, kVaultMap };

// Blocks per segment: the unit a worker reads, hashes and encodes (4 MiB of the disk).
uint64_t SegmentBlocks(uint32_t bs) {
  return std::max<uint64_t>(1, (4ull << 20) / bs);
}

// Everything the pipeline knows about one disk. Counters are atomics (workers and uploaders
// update them concurrently). What grows with the disk or with the changes is kept in scratch
// files, not in memory (docs/ARCHITECTURE.md, "Memory bounds"); each range of them is written
// only by the worker owning that segment.
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
  std::unique_ptr<DiskStateReader> old_state;  // kLocalState: the hashes of the last backup
  // kVaultMap: the parent's resolved map, the entry of block i in slot i (agent/scratch.hpp).
  std::unique_ptr<platform::ScratchFile> parent_map;
  // The new XXH3 hash of block i at i * 16 (saved as the next local state after the commit).
  std::unique_ptr<platform::ScratchFile> new_hashes;
  // This backup's manifest entries: the n entries of the segment starting at block b lie in
  // slots b .. b+n-1, in index order; segment_entries[b / SegmentBlocks(bs)] holds n.
  std::unique_ptr<platform::ScratchFile> entries;
  std::vector<uint32_t> segment_entries;
  platform::FileIdentity identity_before;
  // A physical drive read through its volumes' shadow copies: what came from where (merged
  // into the consistency evidence of this disk); null otherwise.
  json composition;

  std::atomic<uint64_t> zero{0}, read{0}, changed{0}, hashed{0}, uploaded{0}, bytes_uploaded{0},
      bytes_changed{0}, bytes_done{0};
};

struct Segment {
  DiskJob* disk;
  uint64_t first_block;
  uint64_t count;
  uint64_t index_in_disk;
};

// What one worker reuses from segment to segment.
struct WorkerBuffers {
  explicit WorkerBuffers(uint64_t seg_blocks, uint32_t bs)
      : data(seg_blocks * bs),
        has_data(seg_blocks),
        old_hashes(seg_blocks),
        new_hashes(seg_blocks) {}
  std::vector<std::byte> data;
  std::vector<char> has_data;
  std::vector<platform::ByteRange> data_ranges;  // the segment's data, clipped to it, ascending
  std::vector<FastHash> old_hashes, new_hashes;
  std::vector<ManifestEntry> entries;
  std::vector<ManifestEntry> parent_entries;  // kVaultMap: the parent's entry of each block
  std::string slot_buffer;
};

// Ids of blocks already queued in this backup, so that the same content is encoded and sent
// once. Bounded: when it holds kMaxIds it starts over (a block seen again after that is only
// sent to the vault's "missing" query again, which filters it out). 256 Ki ids cover 8 GiB of
// distinct data at 32 KiB blocks in about 20 MiB.
class QueuedIds {
 public:
  static constexpr size_t kMaxIds = 256 * 1024;
  // True the first time `id` is seen (since the last start-over).
  bool Insert(const BlockId& id) {
    std::lock_guard lock(mu_);
    if (ids_.size() >= kMaxIds) ids_.clear();
    return ids_.insert(id).second;
  }

 private:
  std::mutex mu_;
  std::unordered_set<BlockId, BlockIdHash> ids_;
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
  auto state = DiskStateReader::Open(d.state_path);
  if (state.ok()) {
    const DiskStateInfo& s = (*state)->info();
    if (s.recovery_point == d.parent && s.vault_url == opt.client.url && s.item == opt.item &&
        s.disk_size == d.size && s.block_size == opt.block_size && s.blocks == d.blocks) {
      d.mode = Mode::kLocalState;
      d.old_state = std::move(*state);
      return Status::Ok();
    }
  }
  spdlog::info(
      "disk {}: local change-tracking state {} the latest recovery point; comparing "
      "with the vault's block map instead",
      d.path, state.ok() ? "does not match" : "is missing for");
  auto scratch = CreateScratch(opt.state_dir);
  if (!scratch.ok()) return scratch.take_status();
  d.parent_map = std::move(*scratch);
  std::string buf;
  Status st = control.ResolvedManifestPages(
      d.parent, parent_index, opt.map_page_entries, [&](const Manifest& page) -> Status {
        return WriteEntriesAtTheirIndex(*d.parent_map, page.entries, d.blocks, buf);
      });
  if (!st.ok()) return std::move(st).InPhase("read parent block map");
  d.mode = Mode::kVaultMap;
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

// Writes what a segment found to its disk's scratch files: the new hashes and the entries.
// Hashes of a segment that is all zero are not written: the fresh scratch file reads as zero
// there (a retried transfer starts with a new one), so a sparse disk costs no writes.
Status RecordSegment(const Segment& seg, WorkerBuffers& w) {
  DiskJob& d = *seg.disk;
  std::span<const FastHash> hashes(w.new_hashes.data(), seg.count);
  if (std::any_of(hashes.begin(), hashes.end(), [](const FastHash& h) { return h != FastHash{}; }))
    VMSNAP_RETURN_IF_ERROR(
        d.new_hashes->WriteAt(seg.first_block * sizeof(FastHash), std::as_bytes(hashes)));
  d.segment_entries[seg.index_in_disk] = static_cast<uint32_t>(w.entries.size());
  return WriteEntrySlots(*d.entries, seg.first_block, w.entries, w.slot_buffer);
}

// Reads [off, off + dst.size()) into `dst`: what lies inside `ranges` (ascending, from
// DiskReader::NextData) from the disk, the holes between them as zeros without reading them.
// A block that is partly a hole (a small write into a sparse image) is then read without the
// kernel zeroing page cache pages for its hole, and without the readahead that a miss starts
// (8 MiB on some virtual disks) zeroing more of the hole after it: in the profile of an
// incremental of the bench's image that zeroing was 8 % of all CPU samples. `cursor` is the
// first range that may still overlap; pass 0 for a new segment and the same variable after.
Status ReadDataParts(platform::DiskReader& reader, std::span<const platform::ByteRange> ranges,
                     size_t& cursor, uint64_t off, std::span<std::byte> dst) {
  const uint64_t end = off + dst.size();
  while (cursor < ranges.size() && ranges[cursor].end <= off) ++cursor;
  uint64_t pos = off;
  for (size_t r = cursor; r < ranges.size() && ranges[r].begin < end; ++r) {
    const uint64_t b = std::max(ranges[r].begin, pos), e = std::min(ranges[r].end, end);
    if (b >= e) continue;
    std::fill(dst.begin() + static_cast<ptrdiff_t>(pos - off),
              dst.begin() + static_cast<ptrdiff_t>(b - off), std::byte{0});
    VMSNAP_RETURN_IF_ERROR(reader.ReadAt(b, dst.subspan(b - off, e - b)));
    pos = e;
  }
  std::fill(dst.begin() + static_cast<ptrdiff_t>(pos - off), dst.end(), std::byte{0});
  return Status::Ok();
}

// While a backup runs, tells the vault every `interval` that its agent is alive, so that a vault
// which hears nothing for 5 intervals can take the agent as gone (killed, its VM stopped) and
// stop holding cleanup back for it. A thread of its own; each call on a fresh connection with
// one attempt and a short timeout. Stopped and joined on destruction (at most one call's timeout
// later). Failures are logged, not fatal: if the vault dropped the session, the commit says so.
class SessionKeepalive {
 public:
  SessionKeepalive(const ClientOptions& options, std::string session,
                   std::chrono::seconds interval) {
    if (interval.count() <= 0) return;
    ClientOptions once = options;
    once.max_attempts = 1;
    once.io_timeout = std::chrono::seconds(10);
    thread_ = std::thread([this, once, session = std::move(session), interval] {
      std::unique_lock lock(mu_);
      while (!cv_.wait_for(lock, interval, [&] { return stop_; })) {
        lock.unlock();
        auto client = VaultClient::Create(once);
        Status st = client.ok() ? (*client)->KeepSessionAlive(session) : client.status();
        lock.lock();
        if (st.code() == Code::kNotFound) {
          spdlog::warn(
              "backup session {}: the vault does not know it any more (its cleanup took this "
              "agent as gone, or the vault is older than this agent); the commit will tell",
              session);
          return;
        }
        if (!st.ok()) spdlog::warn("backup session {}: keepalive: {}", session, st.ToString());
      }
    });
  }
  ~SessionKeepalive() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  SessionKeepalive(const SessionKeepalive&) = delete;
  SessionKeepalive& operator=(const SessionKeepalive&) = delete;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

// A failed read of a disk being backed up (its cause names the disk and the offset), with what
// the operator does about it.
Status DiskReadFailed(Status st) {
  return std::move(st)
      .WithFix(
          "the disk or the device under it failed to read: check the kernel log (dmesg) and the "
          "device. Nothing was committed; once it reads again, the next backup sends only what "
          "changed since the last recovery point")
      .InPhase("read disk");
}

void ProcessSegment(const Segment& seg, uint32_t bs, WorkerBuffers& w,
                    BoundedQueue<UploadItem>& queue, QueuedIds& queued, FailureLatch& failure) {
  DiskJob& d = *seg.disk;
  auto& buf = w.data;
  auto& has_data = w.has_data;
  if (d.mode == Mode::kLocalState) {
    Status st = d.old_state->ReadHashes(seg.first_block, std::span(w.old_hashes.data(), seg.count));
    if (!st.ok()) return failure.Set(std::move(st).InPhase("read change-tracking state"));
  }
  if (d.mode == Mode::kVaultMap) {
    Status st =
        ReadEntrySlots(*d.parent_map, seg.first_block, seg.count, w.parent_entries, w.slot_buffer);
    if (!st.ok()) return failure.Set(std::move(st).InPhase("read parent block map"));
  }
  const uint64_t start = seg.first_block * bs;
  const uint64_t end = std::min(d.size, start + seg.count * bs);
  // Which blocks hold data? Holes of sparse files are never read.
  std::fill(has_data.begin(), has_data.begin() + static_cast<long>(seg.count), 0);
  w.data_ranges.clear();
  for (uint64_t off = start; off < end;) {
    auto range = d.reader->NextData(off);
    if (!range.ok()) return failure.Set(DiskReadFailed(range.take_status()));
    if (!*range || (*range)->begin >= end) break;
    uint64_t b = std::max((*range)->begin, start), e = std::min((*range)->end, end);
    for (uint64_t i = (b - start) / bs; i <= (e - 1 - start) / bs; ++i) has_data[i] = 1;
    w.data_ranges.push_back({b, e});
    off = (*range)->end;
  }
  for (const auto& r : w.data_ranges) d.reader->WillRead(r.begin, r.end - r.begin);
  size_t range_cursor = 0;
  // Read runs of data blocks with one call each, in pieces small enough to stay in the CPU's
  // cache while they are hashed right after the read (4 MiB reads then hashing was slower).
  const uint64_t piece_blocks = std::max<uint64_t>(1, kHashPieceBytes / bs);
  std::vector<ManifestEntry>& local_entries = w.entries;
  local_entries.clear();
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
      Status st = ReadDataParts(*d.reader, w.data_ranges, range_cursor, off,
                                std::span(buf.data() + i * bs, len));
      if (!st.ok()) return failure.Set(DiskReadFailed(std::move(st)));
    }
    for (; i < j; ++i) {
      const uint64_t idx = seg.first_block + i;
      const uint64_t len = std::min<uint64_t>(bs, end - (start + i * bs));
      std::span<const std::byte> block(buf.data() + i * bs, len);
      d.bytes_done += len;
      if (has_data[i]) d.read++;
      if (!has_data[i] || IsAllZero(block)) {
        w.new_hashes[i] = FastHash{};
        d.zero++;
        bool was_data = d.mode == Mode::kLocalState ? w.old_hashes[i] != FastHash{}
                        : d.mode == Mode::kVaultMap ? w.parent_entries[i].id.has_value()
                                                    : false;
        if (was_data) {
          local_entries.push_back({idx, std::nullopt});
          d.changed++;
        }
        continue;
      }
      FastHash fh = FastHashBlock(block);
      w.new_hashes[i] = fh;
      if (d.mode == Mode::kLocalState && w.old_hashes[i] == fh) continue;
      // Without local state, the parent's check (where its manifest has one) tells as much as
      // its id: the same bytes have the same XXH3-128. Only the other blocks get a SHA-256.
      if (d.mode == Mode::kVaultMap && w.parent_entries[i].id && w.parent_entries[i].check == fh)
        continue;
      BlockId id = Sha256Block(block);
      d.hashed++;
      if (d.mode == Mode::kVaultMap && w.parent_entries[i].id == id) continue;
      local_entries.push_back({idx, id, fh});
      d.changed++;
      d.bytes_changed += len;
      if (!queued.Insert(id)) continue;  // same content already queued in this backup
      EncodedBlock enc = EncodeBlock(id, block);
      group.payload_bytes += enc.payload.size();
      group.blocks.push_back(std::move(enc));
      if (group.payload_bytes >= kUploadGroupBytes && !push_group()) return;
    }
  }
  if (!push_group()) return;
  if (Status st = RecordSegment(seg, w); !st.ok())
    failure.Set(std::move(st).InPhase("record changed blocks"));
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
  const uint64_t seg_blocks = SegmentBlocks(bs);
  std::vector<Segment> segments;
  {
    std::vector<std::vector<Segment>> per_disk;
    for (auto& d : disks) {
      per_disk.emplace_back();
      for (uint64_t b = 0; b < d->blocks; b += seg_blocks)
        per_disk.back().push_back(
            {d.get(), b, std::min(seg_blocks, d->blocks - b), b / seg_blocks});
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
  QueuedIds queued;
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
      WorkerBuffers buffers(seg_blocks, bs);
      for (size_t s; !failure.failed() && (s = next_segment++) < segments.size();)
        ProcessSegment(segments[s], bs, buffers, queue, queued, failure);
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
Status ResetForRetry(DiskJob& d, const std::string& state_dir) {
  auto hashes = CreateScratch(state_dir);
  if (!hashes.ok()) return hashes.take_status();
  d.new_hashes = std::move(*hashes);
  std::fill(d.segment_entries.begin(), d.segment_entries.end(), 0);
  d.zero = 0;
  d.read = 0;
  d.changed = 0;
  d.hashed = 0;
  d.bytes_changed = 0;
  d.bytes_done = 0;
  return Status::Ok();
}

// Sends the manifest of disk `d` from its entry scratch file, encoding it as it goes: in one
// request when it fits in `part_bytes`, else in parts followed by a seal, so that neither the
// agent nor one request ever holds the manifest of a large disk whole.
Status SendManifest(DiskJob& d, uint32_t bs, const std::string& parent, uint64_t part_bytes,
                    VaultClient& control, const std::string& session) {
  const uint64_t seg_blocks = SegmentBlocks(bs);
  uint64_t count = 0;
  for (uint32_t n : d.segment_entries) count += n;
  ManifestEncoder encoder(d.size, bs, parent, count);
  std::vector<ManifestEntry> entries;
  std::string buf;
  uint64_t sent = 0;
  for (size_t s = 0; s < d.segment_entries.size(); ++s) {
    if (d.segment_entries[s] == 0) continue;
    VMSNAP_RETURN_IF_ERROR(
        ReadEntrySlots(*d.entries, s * seg_blocks, d.segment_entries[s], entries, buf));
    for (const auto& e : entries) encoder.Add(e);
    if (encoder.pending_bytes() >= part_bytes) {
      std::string part = encoder.Take();
      const uint64_t size = part.size();
      VMSNAP_RETURN_IF_ERROR(control.PutManifestPart(session, d.index, sent, std::move(part)));
      sent += size;
    }
  }
  auto rest = encoder.Finish();
  if (!rest.ok()) return rest.take_status();
  if (sent == 0) return control.PutManifest(session, d.index, std::move(*rest));
  const uint64_t size = sent + rest->size();
  VMSNAP_RETURN_IF_ERROR(control.PutManifestPart(session, d.index, sent, std::move(*rest)));
  return control.SealManifest(session, d.index, size);
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
    d->segment_entries.assign(
        (d->blocks + SegmentBlocks(opt.block_size) - 1) / SegmentBlocks(opt.block_size), 0);
    for (auto* file : {&d->new_hashes, &d->entries}) {
      auto scratch = CreateScratch(opt.state_dir);
      if (!scratch.ok()) return scratch.take_status();
      *file = std::move(*scratch);
    }
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
  auto session = (*control)->CreateSession(opt.item, opt.session_keepalive);
  if (!session.ok()) return std::move(session.take_status()).InPhase("start backup session");
  // Every way out before the commit succeeds gives the session up (best effort), so that the
  // vault's cleanup is not held up for the item until the session times out.
  struct AbandonUnlessCommitted {
    const ClientOptions& options;
    const std::string& session;
    bool committed = false;
    ~AbandonUnlessCommitted() {
      if (committed) return;
      // One attempt on a connection of its own with a short timeout: the backup has failed
      // already, maybe because the vault is unreachable, and its error should not wait long.
      ClientOptions once = options;
      once.max_attempts = 1;
      once.io_timeout = std::chrono::seconds(10);
      auto client = VaultClient::Create(once);
      Status st = client.ok() ? (*client)->AbandonSession(session) : client.status();
      if (!st.ok())
        spdlog::debug("could not abandon backup session {}: {}", session, st.ToString());
    }
  } abandon{opt.client, *session};
  SessionKeepalive keepalive(opt.client, *session, opt.session_keepalive);
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
    for (auto& d : disks) VMSNAP_RETURN_IF_ERROR(ResetForRetry(*d, opt.state_dir));
  }

  phases_ms["transfer"] = ms_since(transfer_start);
  const auto commit_start = Clock::now();

  // 5. Every block is read: close the readers and delete the snapshot.
  for (auto& d : disks) {
    d->reader.reset();
    d->old_state.reset();
    d->parent_map.reset();
  }
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
    const std::string parent = d->mode == Mode::kFull ? "" : d->parent;
    Status st = SendManifest(*d, bs, parent, std::max<uint64_t>(1, opt.manifest_part_bytes),
                             **control, *session);
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
    r.parent = parent;
    r.blocks_total = d->blocks;
    r.blocks_zero = d->zero;
    r.blocks_read = d->read;
    r.blocks_changed = d->changed;
    r.blocks_hashed = d->hashed;
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
  report.peak_memory_bytes = platform::PeakResidentBytes();
  commit["report"] = report.ToJson();
  commit["origin"] = opt.origin;
  if (opt.cancel && opt.cancel->load()) return CancelledStatus();  // last safe point
  auto rp = (*control)->Commit(*session, commit);
  if (!rp.ok()) return std::move(rp.take_status()).InPhase("commit recovery point");
  abandon.committed = true;
  report.recovery_point = rp->value("id", "");
  if (complete_after_commit) {
    release_view();
    // The writers' states after BackupComplete: in this report, not in the committed one.
    report.evidence["vss"] = view->evidence()["vss"];
  }

  // 7. Remember what was backed up, for the next incremental.
  for (auto& d : disks) {
    DiskStateInfo info{opt.client.url, opt.item, DiskKey(d->path), report.recovery_point,
                       d->size,        bs,       d->blocks};
    Status st = SaveDiskState(d->state_path, info, [&](uint64_t first, std::span<FastHash> out) {
      return d->new_hashes->ReadAt(first * sizeof(FastHash), std::as_writable_bytes(out));
    });
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
  report.peak_memory_bytes = platform::PeakResidentBytes();
  progress.Done();
  return report;
}

}  // namespace vmsnap::agent

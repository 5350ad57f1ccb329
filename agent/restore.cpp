#include "agent/restore.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "agent/progress.hpp"
#include "agent/scratch.hpp"
#include "agent/vault_client.hpp"
#include "common/aligned_buffer.hpp"
#include "common/cli_output.hpp"
#include "common/manifest.hpp"
#include "platform/env.hpp"

namespace vmsnap::agent {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

json RestoreDiskReport::ToJson() const {
  return {{"index", index},
          {"source", source},
          {"target", target},
          {"size_bytes", size_bytes},
          {"blocks_total", blocks_total},
          {"blocks_data", blocks_data},
          {"blocks_zero", blocks_zero},
          {"bytes_fetched", bytes_fetched}};
}

json RestoreReport::ToJson() const {
  json d = json::array();
  for (const auto& disk : disks) d.push_back(disk.ToJson());
  return {{"recovery_point", recovery_point},
          {"consistency", consistency},
          {"duration_ms", duration_ms},
          {"bytes_received", bytes_received},
          {"disks", d}};
}

namespace {

struct DiskTarget {
  RestoreDiskReport report;
  uint64_t disk_size = 0;
  uint32_t block_size = 0;
  uint64_t block_count() const { return (disk_size + block_size - 1) / block_size; }
  // The resolved map's data entries, in index order, one per slot (agent/scratch.hpp): read
  // from the vault page by page and kept out of memory.
  std::unique_ptr<platform::ScratchFile> map;
  uint64_t map_entries = 0;
  std::string write_path;  // target, or target.vmsnap-partial for a new file
  std::unique_ptr<platform::DiskWriter> writer;
  std::atomic<uint64_t> data_done{0}, fetched{0};
};

// A failed write or flush of d's target, with what the operator does about it.
Status TargetFailed(Status st, const DiskTarget& d) {
  if (st.code() == Code::kResourceExhausted)
    return std::move(st).WithFix("free space on the filesystem of " + d.report.target +
                                 " (or raise its quota), or restore to another place with --to");
  return std::move(st).WithFix("check the restore target " + d.report.target +
                               ": the kernel log (dmesg) for errors of its device, its "
                               "permissions; or restore to another place with --to");
}

struct Batch {
  DiskTarget* disk;
  uint64_t begin, end;  // range of map slots
};

// A fetcher's buffers, kept from one batch to the next: fresh memory costs a page fault per
// 4 KiB on first touch, which on a VM is a large part of a restore's time.
struct FetchBuffers {
  // The vault's answer; the fetched views point into it. Each fetch reads the next answer into
  // this string's memory (VaultClient::Fetch).
  std::string body;
  AlignedBuffer run;                   // one run of consecutive blocks, decoded
  std::vector<ManifestEntry> entries;  // the batch's part of the map
  std::string slots;
};

Status RestoreBatch(const Batch& b, VaultClient& client, const std::string& rp,
                    FetchBuffers& buffers) {
  DiskTarget& d = *b.disk;
  const uint32_t bs = d.block_size;
  std::vector<ManifestEntry>& entries = buffers.entries;
  VMSNAP_RETURN_IF_ERROR(ReadEntrySlots(*d.map, b.begin, b.end - b.begin, entries, buffers.slots));
  std::vector<BlockId> ids;
  for (const auto& e : entries) {
    if (!e.id) return Status::Internal("the restore's block map holds a zero entry");
    if (std::find(ids.begin(), ids.end(), *e.id) == ids.end()) ids.push_back(*e.id);
  }
  auto blocks = client.Fetch(ids, buffers.body);
  if (!blocks.ok()) {
    Status st = blocks.take_status();
    if (st.code() == Code::kCorruption || st.code() == Code::kNotFound)
      return Status::Error(
          st.code(),
          "disk " + std::to_string(d.report.index) + " of recovery point " + rp + ": " + st.cause(),
          "the vault's copy of this block is damaged or missing; restore "
          "another recovery point");
    return st;
  }
  if (blocks->size() != ids.size()) return Status::Unavailable("the vault sent a short batch");
  std::unordered_map<BlockId, const BlockRecordView*, BlockIdHash> encoded;
  for (const auto& enc : *blocks) {
    encoded.emplace(enc.id, &enc);
    d.fetched += enc.payload.size();
  }
  // Runs of consecutive blocks go out as one write from an aligned buffer: large aligned writes
  // may bypass the page cache (DiskWriter::kDirectAlignment), about twice as fast here as
  // buffered writes and the final fsync (docs/PERFORMANCE.md). Blocks are decoded (and
  // verified) straight into that buffer.
  constexpr size_t kAlign = platform::DiskWriter::kDirectAlignment;
  static_assert(AlignedBuffer::kAlignment % kAlign == 0);
  AlignedBuffer& run = buffers.run;
  for (size_t i = 0; i < entries.size();) {
    const uint64_t first = entries[i].index;
    size_t j = i;
    while (j < entries.size() && entries[j].index == first + (j - i)) ++j;
    const uint64_t off = first * bs;
    const uint64_t run_len = std::min<uint64_t>((j - i) * uint64_t{bs}, d.disk_size - off);
    const size_t need = (run_len + kAlign - 1) / kAlign * kAlign;
    run.Reserve(need);
    for (size_t k = i; k < j; ++k) {
      const auto& e = entries[k];
      auto it = encoded.find(*e.id);
      if (it == encoded.end())
        return Status::Unavailable("the vault left out block " + e.id->Hex());
      const uint64_t len = std::min<uint64_t>(bs, d.disk_size - e.index * bs);
      Status st = DecodeBlockInto(*it->second, std::span(run.bytes() + (k - i) * bs, len),
                                  e.check ? &*e.check : nullptr);
      if (!st.ok())
        return Status::Corruption(
            "block " + std::to_string(e.index) + " (id " + e.id->Hex() + ") of disk " +
                std::to_string(d.report.index) + " in recovery point " + rp +
                " is corrupt on the vault: " + st.cause(),
            "the vault's copy of this block is damaged; restore another recovery point");
    }
    if (Status st = d.writer->WriteAt(off, std::span(run.bytes(), run_len)); !st.ok())
      return TargetFailed(std::move(st), d);
    d.data_done += j - i;
    i = j;
  }
  return Status::Ok();
}

// Refuses a target, before anything is written to it, whose filesystem has less free space
// than the disk's data takes there, counted together with this restore's other targets on the
// same filesystem (`needed_on`, by StorageInfo::filesystem). A new file takes the disk's data
// (its zero blocks stay holes). An existing regular file, restored in place, takes at least
// the data less what the file holds now: a lower bound, so a pass may still meet a full
// filesystem (the write then fails with the same fix); only a filesystem that compresses or
// deduplicates can take less than it (RestoreOptions::check_space). Devices take nothing. Free
// space counts what only root may take: an agent without root that runs out of it fails at the
// write. Whatever cannot be looked up is left to the writes.
Status CheckTargetSpace(const DiskTarget& d, bool exists, const std::string& rp,
                        std::unordered_map<uint64_t, uint64_t>& needed_on) {
  std::error_code ec;
  const fs::path target = fs::absolute(d.report.target, ec);
  if (ec) return Status::Ok();
  auto info =
      platform::Env::Default()->StorageOf(exists ? target.string() : target.parent_path().string());
  if (!info.ok() || (exists && !info->regular_file)) return Status::Ok();
  const uint64_t data = d.map_entries * uint64_t{d.block_size};
  const uint64_t held = exists ? info->allocated_bytes : 0;
  if (data <= held) return Status::Ok();
  const uint64_t need = data - held;
  const fs::space_info space = fs::space(target.parent_path(), ec);
  if (ec) return Status::Ok();
  uint64_t& before = needed_on[info->filesystem];
  if (before + need <= space.free) {
    before += need;
    return Status::Ok();
  }
  std::string cause = "disk " + std::to_string(d.report.index) + " of recovery point " + rp +
                      " holds " + HumanBytes(data) + " of data";
  if (exists)
    cause += ", at least " + HumanBytes(need) + " more than the existing file " + d.report.target +
             " takes now, and its filesystem has ";
  else
    cause += " and the filesystem of " + d.report.target + " has ";
  cause += HumanBytes(space.free) + " free";
  if (before > 0) cause += " (" + HumanBytes(before) + " of it for the other disks restored there)";
  std::string fix = "free space on that filesystem, or restore to another place with --to";
  if (exists) fix += "; " + d.report.target + " was not changed";
  fix += " (--no-space-check writes anyway, for a filesystem that compresses)";
  return Status::Error(Code::kResourceExhausted, cause, fix).InPhase("prepare restore");
}

// Makes every block the map does not list read as zero (only for targets not created empty):
// a hole punched in a file target (no space, no writes), else zeros written.
Status ZeroGaps(DiskTarget& d) {
  if (d.writer->starts_zeroed()) return Status::Ok();
  const uint64_t bs = d.block_size;
  std::vector<std::byte> zeros(4u << 20);
  uint64_t next = 0;  // first block not yet covered
  auto fill = [&](uint64_t from_block, uint64_t to_block) -> Status {
    uint64_t off = from_block * bs, end = std::min(d.disk_size, to_block * bs);
    if (off < end && d.writer->PunchHole(off, end - off)) return Status::Ok();
    while (off < end) {
      uint64_t n = std::min<uint64_t>(zeros.size(), end - off);
      if (Status st = d.writer->WriteAt(off, std::span(zeros.data(), n)); !st.ok())
        return TargetFailed(std::move(st), d);
      off += n;
    }
    return Status::Ok();
  };
  std::vector<ManifestEntry> entries;
  std::string slots;
  for (uint64_t first = 0; first < d.map_entries; first += 65536) {
    VMSNAP_RETURN_IF_ERROR(ReadEntrySlots(
        *d.map, first, std::min<uint64_t>(65536, d.map_entries - first), entries, slots));
    for (const auto& e : entries) {
      if (e.index > next) VMSNAP_RETURN_IF_ERROR(fill(next, e.index));
      next = e.index + 1;
    }
  }
  return fill(next, d.block_count());
}

}  // namespace

Result<RestoreReport> RunRestore(const RestoreOptions& opt) {
  const auto t0 = Clock::now();
  auto* env = platform::Env::Default();
  auto control = VaultClient::Create(opt.client);
  if (!control.ok()) return std::move(control.take_status()).InPhase("connect to vault");
  auto rp = (*control)->GetRecoveryPoint(opt.recovery_point);
  if (!rp.ok()) return std::move(rp.take_status()).InPhase("find recovery point");
  const json& rp_disks = (*rp)["disks"];
  std::vector<int> selected;
  if (opt.disk >= 0) {
    bool found = false;
    for (const auto& d : rp_disks) found |= d.value("index", -1) == opt.disk;
    if (!found)
      return Status::NotFound(
                 "recovery point " + opt.recovery_point + " has no disk " +
                     std::to_string(opt.disk),
                 "it has " + std::to_string(rp_disks.size()) + " disk(s), numbered from 0")
          .InPhase("prepare restore");
    selected.push_back(opt.disk);
  } else {
    for (const auto& d : rp_disks) selected.push_back(d.value("index", 0));
  }
  if (opt.targets.size() != selected.size())
    return Status::InvalidArgument(
               "recovery point " + opt.recovery_point + " selection has " +
                   std::to_string(selected.size()) + " disk(s) but " +
                   std::to_string(opt.targets.size()) + " --to target(s) were given",
               "pass --disk N with one --to, or one --to per disk in disk order")
        .InPhase("prepare restore");

  std::vector<std::unique_ptr<DiskTarget>> disks;
  auto cleanup_partials = [&] {
    for (auto& d : disks)
      if (d->write_path != d->report.target) {
        d->writer.reset();
        std::error_code ec;
        fs::remove(d->write_path, ec);
      }
  };
  // Bytes this restore's targets take on each filesystem (see CheckTargetSpace).
  std::unordered_map<uint64_t, uint64_t> needed_on;
  for (size_t i = 0; i < selected.size(); ++i) {
    auto d = std::make_unique<DiskTarget>();
    d->report.index = selected[i];
    d->report.target = opt.targets[i];
    for (const auto& rd : rp_disks)
      if (rd.value("index", -1) == selected[i]) d->report.source = rd.value("key", "");
    auto scratch = CreateScratch(opt.state_dir);
    if (!scratch.ok()) {
      cleanup_partials();
      return scratch.take_status();
    }
    d->map = std::move(*scratch);
    std::string slots;
    Status map_status = (*control)->ResolvedManifestPages(
        opt.recovery_point, selected[i], opt.map_page_entries, [&](const Manifest& page) {
          d->disk_size = page.disk_size;
          d->block_size = page.block_size;
          VMSNAP_RETURN_IF_ERROR(WriteEntrySlots(*d->map, d->map_entries, page.entries, slots));
          d->map_entries += page.entries.size();
          return Status::Ok();
        });
    if (!map_status.ok()) {
      cleanup_partials();
      return std::move(map_status).InPhase("read block map");
    }
    d->report.size_bytes = d->disk_size;
    d->report.blocks_total = d->block_count();
    d->report.blocks_data = d->map_entries;
    d->report.blocks_zero = d->report.blocks_total - d->report.blocks_data;
    std::error_code ec;
    bool exists = fs::exists(d->report.target, ec);
    d->write_path = exists ? d->report.target : d->report.target + ".vmsnap-partial";
    if (!exists) fs::remove(d->write_path, ec);
    if (Status st = opt.check_space ? CheckTargetSpace(*d, exists, opt.recovery_point, needed_on)
                                    : Status::Ok();
        !st.ok()) {
      cleanup_partials();
      return st;
    }
    auto writer = env->OpenDiskForWrite(d->write_path, d->disk_size);
    if (!writer.ok()) {
      cleanup_partials();
      Status st = writer.take_status();
      if (d->write_path != d->report.target) fs::remove(d->write_path, ec);
      return std::move(st).InPhase("open restore target");
    }
    d->writer = std::move(*writer);
    disks.push_back(std::move(d));
  }

  // Batches of about 4 MiB, interleaved across disks: each fetcher holds about four times
  // that at its peak (response, decoded blocks, write buffer), which bounds restore memory.
  std::vector<Batch> batches;
  {
    std::vector<std::vector<Batch>> per;
    for (auto& d : disks) {
      per.emplace_back();
      const uint64_t step = std::max<uint64_t>(1, (4u << 20) / d->block_size);
      for (uint64_t i = 0; i < d->map_entries; i += step)
        per.back().push_back({d.get(), i, std::min(d->map_entries, i + step)});
    }
    for (size_t k = 0;; ++k) {
      bool any = false;
      for (auto& v : per)
        if (k < v.size()) {
          batches.push_back(v[k]);
          any = true;
        }
      if (!any) break;
    }
  }
  std::vector<std::unique_ptr<VaultClient>> clients;
  for (int i = 0; i < std::max(1, opt.fetchers); ++i) {
    auto c = VaultClient::Create(opt.client);
    if (!c.ok()) {
      cleanup_partials();
      return std::move(c.take_status()).InPhase("connect to vault");
    }
    clients.push_back(std::move(*c));
  }
  std::atomic<size_t> next{0};
  std::mutex err_mu;
  Status first_error;
  std::atomic<bool> failed{false};
  // The progress loop below sleeps on this until the last fetcher ends (then at once, not at its
  // next 200 ms tick).
  std::mutex running_mu;
  std::condition_variable running_cv;
  int running = static_cast<int>(clients.size());
  std::vector<std::thread> threads;
  for (auto& c : clients)
    threads.emplace_back([&, client = c.get()] {
      FetchBuffers buffers;
      for (size_t i; !failed && (i = next++) < batches.size();) {
        Status st = RestoreBatch(batches[i], *client, opt.recovery_point, buffers);
        if (!st.ok()) {
          std::lock_guard lock(err_mu);
          if (first_error.ok()) first_error = std::move(st);
          failed = true;
        }
      }
      {
        std::lock_guard lock(running_mu);
        --running;
      }
      running_cv.notify_all();
    });
  uint64_t total = 0;
  for (auto& d : disks) total += d->map_entries * d->block_size;
  ProgressReporter progress("restore", total, opt.progress);
  for (;;) {
    {
      std::unique_lock lock(running_mu);
      if (running_cv.wait_for(lock, std::chrono::milliseconds(200), [&] { return running == 0; }))
        break;
    }
    uint64_t done = 0;
    for (auto& d : disks) done += d->data_done * d->block_size;
    progress.Update(done);
  }
  for (auto& t : threads) t.join();
  Status st = first_error;
  for (auto& d : disks) {
    if (st.ok()) st = ZeroGaps(*d);
    if (!st.ok()) break;
    if (Status synced = d->writer->Sync(); !synced.ok()) st = TargetFailed(std::move(synced), *d);
  }
  if (!st.ok()) {
    cleanup_partials();
    bool in_place = false;
    for (auto& d : disks) in_place |= d->write_path == d->report.target;
    if (in_place) {
      const std::string overwritten =
          "the existing target was partly overwritten and is incomplete; rerun the restore "
          "after fixing the cause";
      st = Status::Error(st.code(), st.cause(),
                         st.fix().empty() ? overwritten : st.fix() + "; " + overwritten)
               .InPhase(st.phase());
    }
    return std::move(st).InPhase("restore");
  }
  for (auto& d : disks) {
    d->writer.reset();
    if (d->write_path != d->report.target) {
      std::error_code ec;
      fs::rename(d->write_path, d->report.target, ec);
      if (ec)
        return Status::IoError("rename " + d->write_path + ": " + ec.message()).InPhase("restore");
      std::string parent = fs::path(d->report.target).parent_path().string();
      VMSNAP_RETURN_IF_ERROR(env->SyncDir(parent.empty() ? "." : parent));
    }
  }
  RestoreReport report;
  report.recovery_point = opt.recovery_point;
  report.consistency = rp->value("consistency", "");
  for (auto& d : disks) {
    d->report.bytes_fetched = d->fetched;
    report.disks.push_back(d->report);
  }
  report.bytes_received = (*control)->bytes_received();
  for (auto& c : clients) report.bytes_received += c->bytes_received();
  report.duration_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count();
  progress.Done();
  return report;
}

}  // namespace vmsnap::agent

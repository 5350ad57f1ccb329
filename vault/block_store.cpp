#include "vault/block_store.hpp"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <optional>
#include <tuple>
#include <unordered_set>

#include "common/aligned_buffer.hpp"
#include "common/bytes.hpp"
#include "platform/env.hpp"
#include "platform/linux/fd.hpp"
#include "vault/db.hpp"

namespace vmsnap::vault {

namespace fs = std::filesystem;
using platform::Fd;

namespace {

constexpr std::string_view kPackMagic = "VMPACK01";
// Appends start and end on this boundary so that they can bypass the page cache (O_DIRECT);
// the gap after a batch is zeros, and a record header of zeros means "skip to the next
// boundary" (no block has the all-zero SHA-256 as its id).
constexpr uint64_t kAlign = 4096;

uint64_t AlignUp(uint64_t n) {
  return (n + kAlign - 1) / kAlign * kAlign;
}

// Records to append, in a buffer aligned for O_DIRECT and padded with zeros to kAlign. Its
// memory comes from the pool and goes back to it (uploads of a backup follow each other: fresh
// memory for each was 16 % of the vault's CPU in a full backup, zeroing pages on first touch).
class AppendBuffer {
  // Capacity grows in steps, so that a kept buffer fits the next batch of a similar size.
  static constexpr uint64_t kReserveStep = 4 << 20;

 public:
  AppendBuffer(uint64_t payload_bytes, AlignedBufferPool& pool)
      : size_(AlignUp(payload_bytes)), data_(pool) {
    data_->Reserve((size_ + kReserveStep - 1) / kReserveStep * kReserveStep);
    std::memset(data_->data() + payload_bytes, 0, size_ - payload_bytes);
  }
  // Writes one record (header + payload) at the current position.
  void Add(const BlockRecordView& b) {
    WriteRecord(b, Reserve(kRecordHeaderSize + b.payload.size()));
  }
  // The next n bytes, for the caller to fill (a record copied as it is).
  char* Reserve(uint64_t n) {
    char* at = data_->data() + used_;
    used_ += n;
    return at;
  }
  std::string_view view() { return {data_->data(), size_}; }

 private:
  uint64_t size_;
  uint64_t used_ = 0;
  AlignedBufferPool::Lease data_;
};
static_assert(AlignedBuffer::kAlignment % kAlign == 0);
// Pack files kept open for reading (each holds one descriptor, two once a run was read from
// it with O_DIRECT: at most 128 descriptors).
constexpr size_t kMaxOpenPacks = 64;
// Index rows and migrated files per transaction when many are written at once.
constexpr size_t kRowsPerTransaction = 4096;

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Status DamagedBlock(const BlockId& id, const std::string& pack_path, uint64_t offset,
                    const std::string& why) {
  return Status::Corruption(
      "stored block " + id.Hex() + " (" + pack_path + ", offset " + std::to_string(offset) +
          ") is damaged: " + why,
      "restore another recovery point; a full backup (new --state-dir) cannot repair it yet "
      "because the vault still lists the block as present");
}

// Parses one record (header + payload) read from a pack.
Result<EncodedBlock> ParseRecord(std::string_view data) {
  ByteReader r(data);
  BlockRecordView b;
  if (!ReadRecord(r, b) || r.remaining() != 0) return Status::Corruption("bad record");
  return b.ToOwned();
}

Status PreadAll(int fd, uint64_t offset, char* buf, size_t n, const std::string& what) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = ::pread(fd, buf + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return Status::FromErrno(errno, "read " + what);
    if (r == 0) return Status::Corruption(what + " ends early (truncated)");
    done += static_cast<size_t>(r);
  }
  return Status::Ok();
}

// 0, or the errno of the write that failed.
int PwriteErrno(int fd, uint64_t offset, std::string_view data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t r =
        ::pwrite(fd, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return errno;
    done += static_cast<size_t>(r);
  }
  return 0;
}

// What an operator does about a failed write or flush on the vault's disk, by its errno.
std::string DiskWriteFix(int err, const std::string& root) {
  if (err == ENOSPC || err == EDQUOT)
    return "free space on the vault's disk under " + root +
           " (or raise its quota), then try again: a backup run again sends only the blocks "
           "the vault does not have yet";
  if (err == EIO)
    return "the vault's disk under " + root +
           " reported an I/O error: check the kernel log (dmesg) and the device";
  if (err == EROFS)
    return "the vault's disk under " + root +
           " is read-only (the kernel may have remounted it after an error): check the kernel "
           "log, repair the filesystem and remount it read-write";
  return "check free space, permissions and the kernel log for the vault's disk under " + root;
}

Status SyncDir(const std::string& dir) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid() || ::fsync(fd.get()) != 0) return Status::FromErrno(errno, "sync " + dir);
  return Status::Ok();
}

// Pack number of "packs/<digits>.pack", or 0.
int64_t PackNumberOf(const fs::path& p) {
  if (p.extension() != ".pack") return 0;
  std::string stem = p.stem().string();
  if (stem.empty() || stem.size() > 12 ||
      !std::all_of(stem.begin(), stem.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return 0;
  return std::stoll(stem);
}

// A transaction on the index that rolls back unless committed.
class Transaction {
 public:
  explicit Transaction(Db* db) : db_(db) { status_ = db_->Exec("BEGIN IMMEDIATE"); }
  ~Transaction() {
    if (status_.ok() && !done_) (void)db_->Exec("ROLLBACK");
  }
  const Status& status() const { return status_; }
  Status Commit() {
    done_ = true;
    Status st = db_->Exec("COMMIT");
    if (!st.ok()) (void)db_->Exec("ROLLBACK");
    return st;
  }

 private:
  Db* db_;
  Status status_;
  bool done_ = false;
};

// A read transaction on the index: the lookups inside it share one snapshot and one shared
// lock (a statement outside a transaction takes and drops the lock itself, two fcntl calls per
// lookup: a third of a commit's block lookups, docs/PERFORMANCE.md). Ends when destroyed; if
// BEGIN fails, the lookups still run, each on its own.
class ReadTransaction {
 public:
  explicit ReadTransaction(Db* db) : db_(db), began_(db->Exec("BEGIN").ok()) {}
  ~ReadTransaction() {
    if (began_) (void)db_->Exec("COMMIT");
  }
  ReadTransaction(const ReadTransaction&) = delete;
  ReadTransaction& operator=(const ReadTransaction&) = delete;

 private:
  Db* db_;
  bool began_;
};

}  // namespace

struct BlockStore::Pack {
  int64_t number = 0;
  std::string path;
  Fd fd;
  Fd direct_fd;       // active pack: the same file opened with O_DIRECT, when supported
  uint64_t size = 0;  // active pack: bytes appended so far (a multiple of kAlign)
  // Packs opened for reading: the file opened read-only with O_DIRECT at the first run read
  // from it (invalid where the filesystem refuses it), and whether a direct read was refused
  // later (then buffered reads).
  std::once_flag direct_read_open;
  Fd direct_read_fd;
  std::atomic<bool> direct_read_refused{false};
  // Active pack: bytes appended (sync=false) since its last early flush.
  std::atomic<uint64_t> unflushed_bytes{0};

  // fdatasync, one at a time: 0, or the error of this flush or of an earlier one. The kernel
  // reports a write error once per open file, so a failure sticks to the pack (its unflushed
  // bytes may be lost): a concurrent or later flush must not report success after it.
  int Flush() {
    std::lock_guard lock(flush_mu);
    if (flush_failed) return EIO;
    if (::fdatasync(fd.get()) == 0) return 0;
    flush_failed = true;
    return errno;
  }

 private:
  std::mutex flush_mu;
  bool flush_failed = false;  // under flush_mu
};

BlockStore::BlockStore(std::string root, uint64_t pack_target_bytes, size_t max_pending_rows)
    : root_(std::move(root)),
      pack_target_bytes_(pack_target_bytes),
      max_pending_rows_(std::max<size_t>(1, max_pending_rows)) {}

BlockStore::~BlockStore() {
  if (!db_) return;
  std::lock_guard lock(db_mu_);
  if (Status st = FlushPendingLocked(); !st.ok()) {
    if (pending_.empty())
      spdlog::warn(
          "block index: the indexed position was not recorded at shutdown ({}); the next start "
          "re-scans the packs from the older one",
          st.ToString());
    else
      spdlog::error(
          "block index: {} rows of stored blocks not written at shutdown ({}); those "
          "blocks count as missing and are uploaded again",
          pending_.size(), st.ToString());
  }
}

std::string BlockStore::PackPath(int64_t number) const {
  char name[32];
  std::snprintf(name, sizeof name, "%08lld.pack", static_cast<long long>(number));
  return root_ + "/packs/" + name;
}

Status BlockStore::OpenIndex() {
  auto db = Db::Open(root_ + "/index.db");
  if (!db.ok()) return db.take_status();
  db_ = std::move(*db);
  // 32 MiB of page cache (SQLite's default is 2 MiB): the index of a few million blocks stays
  // in memory for lookups, and a flush of pending rows rarely writes a page out twice.
  VMSNAP_RETURN_IF_ERROR(db_->Exec("PRAGMA cache_size=-32768"));
  VMSNAP_RETURN_IF_ERROR(
      db_->Exec("CREATE TABLE IF NOT EXISTS blocks (id BLOB PRIMARY KEY, pack INTEGER NOT NULL, "
                "offset INTEGER NOT NULL, length INTEGER NOT NULL, payload INTEGER NOT NULL, "
                "touched_ms INTEGER NOT NULL) WITHOUT ROWID;"
                "CREATE INDEX IF NOT EXISTS blocks_by_pack ON blocks(pack, offset);"
                "CREATE TABLE IF NOT EXISTS unindexed_from (k INTEGER PRIMARY KEY CHECK (k = 1), "
                "pack INTEGER NOT NULL, offset INTEGER NOT NULL);"));
  auto prepare = [&](std::unique_ptr<DbStatement>& out, const char* sql) -> Status {
    auto st = db_->Prepare(sql);
    if (!st.ok()) return st.take_status();
    out = std::move(*st);
    return Status::Ok();
  };
  VMSNAP_RETURN_IF_ERROR(
      prepare(select_, "SELECT pack, offset, length, payload FROM blocks WHERE id = ?1"));
  VMSNAP_RETURN_IF_ERROR(prepare(touch_, "UPDATE blocks SET touched_ms = ?2 WHERE id = ?1"));
  VMSNAP_RETURN_IF_ERROR(prepare(insert_,
                                 "INSERT OR IGNORE INTO blocks (id, pack, offset, length, "
                                 "payload, touched_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"));
  VMSNAP_RETURN_IF_ERROR(
      prepare(remove_, "DELETE FROM blocks WHERE id = ?1 AND touched_ms < ?2 RETURNING payload"));
  VMSNAP_RETURN_IF_ERROR(prepare(set_unindexed_from_,
                                 "INSERT OR REPLACE INTO unindexed_from (k, pack, offset) "
                                 "VALUES (1, ?1, ?2)"));
  return Status::Ok();
}

Status BlockStore::Open() {
  std::error_code ec;
  fs::create_directories(root_ + "/packs", ec);
  if (ec)
    return Status::IoError("create " + root_ + "/packs: " + ec.message(),
                           "check that the vault's data directory is writable")
        .InPhase("open block store");
  const bool had_index = fs::exists(root_ + "/index.db", ec);
  if (Status st = OpenIndex(); !st.ok()) {
    // Held by another vault process: its own fix (never move the index away then).
    if (st.code() == Code::kConflict) return std::move(st).InPhase("open block store");
    return std::move(st)
        .InPhase("open block store")
        .WithFix(
            "check the vault's data directory; if " + root_ +
            "/index.db is damaged, move it away: the vault rebuilds it from the packs at start");
  }
  for (auto it = fs::directory_iterator(root_ + "/packs", ec);
       !ec && it != fs::directory_iterator(); it.increment(ec))
    next_pack_ = std::max(next_pack_, PackNumberOf(it->path()) + 1);
  const std::string check_packs = "check the vault's disk and the pack files in " + root_ +
                                  "/packs (the kernel log names read errors)";
  if (!had_index && next_pack_ > 1)
    VMSNAP_RETURN_IF_ERROR(RebuildIndex().InPhase("rebuild block index").WithFix(check_packs));
  else
    VMSNAP_RETURN_IF_ERROR(RecoverUnindexedRecords()
                               .InPhase("re-index blocks stored before a crash")
                               .WithFix(check_packs));
  VMSNAP_RETURN_IF_ERROR(MigrateLegacyFiles().InPhase("move block files into packs"));
  // Everything in the packs is indexed now: records without rows can only come after this.
  // Only that position is written here; on a full disk it is left older (a later flush or
  // the next start's scan catches up), so that the vault still starts and serves restores.
  std::lock_guard lock(db_mu_);
  if (Status st = FlushPendingLocked(); !st.ok()) {
    if (!pending_.empty() || st.code() != Code::kResourceExhausted)
      return std::move(st).InPhase("open block store").WithFix(DiskWriteFix(0, root_));
    spdlog::warn(
        "block index {}/index.db: could not record that every pack is indexed ({}); starting "
        "anyway, the next start re-scans from the older position",
        root_, st.ToString());
  }
  return Status::Ok();
}

Status BlockStore::RebuildIndex() {
  spdlog::warn("block index {}/index.db is missing: rebuilding it from the pack files", root_);
  std::lock_guard lock(db_mu_);
  uint64_t rows = 0;
  for (int64_t n = 1; n < next_pack_; ++n) {
    Transaction tx(db_.get());
    VMSNAP_RETURN_IF_ERROR(tx.status());
    VMSNAP_RETURN_IF_ERROR(IndexPackRecords(n, 0, /*verify=*/false, &rows));
    VMSNAP_RETURN_IF_ERROR(tx.Commit());
  }
  spdlog::info("block index rebuilt: {} blocks", rows);
  return Status::Ok();
}

Status BlockStore::RecoverUnindexedRecords() {
  std::lock_guard lock(db_mu_);
  auto from = db_->Query("SELECT pack, offset FROM unindexed_from WHERE k = 1");
  if (!from.ok()) return from.take_status();
  // No row: an index written before the table existed, when every upload wrote its rows
  // before it answered. Nothing to recover.
  if (from->empty()) return Status::Ok();
  const int64_t first_pack = (*from)[0].Int(0);
  const uint64_t first_offset = static_cast<uint64_t>((*from)[0].Int(1));
  uint64_t rows = 0;
  Status st = [&] {
    Transaction tx(db_.get());
    VMSNAP_RETURN_IF_ERROR(tx.status());
    for (int64_t n = std::max<int64_t>(first_pack, 1); n < next_pack_; ++n)
      VMSNAP_RETURN_IF_ERROR(
          IndexPackRecords(n, n == first_pack ? first_offset : 0, /*verify=*/true, &rows));
    return tx.Commit();
  }();
  if (st.code() == Code::kResourceExhausted) {
    // A full disk: the vault starts without these rows and keeps the position where it is,
    // so that a later start re-indexes them. Committed points are not affected (their rows
    // were written before they were published); the blocks of unfinished uploads count as
    // missing meanwhile and are uploaded again.
    recover_from_ = std::make_pair(first_pack, first_offset);
    spdlog::warn(
        "block index: blocks stored after the index's last write are not re-indexed now ({}); "
        "a later start does it",
        st.ToString());
    return Status::Ok();
  }
  VMSNAP_RETURN_IF_ERROR(st);
  if (rows)
    spdlog::warn(
        "block index: re-indexed {} blocks that were stored after the index's last write (the "
        "vault stopped without writing their rows)",
        rows);
  return Status::Ok();
}

Status BlockStore::IndexPackRecords(int64_t number, uint64_t from, bool verify, uint64_t* rows) {
  const std::string path = PackPath(number);
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno == ENOENT) return Status::Ok();  // deleted by compaction
    return Status::FromErrno(errno, "open " + path);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return Status::FromErrno(errno, "stat " + path);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  char magic[8];
  if (size < kPackMagic.size() || !PreadAll(fd.get(), 0, magic, 8, path).ok() ||
      std::string_view(magic, 8) != kPackMagic) {
    spdlog::error("{} is not a pack file (bad header): skipped", path);
    return Status::Ok();
  }
  const int64_t now = NowMs();
  std::string record;
  std::vector<std::byte> scratch;
  uint64_t off = std::max<uint64_t>(from, kPackMagic.size());
  while (off + kRecordHeaderSize <= size) {
    char head[kRecordHeaderSize];
    VMSNAP_RETURN_IF_ERROR(PreadAll(fd.get(), off, head, kRecordHeaderSize, path));
    const RecordHeader h = ReadRecordHeader(head);
    const uint64_t len = h.payload_size;
    if (std::all_of(head, head + kRecordHeaderSize, [](char c) { return c == 0; })) {
      off = AlignUp(off + 1);  // padding after an append
      continue;
    }
    if (off + kRecordHeaderSize + len > size || len > 2 * kMaxBlockSize) {
      spdlog::warn("{}: torn record at offset {} (a crash during an upload): ignored", path, off);
      break;
    }
    bool good = true;
    if (verify) {
      record.assign(head, kRecordHeaderSize);  // the header is read already: the payload only
      record.resize(kRecordHeaderSize + len);
      VMSNAP_RETURN_IF_ERROR(PreadAll(fd.get(), off + kRecordHeaderSize,
                                      record.data() + kRecordHeaderSize, len, path));
      ByteReader r(record);
      BlockRecordView b;
      good = ReadRecord(r, b) && r.remaining() == 0 && VerifyBlock(b, scratch).ok();
      if (!good)
        spdlog::warn("{}: record at offset {} does not match its id {} (not indexed)", path, off,
                     h.id.Hex());
    }
    if (good) {
      insert_->Reset();
      insert_->BindBlob(1, h.id.bytes.data(), 32);
      insert_->BindInt(2, number);
      insert_->BindInt(3, static_cast<int64_t>(off));
      insert_->BindInt(4, static_cast<int64_t>(kRecordHeaderSize + len));
      insert_->BindInt(5, static_cast<int64_t>(len));
      insert_->BindInt(6, now);
      if (auto s = insert_->Step(); !s.ok()) return s.take_status();
      *rows += static_cast<uint64_t>(db_->Changes());
    }
    off += kRecordHeaderSize + len;
  }
  insert_->Reset();
  return Status::Ok();
}

Status BlockStore::MigrateLegacyFiles() {
  std::error_code ec;
  std::vector<fs::path> shards;
  for (auto it = fs::directory_iterator(root_, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (it->is_directory() && name.size() == 2 &&
        std::isxdigit(static_cast<unsigned char>(name[0])) &&
        std::isxdigit(static_cast<unsigned char>(name[1])))
      shards.push_back(it->path());
  }
  if (shards.empty()) return Status::Ok();
  std::sort(shards.begin(), shards.end());
  uint64_t moved = 0;
  for (const auto& shard : shards) {
    std::vector<fs::path> files;
    for (auto it = fs::directory_iterator(shard, ec); !ec && it != fs::directory_iterator();
         it.increment(ec)) {
      if (it->path().filename().string().find(".tmp") != std::string::npos)
        fs::remove(it->path(), ec);  // an upload a crash interrupted: never visible
      else
        files.push_back(it->path());
    }
    for (size_t begin = 0; begin < files.size(); begin += kRowsPerTransaction) {
      const size_t end = std::min(files.size(), begin + kRowsPerTransaction);
      std::vector<EncodedBlock> blocks;
      std::vector<int64_t> touched;
      std::vector<fs::path> done;
      for (size_t i = begin; i < end; ++i) {
        auto id = BlockId::FromHex(files[i].filename().string());
        auto data = platform::Env::Default()->ReadFile(files[i].string());
        struct stat st {};
        if (id.ok() && data.ok() && ::stat(files[i].c_str(), &st) == 0) {
          auto batch = DecodeBatch(*data);
          if (batch.ok() && batch->size() == 1 && (*batch)[0].id == *id) {
            blocks.push_back(std::move((*batch)[0]));
            touched.push_back(int64_t{st.st_mtim.tv_sec} * 1000 + st.st_mtim.tv_nsec / 1000000);
            done.push_back(files[i]);
            continue;
          }
        }
        spdlog::error("block file {} is damaged or not a block: left where it is",
                      files[i].string());
      }
      if (blocks.empty()) continue;
      uint64_t bytes = 0;
      for (const auto& b : blocks) bytes += kRecordHeaderSize + b.payload.size();
      AppendBuffer records(bytes, append_buffers_);
      for (const auto& b : blocks) records.Add(b);
      auto at = Append(records.view(), /*sync=*/true);
      if (!at.ok()) return at.take_status();
      std::vector<BlockRecordView> views(blocks.begin(), blocks.end());
      PutStats ignored;
      {
        std::lock_guard lock(db_mu_);
        VMSNAP_RETURN_IF_ERROR(IndexInsert(views, at->first, at->second, &ignored));
        // The mtime carries over: garbage collection keeps judging blocks by their last use.
        Transaction tx(db_.get());
        VMSNAP_RETURN_IF_ERROR(tx.status());
        for (size_t i = 0; i < blocks.size(); ++i) {
          touch_->Reset();
          touch_->BindBlob(1, blocks[i].id.bytes.data(), 32);
          touch_->BindInt(2, touched[i]);
          if (auto s = touch_->Step(); !s.ok()) return s.take_status();
        }
        touch_->Reset();
        VMSNAP_RETURN_IF_ERROR(tx.Commit());
      }
      for (const auto& f : done) fs::remove(f, ec);
      moved += done.size();
    }
    fs::remove(shard, ec);  // only when empty (damaged files stay)
  }
  if (moved) spdlog::info("moved {} block files of the old layout into pack files", moved);
  return SyncDir(root_);
}

Result<std::pair<int64_t, uint64_t>> BlockStore::Append(std::string_view records, bool sync) {
  std::shared_ptr<Pack> pack;
  uint64_t offset = 0;
  {
    std::lock_guard lock(append_mu_);
    if (!active_ ||
        (active_->size + records.size() > pack_target_bytes_ && active_->size > kAlign)) {
      auto fresh = std::make_shared<Pack>();
      fresh->number = next_pack_++;
      fresh->path = PackPath(fresh->number);
      fresh->fd = Fd(::open(fresh->path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0640));
      int err = fresh->fd.valid() ? PwriteErrno(fresh->fd.get(), 0, kPackMagic) : errno;
      if (err == 0 && ::fsync(fresh->fd.get()) != 0) err = errno;
      if (err != 0) {
        // Nothing stays under this number (a file of that name left by someone else is
        // skipped): retries against a full disk must not leave an empty pack each.
        if (fresh->fd.valid()) ::unlink(fresh->path.c_str());
        if (err != EEXIST) next_pack_--;
        return Status::FromErrno(err, "create pack file " + fresh->path)
            .WithFix(DiskWriteFix(err, root_));
      }
      if (Status st = SyncDir(root_ + "/packs"); !st.ok())
        return std::move(st).WithFix(DiskWriteFix(0, root_));
      // Large appends skip the page cache (one copy less, no writeback of dirty pages); on
      // a filesystem without O_DIRECT (tmpfs) they are buffered.
      fresh->direct_fd = Fd(::open(fresh->path.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC));
      fresh->size = kAlign;
      active_ = std::move(fresh);
    }
    pack = active_;
    offset = pack->size;
    int err = 0;
    if (pack->direct_fd.valid()) {
      err = PwriteErrno(pack->direct_fd.get(), offset, records);
      if (err == EINVAL) {  // no direct I/O on this filesystem after all: buffered from now on
        pack->direct_fd.Reset();
        err = 0;
      } else if (err == 0) {
        pack->size += records.size();
      }
    }
    if (err == 0 && !pack->direct_fd.valid() && pack->size == offset) {
      err = PwriteErrno(pack->fd.get(), offset, records);
      if (err == 0) pack->size += records.size();
    }
    if (err != 0) {
      active_.reset();  // its tail may hold part of this write: never append after it
      if (offset == kAlign && pack.use_count() == 1) {
        // A pack that never took a record (on a full disk every first write fails): removed
        // too. Nothing refers to it: no record in it was indexed or waits for a flush.
        ::unlink(pack->path.c_str());
        if (next_pack_ == pack->number + 1) next_pack_--;
      }
      return Status::FromErrno(err, "write " + pack->path).WithFix(DiskWriteFix(err, root_));
    }
    // Registered with the write, under the same lock: a flush that takes the list sees every
    // write made before it, and holds unindexed_from at or before every append whose rows are
    // not pending yet.
    if (!sync) {
      if (std::find(unsynced_.begin(), unsynced_.end(), pack) == unsynced_.end())
        unsynced_.push_back(pack);
      in_flight_.emplace(pack->number, offset);
    }
  }
  if (sync)
    if (const int err = pack->Flush(); err != 0)
      return Status::FromErrno(err, "sync " + pack->path).WithFix(DiskWriteFix(err, root_));
  // An early flush (see kEarlyFlushBytes); of two Puts that cross the threshold together, the
  // one that takes the count flushes.
  if (!sync && early_flush_bytes_ > 0 &&
      pack->unflushed_bytes.fetch_add(records.size()) + records.size() >= early_flush_bytes_ &&
      pack->unflushed_bytes.exchange(0) >= early_flush_bytes_) {
    if (const int err = pack->Flush(); err != 0) {
      std::lock_guard lock(append_mu_);
      if (active_ == pack) active_.reset();  // never append after bytes that may be lost
      if (auto it = in_flight_.find({pack->number, offset}); it != in_flight_.end())
        in_flight_.erase(it);  // this Put fails: its records get no rows
      return Status::FromErrno(err, "sync " + pack->path).WithFix(DiskWriteFix(err, root_));
    }
    early_flushes_++;
  }
  return std::make_pair(pack->number, offset);
}

void BlockStore::AppendIndexed(std::pair<int64_t, uint64_t> at) {
  std::lock_guard lock(append_mu_);
  if (auto it = in_flight_.find(at); it != in_flight_.end()) in_flight_.erase(it);
}

std::pair<int64_t, uint64_t> BlockStore::UnindexedFromLocked() const {
  std::pair<int64_t, uint64_t> from{next_pack_, 0};
  if (!in_flight_.empty())
    from = *in_flight_.begin();
  else if (active_)
    from = {active_->number, active_->size};
  return recover_from_ ? std::min(from, *recover_from_) : from;
}

Status BlockStore::IndexInsert(std::span<const BlockRecordView> blocks, int64_t pack,
                               uint64_t first_offset, PutStats* stats) {
  Transaction tx(db_.get());
  VMSNAP_RETURN_IF_ERROR(tx.status());
  const int64_t now = NowMs();
  uint64_t offset = first_offset;
  for (const BlockRecordView& b : blocks) {
    const uint64_t length = kRecordHeaderSize + b.payload.size();
    insert_->Reset();
    insert_->BindBlob(1, b.id.bytes.data(), 32);
    insert_->BindInt(2, pack);
    insert_->BindInt(3, static_cast<int64_t>(offset));
    insert_->BindInt(4, static_cast<int64_t>(length));
    insert_->BindInt(5, static_cast<int64_t>(b.payload.size()));
    insert_->BindInt(6, now);
    if (auto s = insert_->Step(); !s.ok()) return s.take_status();
    if (db_->Changes() == 1) {
      stats->stored++;
      stats->bytes_stored += b.payload.size();
    } else {
      stats->already_present++;  // another upload of the same block won the race
    }
    offset += length;
  }
  insert_->Reset();
  return tx.Commit();
}

std::vector<bool> BlockStore::HasForUploadLocked(std::span<const BlockId> ids) {
  std::vector<bool> present(ids.size(), false);
  std::lock_guard lock(db_mu_);
  Transaction tx(db_.get());
  if (!tx.status().ok()) {
    spdlog::error("block index: {}", tx.status().ToString());
    return present;  // "missing": the backup uploads them again
  }
  const int64_t now = NowMs();
  for (size_t i = 0; i < ids.size(); ++i) {
    if (auto it = pending_.find(ids[i]); it != pending_.end()) {
      it->second.touched_ms = now;
      present[i] = true;
      continue;
    }
    touch_->Reset();
    touch_->BindBlob(1, ids[i].bytes.data(), 32);
    touch_->BindInt(2, now);
    auto s = touch_->Step();
    present[i] = s.ok() && db_->Changes() == 1;
  }
  touch_->Reset();
  if (Status st = tx.Commit(); !st.ok()) {
    spdlog::error("block index: {}", st.ToString());
    std::fill(present.begin(), present.end(), false);
  }
  return present;
}

bool BlockStore::HasForUpload(const BlockId& id) {
  return HasForUpload(std::span(&id, 1))[0];
}

std::vector<bool> BlockStore::HasForUpload(std::span<const BlockId> ids) {
  std::shared_lock gc_lock(gc_mu_);
  return HasForUploadLocked(ids);
}

Result<BlockStore::IndexRow> BlockStore::LookupLocked(const BlockId& id) const {
  if (auto it = pending_.find(id); it != pending_.end()) return it->second.where;
  select_->Reset();
  select_->BindBlob(1, id.bytes.data(), 32);
  auto row = select_->Step();
  if (!row.ok()) return row.take_status();
  if (!*row) {
    select_->Reset();
    return Status::NotFound("block " + id.Hex() + " is not in the vault");
  }
  IndexRow r{select_->ColumnInt(0), static_cast<uint64_t>(select_->ColumnInt(1)),
             static_cast<uint64_t>(select_->ColumnInt(2))};
  select_->Reset();
  return r;
}

Result<BlockLocation> BlockStore::Locate(const BlockId& id) const {
  std::lock_guard lock(db_mu_);
  auto row = LookupLocked(id);
  if (!row.ok()) return row.take_status();
  return BlockLocation{PackPath(row->pack), row->offset, row->length};
}

bool BlockStore::Has(const BlockId& id) const {
  return Locate(id).ok();
}

BlockStore::Absent BlockStore::FindAbsent(std::span<const BlockId> ids) const {
  Absent absent;
  std::lock_guard lock(db_mu_);
  ReadTransaction snapshot(db_.get());
  for (const BlockId& id : ids)
    if (!LookupLocked(id).ok() && !absent.count++) absent.first = id;
  return absent;
}

uint64_t BlockStore::StoredBytes(const BlockId& id) const {
  return StoredBytes(std::span(&id, 1))[0];
}

std::vector<uint64_t> BlockStore::StoredBytes(std::span<const BlockId> ids) const {
  constexpr size_t kGroup = 4096;
  std::vector<uint64_t> bytes(ids.size(), 0);
  for (size_t at = 0; at < ids.size(); at += kGroup) {
    std::lock_guard lock(db_mu_);
    ReadTransaction snapshot(db_.get());
    for (size_t i = at; i < std::min(ids.size(), at + kGroup); ++i)
      if (auto row = LookupLocked(ids[i]); row.ok() && row->length > kRecordHeaderSize)
        bytes[i] = row->length - kRecordHeaderSize;
  }
  return bytes;
}

Result<std::shared_ptr<BlockStore::Pack>> BlockStore::PackForRead(int64_t number) const {
  std::lock_guard lock(packs_mu_);
  auto it = open_packs_.find(number);
  if (it != open_packs_.end()) return it->second;
  auto pack = std::make_shared<Pack>();
  pack->number = number;
  pack->path = PackPath(number);
  pack->fd = Fd(::open(pack->path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!pack->fd.valid()) return Status::FromErrno(errno, "open pack file " + pack->path);
  // A bounded number of open packs (a large vault has thousands; services often have a soft
  // limit of 1024 descriptors): readers still using an evicted pack keep it open.
  if (open_packs_.size() >= kMaxOpenPacks) open_packs_.clear();
  open_packs_[number] = pack;
  return pack;
}

BlockStore::ReadCounts BlockStore::read_counts() const {
  return {pack_reads_.load(), pack_direct_reads_.load(), pack_read_bytes_.load()};
}

// Reads [offset, offset + n) of a pack into `buffer`. Spans bypass the page cache: the packs
// were appended with O_DIRECT, so they are rarely cached, and a buffered read would copy every
// byte once more and fill the page cache with pages that are read once (measured on this
// project's VM: 1.3 GB read buffered right after direct appends cost 2.4 CPU-seconds of kernel
// time, read direct 0.05; docs/PERFORMANCE.md). The aligned range around the span is read.
// Spans shorter than kDirectReadMinBytes, and packs whose filesystem refuses direct reads, are
// read through the page cache.
Result<const char*> BlockStore::ReadSpan(Pack& pack, uint64_t offset, uint64_t n,
                                         AlignedBuffer& buffer) const {
  pack_reads_.fetch_add(1, std::memory_order_relaxed);
  pack_read_bytes_.fetch_add(n, std::memory_order_relaxed);
  auto buffered = [&]() -> Result<const char*> {
    buffer.Reserve(n);
    VMSNAP_RETURN_IF_ERROR(PreadAll(pack.fd.get(), offset, buffer.data(), n, pack.path));
    return static_cast<const char*>(buffer.data());
  };
  if (n < kDirectReadMinBytes || pack.direct_read_refused.load(std::memory_order_relaxed))
    return buffered();
  std::call_once(pack.direct_read_open, [&] {
    pack.direct_read_fd = Fd(::open(pack.path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC));
  });
  if (!pack.direct_read_fd.valid()) return buffered();
  const uint64_t first = offset / kAlign * kAlign, last = AlignUp(offset + n);
  const size_t span = last - first;
  buffer.Reserve(span);
  size_t done = 0;
  const size_t need = offset + n - first;  // the aligned tail past the pack's end is not needed
  while (done < need) {
    ssize_t r = ::pread(pack.direct_read_fd.get(), buffer.data() + done, span - done,
                        static_cast<off_t>(first + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EINVAL && done == 0) {  // no direct reads here after all
      pack.direct_read_refused.store(true, std::memory_order_relaxed);
      return buffered();
    }
    if (r < 0) return Status::FromErrno(errno, "read " + pack.path);
    if (r == 0) return Status::Corruption(pack.path + " ends early (truncated)");
    done += static_cast<size_t>(r);
    if (done % kAlign != 0) break;  // a short read ends at the end of the file
  }
  if (done < need) return Status::Corruption(pack.path + " ends early (truncated)");
  pack_direct_reads_.fetch_add(1, std::memory_order_relaxed);
  return static_cast<const char*>(buffer.data() + (offset - first));
}

Status BlockStore::AppendRecords(std::span<const BlockId> ids, std::string& out) const {
  std::shared_lock gc_lock(gc_mu_);
  std::vector<IndexRow> where(ids.size());
  {
    std::lock_guard lock(db_mu_);
    std::optional<ReadTransaction> snapshot;
    if (ids.size() > 1) snapshot.emplace(db_.get());
    for (size_t i = 0; i < ids.size(); ++i) {
      auto row = LookupLocked(ids[i]);
      if (!row.ok()) return row.take_status();
      where[i] = *row;
    }
  }
  auto damaged = [&](size_t i, const std::string& why) {
    return DamagedBlock(ids[i], PackPath(where[i].pack), where[i].offset, why);
  };
  // The answer holds the records in request order; `at[i]` is where record i goes. It grows
  // once to its final size: growing it run by run copied everything read so far at each
  // reallocation (a tenth of the vault's CPU time in a restore, docs/PERFORMANCE.md).
  const size_t base = out.size();
  std::vector<uint64_t> at(ids.size());
  uint64_t total = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (where[i].length < kRecordHeaderSize ||
        where[i].length > kRecordHeaderSize + 2 * kMaxBlockSize)
      return damaged(i, "its index row has an impossible length");
    at[i] = total;
    total += where[i].length;
  }
  if (total > kMaxAnswerBytes)
    return Status::InvalidArgument("a fetch of " + std::to_string(ids.size()) +
                                       " blocks would answer " + std::to_string(total) +
                                       " bytes, more than the vault's limit of " +
                                       std::to_string(kMaxAnswerBytes) + " bytes",
                                   "ask for fewer blocks per fetch");
  out.resize(base + total);
  // The records are read in pack order: a span covers those of one pack that lie close
  // together (kMaxReadGap), whatever their order in the request, and each is copied to its
  // place in the answer.
  std::vector<uint32_t> order(ids.size());
  std::iota(order.begin(), order.end(), 0u);
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    return std::tie(where[a].pack, where[a].offset) < std::tie(where[b].pack, where[b].offset);
  });
  AlignedBufferPool::Lease direct_buffer(read_buffers_);
  for (size_t a = 0; a < order.size();) {
    const IndexRow& head = where[order[a]];
    const uint64_t begin = head.offset;
    uint64_t end = begin + head.length;
    size_t b = a + 1;
    for (; b < order.size(); ++b) {
      const IndexRow& next = where[order[b]];
      if (next.pack != head.pack || next.offset > end + kMaxReadGap ||
          next.offset + next.length - begin > kMaxReadSpan)
        break;
      end = std::max(end, next.offset + next.length);
    }
    auto pack = PackForRead(head.pack);
    if (!pack.ok()) return damaged(order[a], pack.status().cause());
    auto span = ReadSpan(**pack, begin, end - begin, *direct_buffer);
    if (!span.ok()) return damaged(order[a], span.status().cause());
    for (size_t k = a; k < b; ++k) {
      const uint32_t i = order[k];
      std::memcpy(out.data() + base + at[i], *span + (where[i].offset - begin), where[i].length);
    }
    a = b;
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    const RecordHeader h = ReadRecordHeader(out.data() + base + at[i]);
    if (h.id != ids[i]) return damaged(i, "the record holds block " + h.id.Hex());
    if (kRecordHeaderSize + h.payload_size != where[i].length || h.plain_size > kMaxBlockSize)
      return damaged(i, "the record's sizes do not match the index");
  }
  return Status::Ok();
}

Result<EncodedBlock> BlockStore::Get(const BlockId& id) const {
  std::string record;
  // Checks the record's header against its id and index row (a damaged record is kCorruption).
  VMSNAP_RETURN_IF_ERROR(AppendRecords(std::span(&id, 1), record));
  auto b = ParseRecord(record);
  if (!b.ok()) {
    auto where = Locate(id);
    return DamagedBlock(id, where.ok() ? where->pack_path : "?",
                        where.ok() ? where->record_offset : 0, "the record cannot be parsed");
  }
  return std::move(*b);
}

void BlockStore::ForEach(const std::function<void(const BlockId&, uint64_t, int64_t)>& fn) const {
  struct Row {
    BlockId id;
    uint64_t payload;
    int64_t touched;
  };
  // A page of rows at a time, in id order (the table's key), each page read under the lock and
  // handed to fn without it: memory is one page, not the whole index.
  constexpr int64_t kPageRows = 16 * 1024;
  std::vector<Row> rows;
  rows.reserve(kPageRows);
  // Ids are 32 bytes; this one-byte blob sorts before every one of them.
  std::string after(1, '\0');
  for (bool first = true;; first = false) {
    rows.clear();
    int64_t read = 0;
    {
      std::lock_guard lock(db_mu_);
      if (first)
        if (Status st = FlushPendingLocked(); !st.ok()) {
          spdlog::error("block index: {}", st.ToString());
          return;
        }
      auto stmt = db_->Prepare(
          "SELECT id, payload, touched_ms FROM blocks WHERE id > ?1 ORDER BY id LIMIT ?2");
      if (!stmt.ok()) {
        spdlog::error("block index: {}", stmt.status().ToString());
        return;
      }
      (*stmt)->BindBlob(1, after.data(), after.size());
      (*stmt)->BindInt(2, kPageRows);
      for (;;) {
        auto row = (*stmt)->Step();
        if (!row.ok()) spdlog::error("block index: {}", row.status().ToString());
        if (!row.ok() || !*row) break;
        ++read;
        Row r{};
        std::string_view id = (*stmt)->ColumnBlob(0);
        after.assign(id.begin(), id.end());
        if (id.size() != 32) continue;
        std::memcpy(r.id.bytes.data(), id.data(), 32);
        r.payload = static_cast<uint64_t>((*stmt)->ColumnInt(1));
        r.touched = (*stmt)->ColumnInt(2);
        rows.push_back(r);
      }
    }
    for (const auto& r : rows) fn(r.id, r.payload, r.touched);
    if (read < kPageRows) return;
  }
}

Result<BlockStore::Removed> BlockStore::RemoveUntouchedSince(std::span<const BlockId> ids,
                                                             int64_t cutoff_unix_ms) {
  std::unique_lock gc_lock(gc_mu_);
  std::lock_guard lock(db_mu_);
  VMSNAP_RETURN_IF_ERROR(FlushPendingLocked());
  Removed removed;
  for (size_t begin = 0; begin < ids.size(); begin += kRowsPerTransaction) {
    Transaction tx(db_.get());
    VMSNAP_RETURN_IF_ERROR(tx.status());
    Removed part;
    for (size_t i = begin; i < std::min(ids.size(), begin + kRowsPerTransaction); ++i) {
      remove_->Reset();
      remove_->BindBlob(1, ids[i].bytes.data(), 32);
      remove_->BindInt(2, cutoff_unix_ms);
      for (;;) {
        auto row = remove_->Step();
        if (!row.ok()) return row.take_status();
        if (!*row) break;
        part.blocks++;
        part.bytes += static_cast<uint64_t>(remove_->ColumnInt(0));
      }
    }
    remove_->Reset();
    VMSNAP_RETURN_IF_ERROR(tx.Commit());
    removed.blocks += part.blocks;
    removed.bytes += part.bytes;
  }
  return removed;
}

StoreUsage BlockStore::Usage() const {
  StoreUsage u;
  std::error_code ec;
  for (auto it = fs::directory_iterator(root_ + "/packs", ec);
       !ec && it != fs::directory_iterator(); it.increment(ec)) {
    if (PackNumberOf(it->path()) == 0) continue;
    u.packs++;
    u.pack_bytes += it->file_size(ec);
  }
  std::lock_guard lock(db_mu_);
  if (auto rows = db_->Query("SELECT COALESCE(SUM(length), 0) FROM blocks"); rows.ok())
    u.live_bytes = static_cast<uint64_t>(rows->at(0).Int(0));
  for (const auto& [id, row] : pending_) u.live_bytes += row.where.length;
  return u;
}

Result<CompactStats> BlockStore::Compact(double min_live_fraction) {
  std::unique_lock gc_lock(gc_mu_);  // no Put, Get or touch while rows move
  CompactStats stats;
  std::map<int64_t, uint64_t> live;  // pack -> bytes of indexed records
  {
    std::lock_guard lock(db_mu_);
    VMSNAP_RETURN_IF_ERROR(FlushPendingLocked());
    auto rows = db_->Query("SELECT pack, SUM(length) FROM blocks GROUP BY pack");
    if (!rows.ok()) return rows.take_status();
    for (const auto& r : *rows) live[r.Int(0)] = static_cast<uint64_t>(r.Int(1));
  }
  int64_t active = 0;
  {
    std::lock_guard lock(append_mu_);
    if (active_) active = active_->number;
  }
  std::error_code ec;
  std::vector<std::pair<int64_t, uint64_t>> packs;  // number, file size
  for (auto it = fs::directory_iterator(root_ + "/packs", ec);
       !ec && it != fs::directory_iterator(); it.increment(ec)) {
    const int64_t n = PackNumberOf(it->path());
    if (n != 0 && n != active) packs.emplace_back(n, it->file_size(ec));
  }
  std::sort(packs.begin(), packs.end());
  auto forget = [&](int64_t n) {
    std::lock_guard lock(packs_mu_);
    open_packs_.erase(n);
  };
  for (const auto& [n, size] : packs) {
    const uint64_t live_bytes = live.count(n) ? live[n] : 0;
    if (live_bytes > 0 &&
        static_cast<double>(live_bytes) >= min_live_fraction * static_cast<double>(size))
      continue;
    if (live_bytes > 0) {
      // Copy the live records, a few MiB at a time, and move their rows.
      std::vector<std::tuple<std::string, uint64_t, uint64_t>> rows;  // id, offset, length
      {
        std::lock_guard lock(db_mu_);
        auto stmt =
            db_->Prepare("SELECT id, offset, length FROM blocks WHERE pack = ?1 ORDER BY offset");
        if (!stmt.ok()) return stmt.take_status();
        (*stmt)->BindInt(1, n);
        for (;;) {
          auto row = (*stmt)->Step();
          if (!row.ok()) return row.take_status();
          if (!*row) break;
          rows.emplace_back(std::string((*stmt)->ColumnBlob(0)),
                            static_cast<uint64_t>((*stmt)->ColumnInt(1)),
                            static_cast<uint64_t>((*stmt)->ColumnInt(2)));
        }
      }
      auto source = PackForRead(n);
      if (!source.ok()) return source.take_status();
      size_t i = 0;
      while (i < rows.size()) {
        size_t first = i;
        uint64_t bytes = 0;
        while (i < rows.size() && bytes < (8u << 20)) bytes += std::get<2>(rows[i++]);
        AppendBuffer chunk(bytes, append_buffers_);
        for (size_t k = first; k < i; ++k) {
          const auto& [id, offset, length] = rows[k];
          // Copied as it is, damage included: verify must still see it.
          VMSNAP_RETURN_IF_ERROR(PreadAll((*source)->fd.get(), offset, chunk.Reserve(length),
                                          length, (*source)->path));
        }
        auto at = Append(chunk.view(), /*sync=*/true);
        if (!at.ok()) return at.take_status();
        std::lock_guard lock(db_mu_);
        Transaction tx(db_.get());
        VMSNAP_RETURN_IF_ERROR(tx.status());
        auto move = db_->Prepare("UPDATE blocks SET pack = ?2, offset = ?3 WHERE id = ?1");
        if (!move.ok()) return move.take_status();
        uint64_t offset = at->second;
        for (size_t k = first; k < i; ++k) {
          const auto& [id, old_offset, length] = rows[k];
          (*move)->Reset();
          (*move)->BindBlob(1, id.data(), id.size());
          (*move)->BindInt(2, at->first);
          (*move)->BindInt(3, static_cast<int64_t>(offset));
          if (auto s = (*move)->Step(); !s.ok()) return s.take_status();
          offset += length;
        }
        VMSNAP_RETURN_IF_ERROR(tx.Commit());
      }
      stats.packs_rewritten++;
      stats.blocks_moved += rows.size();
      // The copies' rows are written: a restart after a crash need not re-read them (bounds
      // what Open re-indexes to one pack's live records).
      std::lock_guard lock(db_mu_);
      VMSNAP_RETURN_IF_ERROR(FlushPendingLocked());
    }
    forget(n);
    const std::string path = PackPath(n);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT)
      return Status::FromErrno(errno, "delete pack file " + path);
    stats.packs_deleted++;
    stats.bytes_reclaimed += size;
  }
  if (stats.packs_deleted) {
    VMSNAP_RETURN_IF_ERROR(SyncDir(root_ + "/packs"));
    spdlog::info(
        "pack compaction: {} packs deleted ({} rewritten, {} blocks moved), {} bytes freed",
        stats.packs_deleted, stats.packs_rewritten, stats.blocks_moved, stats.bytes_reclaimed);
  }
  return stats;
}

Result<PutStats> BlockStore::Put(const std::vector<EncodedBlock>& blocks) {
  std::vector<BlockRecordView> views(blocks.begin(), blocks.end());
  return Put(std::span<const BlockRecordView>(views));
}

Result<PutStats> BlockStore::Put(std::span<const BlockRecordView> blocks) {
  std::shared_lock gc_lock(gc_mu_);
  PutStats stats;
  stats.received = blocks.size();
  std::vector<BlockId> ids;
  ids.reserve(blocks.size());
  for (const auto& b : blocks) ids.push_back(b.id);
  std::vector<bool> present = HasForUploadLocked(ids);
  std::vector<BlockRecordView> fresh;
  std::unordered_set<BlockId, BlockIdHash> seen;
  std::vector<std::byte> plain;
  size_t bytes = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const BlockRecordView& b = blocks[i];
    if (present[i] || !seen.insert(b.id).second) {
      stats.already_present++;
      continue;
    }
    Status st = VerifyBlock(b, plain);
    if (!st.ok())
      return std::move(st)
          .InPhase("store block")
          .WithFix("the agent sent data that does not match its id; rerun the backup (it resends)");
    fresh.push_back(b);
    bytes += kRecordHeaderSize + b.payload.size();
  }
  if (fresh.empty()) return stats;
  AppendBuffer records(bytes, append_buffers_);
  for (const BlockRecordView& b : fresh) records.Add(b);
  auto at = Append(records.view(), /*sync=*/false);
  if (!at.ok()) return std::move(at.take_status()).InPhase("store block");
  std::lock_guard lock(db_mu_);
  const int64_t now = NowMs();
  if (pending_.empty()) pending_since_ = std::chrono::steady_clock::now();
  uint64_t offset = at->second;
  for (const BlockRecordView& b : fresh) {
    const uint64_t length = kRecordHeaderSize + b.payload.size();
    // A concurrent Put of the same block may have won: its row stays, this copy is dead bytes
    // (a row already written by a flush in between wins the same way, at the next flush).
    if (pending_.try_emplace(b.id, PendingRow{{at->first, offset, length}, now}).second) {
      stats.stored++;
      stats.bytes_stored += b.payload.size();
    } else {
      stats.already_present++;
    }
    offset += length;
  }
  AppendIndexed(*at);
  if (pending_.size() >= max_pending_rows_ ||
      std::chrono::steady_clock::now() - pending_since_ >= kMaxPendingAge)
    if (Status st = FlushPendingLocked(); !st.ok())
      return std::move(st).InPhase("store block").WithFix("check the vault's disk and free space");
  return stats;
}

Status BlockStore::FlushPendingLocked() const {
  std::vector<std::shared_ptr<Pack>> packs;
  std::pair<int64_t, uint64_t> unindexed_from;
  {
    std::lock_guard lock(append_mu_);
    // Every record before this position has its row pending now (written below) or written.
    unindexed_from = UnindexedFromLocked();
    if (pending_.empty() && unindexed_from == unindexed_from_written_) return Status::Ok();
    packs.swap(unsynced_);
  }
  for (const auto& pack : packs) {
    pack->unflushed_bytes = 0;      // (only an early flush's trigger; these rows wait for this one)
    const int err = pack->Flush();  // fails too after a failed early flush
    if (err == 0) continue;
    // After a failed flush the kernel may have dropped the pages; a second flush would report
    // success. Forget the rows (their blocks are uploaded again) and start a new pack.
    const size_t dropped = pending_.size();
    pending_.clear();
    {
      std::lock_guard lock(append_mu_);
      if (active_ && active_->number == pack->number) active_.reset();
    }
    return Status::FromErrno(err, "sync " + pack->path + " (" + std::to_string(dropped) +
                                      " stored blocks forgotten; they are uploaded again)")
        .WithFix(DiskWriteFix(err, root_));
  }
  // These rows are made durable by the next FULL transaction, checkpoint or SyncIndex; until
  // then a power failure may forget them (and the position with them: Open then scans from
  // the older one).
  VMSNAP_RETURN_IF_ERROR(db_->Exec("PRAGMA synchronous=NORMAL"));
  Status st = [&]() -> Status {
    // In id order: each page of the index is then finished before the next one is touched,
    // so a page the cache has to write out early is not written again.
    std::vector<const std::pair<const BlockId, PendingRow>*> rows;
    rows.reserve(pending_.size());
    for (const auto& entry : pending_) rows.push_back(&entry);
    std::sort(rows.begin(), rows.end(),
              [](const auto* a, const auto* b) { return a->first.bytes < b->first.bytes; });
    Transaction tx(db_.get());
    VMSNAP_RETURN_IF_ERROR(tx.status());
    for (const auto* entry : rows) {
      const auto& [id, row] = *entry;
      insert_->Reset();
      insert_->BindBlob(1, id.bytes.data(), 32);
      insert_->BindInt(2, row.where.pack);
      insert_->BindInt(3, static_cast<int64_t>(row.where.offset));
      insert_->BindInt(4, static_cast<int64_t>(row.where.length));
      insert_->BindInt(5, static_cast<int64_t>(row.where.length - kRecordHeaderSize));
      insert_->BindInt(6, row.touched_ms);
      if (auto s = insert_->Step(); !s.ok()) return s.take_status();
    }
    insert_->Reset();
    set_unindexed_from_->Reset();
    set_unindexed_from_->BindInt(1, unindexed_from.first);
    set_unindexed_from_->BindInt(2, static_cast<int64_t>(unindexed_from.second));
    if (auto s = set_unindexed_from_->Step(); !s.ok()) return s.take_status();
    set_unindexed_from_->Reset();
    return tx.Commit();
  }();
  insert_->Reset();
  set_unindexed_from_->Reset();
  Status full = db_->Exec("PRAGMA synchronous=FULL");
  if (st.ok()) st = std::move(full);
  if (!st.ok()) return st;  // the packs are flushed: the rows stay pending for a later try
  pending_.clear();
  unindexed_from_written_ = unindexed_from;
  return Status::Ok();
}

Status BlockStore::SyncIndex() {
  std::lock_guard lock(db_mu_);
  VMSNAP_RETURN_IF_ERROR(FlushPendingLocked());
  // TRUNCATE: the log goes back to zero bytes once copied (this connection is the index's
  // only one, so nothing holds the checkpoint back). A checkpoint syncs the log first.
  return db_->Exec("PRAGMA wal_checkpoint(TRUNCATE)");
}

}  // namespace vmsnap::vault

// Content-addressed block storage on the local filesystem (docs/FORMAT.md, "Vault layout").
//
// Blocks are appended to pack files, DATA/blocks/packs/<8 digits>.pack ("VMPACK01", then
// VMB1 records: id, codec, sizes, payload; each append starts on a 4 KiB boundary and is
// written with O_DIRECT where the filesystem allows), and found through an index,
// DATA/blocks/index.db (SQLite, WAL): id -> pack, offset, length, payload bytes, last touch. Many
// blocks per file: no inode, directory entry and rename per block.
//
// Put verifies every new block first (decompressed and re-hashed: the id must be the SHA-256
// of the plaintext; a bad block rejects the whole batch) and appends the batch's records to the
// active pack. Their index rows are kept in memory (every lookup consults them) and written in
// one transaction by the Put that finds max_pending_rows rows or rows older than
// kMaxPendingAge pending, at SyncIndex, before garbage collection and at destruction: the
// packs are flushed (fdatasync) first, then the rows are committed, so no index row ever
// points at bytes that are not durable.
// The same transaction records where in the packs records without index rows may start (the
// table unindexed_from: the first record of the oldest append whose rows are not written yet,
// else the end of the active pack). If the vault process dies, Open finds the records from
// there on, verifies each (decompressed and re-hashed) and indexes them again: a Put that
// answered is not lost by a crash of the vault process. A power failure before the next flush
// may lose such records (not flushed yet); the blocks then count as missing, the backup's
// commit refuses to publish a point that refers to them (Catalog::Commit calls SyncIndex and
// checks every block), and its rerun uploads them again. Torn or damaged records found at
// start are skipped (dead bytes, reclaimed by Compact).
// Thread-safe: every method may be called from several threads at once. Concurrent puts of
// the same block are harmless (the first index row wins; the other copy is dead bytes).
//
// Garbage collection (issue 5): a block's touch time is the last time a backup wrote it (Put)
// or was told it is present (HasForUpload). RemoveUntouchedSince drops a block's index row
// only if its touch time is older than a cutoff, under an exclusive lock that Put and
// HasForUpload take shared: a backup either sees the block as missing (and uploads it again)
// or refreshes its touch time before the collector looks at it. Compact then rewrites packs
// that are mostly dead and deletes packs with no live block.
//
// Older vaults stored one file per block (DATA/blocks/<2 hex>/<64 hex>); Open moves such files
// into packs. When index.db is missing, Open rebuilds it by reading the packs.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/aligned_buffer.hpp"
#include "common/block_codec.hpp"
#include "common/http_types.hpp"
#include "common/status.hpp"

namespace vmsnap::vault {

class Db;
class DbStatement;

struct PutStats {
  uint64_t received = 0;  // blocks in the request
  uint64_t stored = 0;    // newly stored
  uint64_t already_present = 0;
  uint64_t bytes_stored = 0;  // payload bytes newly written
};

// Where a block's record is (for operators, verify messages and tests).
struct BlockLocation {
  std::string pack_path;
  uint64_t record_offset = 0;  // the record's first byte (its id)
  uint64_t record_length = 0;  // 41 bytes of record header + payload
};

struct CompactStats {
  uint64_t packs_rewritten = 0;  // live records copied to the active pack, old pack deleted
  uint64_t packs_deleted = 0;    // no live record left: deleted (rewritten ones included)
  uint64_t blocks_moved = 0;
  uint64_t bytes_reclaimed = 0;  // pack file bytes freed on disk
};

struct StoreUsage {
  uint64_t packs = 0;
  uint64_t pack_bytes = 0;  // pack files on disk
  uint64_t live_bytes = 0;  // records the index points to
};

class BlockStore {
 public:
  // Default size at which a pack file is closed: big enough that per-file costs vanish, small
  // enough that rewriting a mostly-dead pack is quick.
  static constexpr uint64_t kPackTargetBytes = 256ull << 20;

  // Pack files are closed and a new one started when the active pack would grow past
  // `pack_target_bytes` (tests use small packs).
  // `max_pending_rows`: index rows kept in memory before a Put writes them (tests use few).
  explicit BlockStore(std::string root, uint64_t pack_target_bytes = kPackTargetBytes,
                      size_t max_pending_rows = kMaxPendingRows);
  // Writes the pending index rows (a clean shutdown loses no upload); errors are logged.
  ~BlockStore();
  BlockStore(const BlockStore&) = delete;
  BlockStore& operator=(const BlockStore&) = delete;

  // Creates the directories and the index, rebuilds a missing index from the packs, indexes
  // the records a crashed run appended without writing their rows (see the top of this file),
  // moves legacy block files into packs. New blocks go to a new pack (never appended to a pack
  // a crashed run may have left with a torn tail). Call once, before any other method.
  Status Open();

  bool Has(const BlockId& id) const;
  // Has() for many ids under one lock: how many of `ids` are absent (a failed index lookup
  // counts as absent, as in Has), and the first absent one. Any thread.
  struct Absent {
    uint64_t count = 0;
    BlockId first;  // meaningful when count > 0
  };
  Absent FindAbsent(std::span<const BlockId> ids) const;
  // Verifies then stores every block not present yet. kCorruption names the first block
  // whose content does not match its id (nothing of the batch is stored then).
  // The payloads are only read during the call (views into the request body, say).
  // Durability: when Put returns, the records are written and every lookup finds them; they
  // survive a crash of the process (Open re-indexes them) but neither they nor their index
  // rows are flushed yet (see the top of this file); the Put that takes the pending rows past
  // the limit flushes them all (and fails if that flush fails).
  Result<PutStats> Put(std::span<const BlockRecordView> blocks);
  Result<PutStats> Put(const std::vector<EncodedBlock>& blocks);
  // Makes every block stored so far durable: flushes the packs, writes the pending index rows
  // and checkpoints the index's write-ahead log (which syncs it first) into index.db, then
  // truncates the log. Catalog::Commit calls it before it publishes a recovery point, so a
  // published point never refers to a block the vault could still forget. If the packs cannot
  // be flushed, the pending rows are dropped (their blocks count as missing, a backup sends
  // them again) and the error returned.
  Status SyncIndex();
  // Index rows kept in memory before a Put writes them: one transaction (and one fdatasync
  // per pack) for many uploads. Writing each upload's rows on its own cost 303 instead of 41
  // fdatasync calls and ~0.4 s in a 4 GiB full backup, and makes SQLite's log write each
  // touched 4 KiB index page again for every upload (docs/PERFORMANCE.md, sessions 6-9).
  static constexpr size_t kMaxPendingRows = 16384;
  // ...and at most this long, which bounds what Open has to re-index after a crash.
  static constexpr std::chrono::milliseconds kMaxPendingAge{2000};
  // A Put that takes a pack's unflushed bytes to this many flushes the pack (fdatasync) at
  // once, with no lock held, so that the flush before the commit (SyncIndex) and the flushes
  // under the index lock find little left: on a virtual disk a flush waits for everything
  // written since the last one (about 170 ms after 120 MB on the project's VM), and the last
  // upload of a backup is followed at once by its commit. A failed early flush fails that Put
  // and every later flush of the pack's pending rows, as a failed flush under the lock does.
  static constexpr uint64_t kEarlyFlushBytes = 32ull << 20;
  // Tests use a small threshold (0: never flush early).
  void set_early_flush_bytes(uint64_t bytes) { early_flush_bytes_ = bytes; }
  // Early flushes made so far.
  uint64_t early_flushes() const { return early_flushes_.load(); }
  // kNotFound if absent, kCorruption if the record cannot be read or holds another id (read
  // like a fetch of one block: AppendRecords).
  Result<EncodedBlock> Get(const BlockId& id) const;
  // Appends the stored records of `ids` (in that order, duplicates repeated) to `out` as they
  // are in the packs, which is the VMB1 record format: the body of a fetch answer without its
  // 8-byte header. The records are read in pack order, whatever their order in `ids`: those of
  // one pack at most kMaxReadGap apart with one call (kMaxReadSpan at most). Each record's
  // header is checked (its id, its sizes); the payload is not decoded. Same errors as Get, and
  // kInvalidArgument, before anything is read, for records of more than kMaxAnswerBytes in all;
  // `out` then holds a partial answer the caller must discard.
  Status AppendRecords(std::span<const BlockId> ids, std::string& out) const;
  // The most one AppendRecords call answers: a fetch's answer, which the agent reads whole.
  static constexpr uint64_t kMaxAnswerBytes = kMaxResponseBodyBytes;
  // Records of one pack that start at most this far past the end of the previous one are read
  // together, gap included: one read through a few dead or unrequested records costs less than
  // another I/O. Restoring an incremental point (its 2 % of changed blocks in a newer pack,
  // the rest around their stale versions in the full backup's packs) took 6 times as many
  // reads as the full point with exactly adjacent runs only (docs/PERFORMANCE.md, session 24).
  static constexpr uint64_t kMaxReadGap = 128 << 10;
  // The most one read of records spans (gap included).
  static constexpr uint64_t kMaxReadSpan = 8 << 20;
  // kNotFound if absent.
  Result<BlockLocation> Locate(const BlockId& id) const;

  // Has(), and when present refreshes the block's touch time to now (the "missing" query of a
  // backup: the block must survive until that backup commits). The batch form answers for
  // every id in one index transaction.
  bool HasForUpload(const BlockId& id);
  std::vector<bool> HasForUpload(std::span<const BlockId> ids);
  // Stored (payload) bytes of a block; 0 if absent.
  uint64_t StoredBytes(const BlockId& id) const;
  // The same for each of `ids`, in order, looked up a few thousand at a time under one lock
  // (other index users wait at most one such group). Any thread.
  std::vector<uint64_t> StoredBytes(std::span<const BlockId> ids) const;
  // Calls fn(id, payload_bytes, touched_unix_ms) for every stored block, in id order, with no
  // lock held: pending rows are written to the index first, then the rows are read a page
  // (16 Ki rows) at a time, so memory stays one page however large the index. A block stored
  // or removed during the walk may or may not be seen. An index error ends the walk early
  // (logged).
  void ForEach(const std::function<void(const BlockId&, uint64_t, int64_t)>& fn) const;
  // Drops every listed block whose touch time is before cutoff_unix_ms (real clock), in one
  // index transaction. Returns how many blocks and payload bytes were dropped. The pack bytes
  // are freed by Compact.
  struct Removed {
    uint64_t blocks = 0;
    uint64_t bytes = 0;
  };
  Result<Removed> RemoveUntouchedSince(std::span<const BlockId> ids, int64_t cutoff_unix_ms);
  // Rewrites every pack (but the active one) whose live records are less than
  // `min_live_fraction` of its size into the active pack, and deletes packs without live
  // records. Blocks stay readable throughout (Get waits while an index row moves). A crash
  // leaves either the old pack or the new copy indexed, never neither.
  Result<CompactStats> Compact(double min_live_fraction = 0.5);
  StoreUsage Usage() const;

  // Reads of pack files made by AppendRecords and Get since Open (thread-safe counters): one per
  // span of records read together; `bytes` counts the spans, gaps included; `direct` of them
  // bypassed the page cache.
  struct ReadCounts {
    uint64_t reads = 0, direct = 0, bytes = 0;
  };
  ReadCounts read_counts() const;

 private:
  struct Pack;
  struct IndexRow {
    int64_t pack = 0;
    uint64_t offset = 0;  // of the record
    uint64_t length = 0;  // record header + payload
  };
  struct PendingRow {
    IndexRow where;
    int64_t touched_ms = 0;
  };
  // The index row of `id`, pending or written (kNotFound when absent). Caller holds db_mu_.
  Result<IndexRow> LookupLocked(const BlockId& id) const;
  // Flushes the packs pending rows point into, then writes those rows in one transaction.
  // Caller holds db_mu_. On a failed flush the pending rows are dropped; on a failed
  // transaction they stay pending.
  Status FlushPendingLocked() const;
  Status OpenIndex();
  Status MigrateLegacyFiles();
  Status RebuildIndex();
  // Indexes the records of pack `number` from `from` on (INSERT OR IGNORE: rows already there
  // win), stopping at a torn record. `verify`: each record is decoded and re-hashed first and
  // skipped when it does not match its id. Adds the rows inserted to *rows. Caller holds
  // db_mu_ and a transaction.
  Status IndexPackRecords(int64_t number, uint64_t from, bool verify, uint64_t* rows);
  // Re-indexes the records found from unindexed_from on (a crashed run's answered uploads).
  Status RecoverUnindexedRecords();
  // Appends records to the active pack (rotating it when full) and makes them durable.
  // Returns the pack number and the offset of the first record.
  // `records` starts at an address aligned to 4 KiB and its size is a multiple of 4 KiB.
  // `sync`: flush the pack before returning; the caller writes the rows itself. Otherwise the
  // pack is flushed by the next FlushPendingLocked, and the append stays "in flight" (it holds
  // the unindexed_from watermark back) until the caller calls AppendIndexed.
  Result<std::pair<int64_t, uint64_t>> Append(std::string_view records, bool sync);
  // The rows of an append made with sync=false are pending now. Caller holds db_mu_.
  void AppendIndexed(std::pair<int64_t, uint64_t> at);
  // Where records without index rows may start: the oldest append in flight, else the end of
  // the active pack, else the start of the next pack. Caller holds append_mu_.
  std::pair<int64_t, uint64_t> UnindexedFromLocked() const;
  Result<std::shared_ptr<Pack>> PackForRead(int64_t number) const;
  // Runs at least this long are read with O_DIRECT where the filesystem allows it (shorter
  // ones would read a whole page anyway). Reading every run direct, even single records,
  // restored the 4 GiB image in 4.1-4.2 s against 4.3-4.6 s with a 256 KiB threshold.
  static constexpr uint64_t kDirectReadMinBytes = 4 << 10;
  // Reads [offset, offset + n) of the pack; returns where those bytes start inside `buffer`
  // (kept by the caller from one read to the next; valid until its next use).
  Result<const char*> ReadSpan(Pack& pack, uint64_t offset, uint64_t n,
                               AlignedBuffer& buffer) const;
  Status IndexInsert(std::span<const BlockRecordView> blocks, int64_t pack, uint64_t first_offset,
                     PutStats* stats);
  std::vector<bool> HasForUploadLocked(std::span<const BlockId> ids);
  std::string PackPath(int64_t number) const;

  std::string root_;
  uint64_t pack_target_bytes_;
  // Shared by Put/HasForUpload/Get, exclusive for RemoveUntouchedSince and Compact.
  mutable std::shared_mutex gc_mu_;
  // The index connection and its statements (one writer at a time).
  mutable std::mutex db_mu_;
  std::unique_ptr<Db> db_;
  std::unique_ptr<DbStatement> select_, touch_, insert_, remove_;
  // Rows of stored blocks not written to the index yet (under db_mu_; a cache of writes, so
  // const lookups may flush it).
  size_t max_pending_rows_;
  mutable std::unordered_map<BlockId, PendingRow, BlockIdHash> pending_;
  std::chrono::steady_clock::time_point pending_since_;  // when the oldest pending row came
  // The unindexed_from position last written to the index (under db_mu_; {-1, 0}: none yet).
  mutable std::pair<int64_t, uint64_t> unindexed_from_written_{-1, 0};
  // Set by Open when a full disk kept it from re-indexing the records from this position on:
  // the position written never moves past it in this run, so the next start re-indexes them.
  std::optional<std::pair<int64_t, uint64_t>> recover_from_;
  std::unique_ptr<DbStatement> set_unindexed_from_;
  // The active pack, appended under append_mu_ (taken after db_mu_ when both are held).
  mutable std::mutex append_mu_;
  mutable std::shared_ptr<Pack> active_;
  // Packs written to since their last flush (under append_mu_).
  mutable std::vector<std::shared_ptr<Pack>> unsynced_;
  // Appends (pack, offset) made by Put whose rows are not pending yet (under append_mu_).
  std::multiset<std::pair<int64_t, uint64_t>> in_flight_;
  int64_t next_pack_ = 1;
  // Buffers kept for the next append and the next direct read (a few concurrent uploads or
  // fetches of up to 8 MiB each, at most 4 x 16 MiB per pool).
  mutable AlignedBufferPool append_buffers_{4, 16 << 20};
  mutable AlignedBufferPool read_buffers_{4, 16 << 20};
  // Open read handles by pack number.
  mutable std::mutex packs_mu_;
  mutable std::map<int64_t, std::shared_ptr<Pack>> open_packs_;
  mutable std::atomic<uint64_t> pack_reads_{0}, pack_direct_reads_{0}, pack_read_bytes_{0};
  uint64_t early_flush_bytes_ = kEarlyFlushBytes;
  std::atomic<uint64_t> early_flushes_{0};
};

}  // namespace vmsnap::vault

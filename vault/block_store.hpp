// Content-addressed block storage on the local filesystem (docs/FORMAT.md, "Vault layout").
//
// Each block lives in DATA/blocks/<first two hex digits>/<64 hex digits> as a one-block batch
// record (codec + sizes + payload). Blocks are verified before they are stored (decompressed
// and re-hashed: the id must be the SHA-256 of the plaintext) and made durable before Put
// returns: files are written under temporary names, the filesystem is synced, they are
// renamed into place and the filesystem is synced again. A crash leaves at most temporary
// files (removed at start-up), never a visible half-written block.
// Thread-safe: concurrent puts of the same block are harmless (same content, atomic rename).
//
// Garbage collection (issue 5): a block file's modification time is the last time a backup
// wrote it (Put) or was told it is present (HasForUpload). RemoveIfUntouchedSince deletes a
// block only if its mtime is older than a cutoff, under an exclusive lock that Put and
// HasForUpload take shared: a backup either sees the block as missing (and uploads it again)
// or refreshes its mtime before the collector looks at it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <shared_mutex>
#include <string>
#include <vector>

#include "common/block_codec.hpp"
#include "common/status.hpp"

namespace vmsnap::vault {

struct PutStats {
  uint64_t received = 0;  // blocks in the request
  uint64_t stored = 0;    // newly stored
  uint64_t already_present = 0;
  uint64_t bytes_stored = 0;  // payload bytes newly written
};

class BlockStore {
 public:
  explicit BlockStore(std::string root);

  // Creates the shard directories and removes temporary files left by a crash.
  Status Open();

  bool Has(const BlockId& id) const;
  // Verifies then stores every block not present yet. kCorruption names the first block
  // whose content does not match its id (nothing of the batch is stored then).
  Result<PutStats> Put(const std::vector<EncodedBlock>& blocks);
  // kNotFound if absent, kCorruption if the file cannot be parsed or holds another id.
  Result<EncodedBlock> Get(const BlockId& id) const;
  // Path of a block's file (for operators and tests).
  std::string PathOf(const BlockId& id) const;

  // Has(), and when present refreshes the block's mtime to now (the "missing" query of a
  // backup: the block must survive until that backup commits).
  bool HasForUpload(const BlockId& id);
  // Stored (payload) bytes of a block: its file size minus the 49 bytes of batch framing;
  // 0 if absent.
  uint64_t StoredBytes(const BlockId& id) const;
  // Calls fn(id, payload_bytes, mtime_unix_ms) for every stored block (no lock held).
  void ForEach(const std::function<void(const BlockId&, uint64_t, int64_t)>& fn) const;
  // Deletes the block if its mtime is before cutoff_unix_ms (real clock). Returns the payload
  // bytes freed (0 if kept or absent).
  Result<uint64_t> RemoveIfUntouchedSince(const BlockId& id, int64_t cutoff_unix_ms);

 private:
  bool HasForUploadLocked(const BlockId& id);
  std::string root_;
  mutable std::shared_mutex gc_mu_;
};

}  // namespace vmsnap::vault

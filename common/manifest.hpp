// The per-disk manifest of a recovery point (docs/FORMAT.md).
//
// A full manifest lists every non-zero block of the disk (index -> block id); blocks not
// listed are zero. An incremental manifest names its parent recovery point and lists only
// the blocks that differ from the parent's resolved view: a new id, or "now zero". Its size
// therefore grows with the changed blocks, not with the disk. Entries are sorted by index.
// Encoded manifests end with the SHA-256 of everything before it; decoding checks it. A data
// entry may carry the block's XXH3-128 (its "check", docs/FORMAT.md).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/block_codec.hpp"
#include "common/status.hpp"

namespace vmsnap {

struct ManifestEntry {
  uint64_t index = 0;
  std::optional<BlockId> id;  // nullopt: the block is all zero
  // XXH3-128 of the block's plaintext, written by the agent that read the block (manifests of
  // older agents have none). A restore verifies the block with it instead of re-computing the
  // SHA-256, and an incremental without local state compares with it. Only with an id.
  std::optional<FastHash> check;
  bool operator==(const ManifestEntry&) const = default;
};

// One entry in the layout of docs/FORMAT.md: index (u64 little-endian), kind (0 zero, 1 data,
// 2 data with its check), then the id and the check when the kind has them. Writes at most
// kMaxManifestEntrySize bytes to `out` and returns how many. The agent's scratch slots hold
// entries in this layout too (agent/scratch.hpp).
inline constexpr size_t kMaxManifestEntrySize = 57;
size_t EncodeManifestEntry(const ManifestEntry& e, char* out);

struct Manifest {
  uint64_t disk_size = 0;
  uint32_t block_size = 0;
  std::string parent;  // parent recovery point id; empty for a full manifest
  std::vector<ManifestEntry> entries;

  bool is_full() const { return parent.empty(); }
  uint64_t block_count() const { return (disk_size + block_size - 1) / block_size; }
  bool operator==(const Manifest&) const = default;
};

// Binary encoding with a trailing SHA-256 checksum.
std::string EncodeManifest(const Manifest& m);

// Encodes a manifest piece by piece, for manifests too large to hold in memory (the agent
// sends the manifest of a large disk to the vault in parts): the header first (the number of
// entries must be known), then the entries in strictly increasing index order, then the
// checksum. Take() returns the bytes encoded since the last Take(); all of them followed by
// Finish() are exactly EncodeManifest's output. One thread at a time.
class ManifestEncoder {
 public:
  ManifestEncoder(uint64_t disk_size, uint32_t block_size, std::string_view parent,
                  uint64_t entry_count);
  ~ManifestEncoder();
  ManifestEncoder(const ManifestEncoder&) = delete;
  ManifestEncoder& operator=(const ManifestEncoder&) = delete;

  void Add(const ManifestEntry& e);
  // Bytes encoded and not yet taken.
  size_t pending_bytes() const { return out_.size(); }
  std::string Take();
  // The remaining bytes and the checksum. kInternal if the number of entries added differs
  // from the count in the header (the manifest would not decode). Call once, last.
  Result<std::string> Finish();

 private:
  std::string out_;
  std::unique_ptr<Sha256Stream> sum_;
  uint64_t expected_ = 0, added_ = 0;
};

// Fails with kCorruption on a bad magic, truncation, checksum mismatch, an unsorted or
// out-of-range index, or a zero entry in a full manifest.
Result<Manifest> DecodeManifest(std::string_view data);

// What a manifest says before its entries.
struct ManifestHeader {
  uint64_t disk_size = 0;
  uint32_t block_size = 0;
  std::string parent;  // empty for a full manifest
  uint64_t entry_count = 0;

  bool is_full() const { return parent.empty(); }
  uint64_t block_count() const { return (disk_size + block_size - 1) / block_size; }
};

// Decodes an encoded manifest piece by piece, for manifests too large to hold in memory (the
// vault's manifests of large disks: seal, commit and the paged map, docs/FORMAT.md). Memory is
// one read buffer (1 MiB) whatever the manifest's size. Open reads and checks the header; Next
// returns the following entries, each checked as DecodeManifest checks it. The trailing
// checksum can only be compared once the last entry has been read: entries handed out before
// that come from a manifest not yet known to be intact, so a caller must not act on them in a
// way it cannot undo until Next has reported the end. Errors: kCorruption (the same causes as
// DecodeManifest) or the source's own error. One thread at a time.
class ManifestReader {
 public:
  // Fills the front of `out` with the source's next bytes and returns how many; 0 only at the
  // source's end. An error ends the reading.
  using Source = std::function<Result<size_t>(std::span<char> out)>;

  // `total_size`: the encoded manifest's size (its last 32 bytes are the checksum).
  // `verify_checksum` false skips computing the checksum, for a manifest whose checksum the
  // caller has already compared (it still must be present).
  static Result<std::unique_ptr<ManifestReader>> Open(Source source, uint64_t total_size,
                                                      bool verify_checksum = true);
  // A manifest file. kNotFound if it does not exist, kIoError if it cannot be read. `tee`, if
  // given, receives every byte as it is read, in order (the vault copies a manifest while it
  // checks it); its error ends the reading.
  using Tee = std::function<Status(std::string_view bytes)>;
  static Result<std::unique_ptr<ManifestReader>> OpenFile(const std::string& path,
                                                          bool verify_checksum = true,
                                                          Tee tee = nullptr);
  ~ManifestReader();
  ManifestReader(const ManifestReader&) = delete;
  ManifestReader& operator=(const ManifestReader&) = delete;

  const ManifestHeader& header() const { return header_; }
  // Replaces `out` with the next entries, at most `max` (> 0) of them. `out` comes back empty
  // only at the end, once the checksum matched and nothing followed it.
  Status Next(std::vector<ManifestEntry>& out, size_t max);

 private:
  ManifestReader(Source source, uint64_t total_size, bool verify_checksum);
  // Buffers at least `n` unread bytes of the body (the bytes before the checksum), or all of
  // them if fewer remain; false if the source ended early.
  Result<bool> Fill(size_t n);
  Status ReadHeader();
  Status Finish();

  Source source_;
  uint64_t total_ = 0, body_size_ = 0;
  uint64_t pulled_ = 0;  // bytes taken from the source so far
  std::string buf_;      // pulled body bytes; [pos_, size) not yet parsed
  size_t pos_ = 0;
  std::string trailer_;                // pulled checksum bytes
  std::unique_ptr<Sha256Stream> sum_;  // null when the checksum is not verified
  ManifestHeader header_;
  uint64_t returned_ = 0, last_index_ = 0;
  bool done_ = false;
};

// Applies `delta` (an incremental manifest) on top of `base` (a full manifest of the parent):
// the result is the full manifest of the child. kInvalidArgument if geometry differs.
Result<Manifest> ApplyDelta(const Manifest& base, const Manifest& delta);

}  // namespace vmsnap

// The per-disk manifest of a recovery point (docs/FORMAT.md).
//
// A full manifest lists every non-zero block of the disk (index -> block id); blocks not
// listed are zero. An incremental manifest names its parent recovery point and lists only
// the blocks that differ from the parent's resolved view: a new id, or "now zero". Its size
// therefore grows with the changed blocks, not with the disk. Entries are sorted by index.
// Encoded manifests end with the SHA-256 of everything before it; decoding checks it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/block_codec.hpp"
#include "common/status.hpp"

namespace vmsnap {

struct ManifestEntry {
  uint64_t index = 0;
  std::optional<BlockId> id;  // nullopt: the block is all zero
  bool operator==(const ManifestEntry&) const = default;
};

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

// Applies `delta` (an incremental manifest) on top of `base` (a full manifest of the parent):
// the result is the full manifest of the child. kInvalidArgument if geometry differs.
Result<Manifest> ApplyDelta(const Manifest& base, const Manifest& delta);

}  // namespace vmsnap

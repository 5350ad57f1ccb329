// The agent's per-disk change-tracking state (docs/FORMAT.md, "Agent state").
//
// After a committed backup the agent stores, per disk, the recovery point it produced and a
// 128-bit XXH3 hash of every block (all-zero blocks hash as {0,0}). The next backup compares
// fresh hashes against it and pays SHA-256 and compression only for blocks that differ. The
// state is trusted only when it names the vault's latest recovery point for that disk with the
// same geometry; otherwise the agent falls back to comparing against the vault's block map.
// Files are written atomically and end with a SHA-256 checksum; a damaged file is ignored.
//
// The hashes (16 B per block: 512 MiB for a 1 TiB disk at 32 KiB blocks) are never held in
// memory whole: DiskStateReader verifies the file by streaming it and then reads the hashes of
// one range of blocks at a time; SaveDiskState pulls them from a callback range by range.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/block_codec.hpp"
#include "common/status.hpp"

namespace vmsnap::platform {
class DiskReader;
}

namespace vmsnap::agent {

struct DiskStateInfo {
  std::string vault_url;
  std::string item;
  std::string disk_key;
  std::string recovery_point;
  uint64_t disk_size = 0;
  uint32_t block_size = 0;
  uint64_t blocks = 0;
};

// The whole state in memory (small disks, tests).
struct DiskState {
  DiskStateInfo info;
  std::vector<FastHash> hashes;  // one per block
};

// Path of the state file for (vault, item, disk) under state_dir.
std::string DiskStatePath(const std::string& state_dir, const std::string& vault_url,
                          const std::string& item, const std::string& disk_key);

// An open, verified state file. ReadHashes may be called from several threads at once.
class DiskStateReader {
 public:
  // kNotFound: no file; kCorruption: it does not verify (checksum, header, length).
  static Result<std::unique_ptr<DiskStateReader>> Open(const std::string& path);
  ~DiskStateReader();
  const DiskStateInfo& info() const { return info_; }
  // The hashes of blocks [first, first + out.size()); the range must lie within the disk.
  Status ReadHashes(uint64_t first, std::span<FastHash> out);

 private:
  DiskStateReader() = default;
  DiskStateInfo info_;
  uint64_t hashes_offset_ = 0;
  std::unique_ptr<platform::DiskReader> file_;
};

// Fills `out` with the hashes of blocks [first, first + out.size()).
using HashSource = std::function<Status(uint64_t first, std::span<FastHash> out)>;

// Writes the state atomically (mode 0600), pulling info.blocks hashes from `source` in ranges
// of at most 64 Ki blocks, in order.
Status SaveDiskState(const std::string& path, const DiskStateInfo& info, const HashSource& source);

Status SaveDiskState(const std::string& path, const DiskState& state);
Result<DiskState> LoadDiskState(const std::string& path);

}  // namespace vmsnap::agent

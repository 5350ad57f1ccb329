// The agent's per-disk change-tracking state (docs/FORMAT.md, "Agent state").
//
// After a committed backup the agent stores, per disk, the recovery point it produced and a
// 128-bit XXH3 hash of every block (all-zero blocks hash as {0,0}). The next backup compares
// fresh hashes against it and pays SHA-256 and compression only for blocks that differ. The
// state is trusted only when it names the vault's latest recovery point for that disk with the
// same geometry; otherwise the agent falls back to comparing against the vault's block map.
// Files are written atomically and end with a SHA-256 checksum; a damaged file is ignored.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/block_codec.hpp"
#include "common/status.hpp"

namespace vmsnap::agent {

struct DiskState {
  std::string vault_url;
  std::string item;
  std::string disk_key;
  std::string recovery_point;
  uint64_t disk_size = 0;
  uint32_t block_size = 0;
  std::vector<FastHash> hashes;  // one per block
};

// Path of the state file for (vault, item, disk) under state_dir.
std::string DiskStatePath(const std::string& state_dir, const std::string& vault_url,
                          const std::string& item, const std::string& disk_key);

Result<DiskState> LoadDiskState(const std::string& path);
Status SaveDiskState(const std::string& path, const DiskState& state);

}  // namespace vmsnap::agent

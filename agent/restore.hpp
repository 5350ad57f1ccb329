// Restore of whole disks from a recovery point to block devices or image files.
//
// Every disk of the selection is restored in parallel: F fetcher threads, each with its own
// connection, fetch batches of blocks, verify each one (decompress; the XXH3-128 its manifest
// entry holds must match, or else, as for entries of older agents without one, the SHA-256
// must equal its id) and write it in place. Zero blocks are written as zeros unless the target was
// created empty. A new target file is written under PATH.vmsnap-partial and renamed only when
// complete and synced, so a failed restore never leaves a file that looks finished. An existing
// target (device or file) must be large enough; on failure its content is undefined and the error
// says so.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "agent/vault_client.hpp"
#include "common/https_client.hpp"
#include "common/status.hpp"
#include "platform/env.hpp"

namespace vmsnap::agent {

struct RestoreOptions {
  ClientOptions client;
  std::string recovery_point;
  int disk = -1;                     // -1: every disk of the point, one target each
  std::vector<std::string> targets;  // devices or files, in disk order
  int fetchers = 6;
  bool progress = true;
  // Refuse, before writing, targets whose filesystems lack the room the data takes
  // (--no-space-check turns it off: a filesystem that compresses may take less).
  bool check_space = true;
  // Where the block maps of the disks being restored are kept while the restore runs (57 B per
  // block with data, in nameless scratch files; agent/scratch.hpp).
  std::string state_dir = platform::DefaultAgentPaths().state_dir;
  uint64_t map_page_entries = kMapPageEntries;  // entries per request when the map is read
};

struct RestoreDiskReport {
  int index = 0;
  std::string source;  // the disk's path at backup time
  std::string target;
  uint64_t size_bytes = 0;
  uint64_t blocks_total = 0;
  uint64_t blocks_data = 0;  // fetched, verified and written
  uint64_t blocks_zero = 0;
  uint64_t bytes_fetched = 0;  // payload bytes (compressed)
  nlohmann::json ToJson() const;
};

struct RestoreReport {
  std::string recovery_point;
  std::string consistency;
  int64_t duration_ms = 0;
  uint64_t bytes_received = 0;
  std::vector<RestoreDiskReport> disks;
  nlohmann::json ToJson() const;
};

Result<RestoreReport> RunRestore(const RestoreOptions& options);

}  // namespace vmsnap::agent

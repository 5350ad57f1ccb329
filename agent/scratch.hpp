// Scratch files of the agent: what would grow with the disk or with the changes if it were
// held in memory (block hashes, manifest entries, block maps) is kept in nameless temporary
// files instead (platform::ScratchFile), so that the agent's memory does not depend on the
// size of the disks it backs up or restores (docs/ARCHITECTURE.md, "Memory bounds").
//
// Manifest entries are stored in fixed slots of kEntrySlot bytes, each an entry as a manifest
// lays it out (EncodeManifestEntry) padded with zeros: index (u64 little-endian), kind (1 =
// data, 2 = data with its check, 0 = zero or "no entry": bytes never written read as zero),
// block id (32 bytes; zero for kind 0), check (XXH3-128, low and high u64; zero unless kind 2).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/manifest.hpp"
#include "common/status.hpp"
#include "platform/env.hpp"

namespace vmsnap::agent {

constexpr uint64_t kEntrySlot = kMaxManifestEntrySize;

// A scratch file in STATE_DIR/disks if that directory exists (it holds the agent's state
// files, so it exists after the first backup), else in /var/tmp if it exists, else in the
// system's temporary directory. No directory is created, so a failed first backup or a restore
// on a machine without the agent's state leaves none behind. The error names the cause and how
// much space is needed.
Result<std::unique_ptr<platform::ScratchFile>> CreateScratch(const std::string& state_dir);

// Writes `entries` into consecutive slots starting at slot `first_slot`. `buf` is scratch
// memory reused between calls.
Status WriteEntrySlots(platform::ScratchFile& file, uint64_t first_slot,
                       std::span<const ManifestEntry> entries, std::string& buf);

// Writes each entry into the slot of its block index (a block map addressed by index: slots of
// blocks without an entry stay zero, i.e. "no entry"), each run of consecutive indexes with one
// write. kCorruption if an index is not below `block_count`.
Status WriteEntriesAtTheirIndex(platform::ScratchFile& file, std::span<const ManifestEntry> entries,
                                uint64_t block_count, std::string& buf);

// Reads `count` slots starting at slot `first_slot` into `out` (replacing its content), one
// entry per slot: a slot of kind 0 gives an entry without id.
Status ReadEntrySlots(platform::ScratchFile& file, uint64_t first_slot, uint64_t count,
                      std::vector<ManifestEntry>& out, std::string& buf);

}  // namespace vmsnap::agent

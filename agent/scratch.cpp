#include "agent/scratch.hpp"

#include <cstring>
#include <filesystem>
#include <vector>

#include "common/bytes.hpp"

namespace vmsnap::agent {

Result<std::unique_ptr<platform::ScratchFile>> CreateScratch(const std::string& state_dir) {
  auto* env = platform::Env::Default();
  std::vector<std::string> dirs{state_dir + "/disks", "/var/tmp"};
  std::error_code ec;
  if (auto tmp = std::filesystem::temp_directory_path(ec); !ec) dirs.push_back(tmp.string());
  Status first_error;
  for (const auto& dir : dirs) {
    if (!std::filesystem::is_directory(dir, ec)) continue;
    auto file = env->CreateScratchFile(dir);
    if (file.ok()) return file;
    if (first_error.ok()) first_error = file.take_status();
  }
  const std::string cause = first_error.ok() ? "no directory for scratch files: none of " +
                                                   dirs[0] + ", " + dirs[1] + " exists"
                                             : first_error.cause();
  return Status::Error(Code::kIoError, cause,
                       "give the agent a writable --state-dir with free space (a backup needs "
                       "about 16 bytes per block of each disk plus 57 per changed block, a "
                       "restore 57 per block with data, while it runs)")
      .InPhase("prepare");
}

Status WriteEntrySlots(platform::ScratchFile& file, uint64_t first_slot,
                       std::span<const ManifestEntry> entries, std::string& buf) {
  if (entries.empty()) return Status::Ok();
  buf.assign(entries.size() * kEntrySlot, '\0');
  char* p = buf.data();
  for (const auto& e : entries) {
    EncodeManifestEntry(e, p);  // the rest of a shorter entry's slot stays zero
    p += kEntrySlot;
  }
  return file.WriteAt(first_slot * kEntrySlot, std::as_bytes(std::span(buf.data(), buf.size())));
}

Status WriteEntriesAtTheirIndex(platform::ScratchFile& file, std::span<const ManifestEntry> e,
                                uint64_t block_count, std::string& buf) {
  for (size_t i = 0, j; i < e.size(); i = j) {
    for (j = i + 1; j < e.size() && e[j].index == e[j - 1].index + 1 && j - i < 4096;) ++j;
    if (e[j - 1].index >= block_count || e[i].index > e[j - 1].index)
      return Status::Corruption("a block map entry lies beyond the disk's " +
                                std::to_string(block_count) + " blocks");
    VMSNAP_RETURN_IF_ERROR(WriteEntrySlots(file, e[i].index, e.subspan(i, j - i), buf));
  }
  return Status::Ok();
}

Status ReadEntrySlots(platform::ScratchFile& file, uint64_t first_slot, uint64_t count,
                      std::vector<ManifestEntry>& out, std::string& buf) {
  buf.resize(count * kEntrySlot);
  VMSNAP_RETURN_IF_ERROR(file.ReadAt(first_slot * kEntrySlot,
                                     std::as_writable_bytes(std::span(buf.data(), buf.size()))));
  out.resize(count);
  const char* p = buf.data();
  for (auto& e : out) {
    e.index = LoadLe64(p);
    e.id.reset();
    e.check.reset();
    if (p[8] != 0) {
      BlockId id;
      std::memcpy(id.bytes.data(), p + 9, 32);
      e.id = id;
    }
    if (p[8] == 2) e.check = FastHash{LoadLe64(p + 41), LoadLe64(p + 49)};
    p += kEntrySlot;
  }
  return Status::Ok();
}

}  // namespace vmsnap::agent

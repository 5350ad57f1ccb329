// `vmsnap restore-files`: mount a recovery point in a private temporary directory, copy the
// requested paths out with `cp -a --preserve=all` (ownership, modes, timestamps, symlinks,
// hard links and xattrs kept), and unmount again — also when the copy fails.
//
// PATH is relative to the mount layout of attach.hpp: `disk<N>/part<M>/some/dir` (or
// `disk<N>/whole/...`). It must not contain `..`; symlinks in its directories must stay inside
// that filesystem. Each PATH is copied to DIR/<last component of PATH>.
//
// Existing files under DIR are never overwritten unless `overwrite` is set (checked for the
// whole tree before anything is copied). Existing directories are merged.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "agent/mount/attach.hpp"

namespace vmsnap::mount {

struct RestoreFilesOptions {
  ImageOptions images;
  std::vector<std::string> paths;
  std::string to;
  bool overwrite = false;
  std::string state_dir = kDefaultStateDir;
  std::string work_dir = "/tmp";  // where the temporary mount point is created
};

struct RestoreFilesReport {
  std::string recovery_point;
  std::string consistency;
  uint64_t files = 0;  // regular files
  uint64_t directories = 0;
  uint64_t symlinks = 0;
  uint64_t other = 0;                                       // devices, fifos, sockets
  uint64_t bytes = 0;                                       // sum of regular file sizes
  std::vector<std::pair<std::string, std::string>> copied;  // PATH -> target
  nlohmann::json stats;  // image statistics (blocks fetched, cache hits)
  nlohmann::json ToJson() const;
};

Result<RestoreFilesReport> RunRestoreFiles(const RestoreFilesOptions& options);

}  // namespace vmsnap::mount

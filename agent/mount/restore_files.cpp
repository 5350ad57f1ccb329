#include "agent/mount/restore_files.hpp"

#include <stdlib.h>

#include <filesystem>

#include "agent/mount/system.hpp"

namespace vmsnap::mount {

using nlohmann::json;
namespace fs = std::filesystem;

json RestoreFilesReport::ToJson() const {
  json c = json::array();
  for (const auto& [from, to] : copied) c.push_back({{"path", from}, {"target", to}});
  return {{"recovery_point", recovery_point},
          {"consistency", consistency},
          {"files", files},
          {"directories", directories},
          {"symlinks", symlinks},
          {"other", other},
          {"bytes", bytes},
          {"copied", c},
          {"stats", stats}};
}

namespace {

// A fresh directory, removed (only if empty) on destruction.
class TempMountPoint {
 public:
  explicit TempMountPoint(const std::string& parent) {
    std::string tmpl = parent + "/vmsnap-restore-XXXXXX";
    if (::mkdtemp(tmpl.data())) path_ = tmpl;
  }
  ~TempMountPoint() {
    std::error_code ec;
    if (!path_.empty()) fs::remove(path_, ec);
  }
  TempMountPoint(const TempMountPoint&) = delete;
  TempMountPoint& operator=(const TempMountPoint&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// "disk0/part1/etc" -> ok, with the filesystem root "disk0/part1".
Status ValidatePath(const std::string& path, std::string& fs_root) {
  const std::string fix =
      "write PATH as disk<N>/part<M>/some/path (or disk<N>/whole/...), as laid out by "
      "`vmsnap mount`";
  fs::path p(path);
  if (path.empty() || p.is_absolute())
    return Status::InvalidArgument("--path '" + path + "' must be relative to the mount layout",
                                   fix);
  std::vector<std::string> parts;
  for (const auto& c : p) {
    std::string s = c.string();
    if (s == "..")
      return Status::InvalidArgument("--path '" + path + "' must not contain '..'", fix);
    if (s.empty() || s == ".") continue;
    parts.push_back(s);
  }
  if (parts.size() < 2 || parts[0].rfind("disk", 0) != 0 ||
      (parts[1].rfind("part", 0) != 0 && parts[1] != "whole"))
    return Status::InvalidArgument("--path '" + path + "' does not start with disk<N>/part<M>",
                                   fix);
  fs_root = parts[0] + "/" + parts[1];
  return Status::Ok();
}

std::string Available(const MountReport& r) {
  std::string out;
  for (const auto& d : r.disks)
    for (const auto& f : d.filesystems)
      if (!f.path.empty())
        out += (out.empty() ? "" : ", ") + std::string("disk") + std::to_string(d.index) + "/" +
               f.name;
  return out.empty() ? "none (no filesystem could be mounted)" : out;
}

}  // namespace

Result<RestoreFilesReport> RunRestoreFiles(const RestoreFilesOptions& opt) {
  const std::string phase = "restore files";
  if (opt.paths.empty())
    return Status::InvalidArgument("no --path given", "pass --path disk<N>/part<M>/...")
        .InPhase(phase);
  if (opt.to.empty())
    return Status::InvalidArgument("no --to directory given", "pass --to DIR").InPhase(phase);
  std::vector<std::string> roots;
  for (const auto& p : opt.paths) {
    std::string root;
    VMSNAP_RETURN_IF_ERROR(ValidatePath(p, root).InPhase(phase));
    roots.push_back(root);
  }
  std::error_code ec;
  fs::create_directories(opt.to, ec);
  if (ec || !fs::is_directory(opt.to))
    return Status::InvalidArgument("--to " + opt.to + " is not a directory we can create",
                                   "pass a writable directory")
        .InPhase(phase);
  std::string to = fs::canonical(opt.to, ec).string();

  TempMountPoint tmp(opt.work_dir);
  if (tmp.path().empty())
    return Status::IoError("cannot create a temporary mount point in " + opt.work_dir,
                           "make it writable or pass another --work-dir")
        .InPhase(phase);
  MountOptions mo;
  mo.images = opt.images;
  mo.mountpoint = tmp.path();
  mo.state_dir = opt.state_dir;
  auto session = MountSession::Start(mo);
  if (!session.ok()) return session.take_status();
  const MountReport& mr = (*session)->report();

  RestoreFilesReport report;
  report.recovery_point = mr.recovery_point;
  report.consistency = mr.consistency;
  std::vector<std::string> conflicts;
  std::vector<std::pair<std::string, std::string>> jobs;  // source, target
  for (size_t i = 0; i < opt.paths.size(); ++i) {
    const std::string& path = opt.paths[i];
    std::string fs_root = mr.mountpoint + "/" + roots[i];
    if (!sys::IsMountPoint(fs_root))
      return Status::NotFound(
                 roots[i] + " is not a mounted filesystem of recovery point " + mr.recovery_point,
                 "available: " + Available(mr))
          .InPhase(phase);
    fs::path src = fs::path(mr.mountpoint) / fs::path(path).lexically_normal();
    std::string src_s = src.string();
    while (src_s.size() > 1 && src_s.back() == '/') src_s.pop_back();
    src = src_s;
    // Directories on the way must resolve inside the filesystem (no symlink to the host).
    const bool whole_fs = src_s == fs_root;
    std::string parent = whole_fs ? fs_root : fs::canonical(src.parent_path(), ec).string();
    if (ec || (parent != fs_root && parent.rfind(fs_root + "/", 0) != 0) ||
        !fs::exists(fs::symlink_status(src, ec)))
      return Status::NotFound(
                 "'" + path + "' does not exist in recovery point " + mr.recovery_point,
                 "check the path with `vmsnap mount` (available: " + Available(mr) + ")")
          .InPhase(phase);
    fs::path target = fs::path(to) / src.filename();
    if (whole_fs) target = fs::path(to) / fs::path(roots[i]).filename();
    jobs.push_back({src_s, target.string()});
    report.copied.push_back({path, target.string()});
    auto count = [&](const fs::path& from, const fs::path& dest) {
      auto st = fs::symlink_status(from, ec);
      if (fs::is_symlink(st))
        report.symlinks++;
      else if (fs::is_directory(st))
        report.directories++;
      else if (fs::is_regular_file(st)) {
        report.files++;
        report.bytes += fs::file_size(from, ec);
      } else {
        report.other++;
      }
      auto dst = fs::symlink_status(dest, ec);
      if (fs::exists(dst) && !(fs::is_directory(dst) && fs::is_directory(st)))
        conflicts.push_back(dest.string());
    };
    count(src, target);
    if (fs::is_directory(fs::symlink_status(src, ec)))
      for (auto it = fs::recursive_directory_iterator(src, ec);
           !ec && it != fs::recursive_directory_iterator(); it.increment(ec))
        count(it->path(), target / fs::relative(it->path(), src));
    if (ec)
      return Status::IoError("reading " + path + " from the recovery point failed: " + ec.message(),
                             "check the mount log; the vault may be unreachable")
          .InPhase(phase);
  }
  if (!conflicts.empty() && !opt.overwrite)
    return Status::Error(Code::kAlreadyExists,
                         std::to_string(conflicts.size()) + " file(s) already exist in " + to +
                             " (first: " + conflicts.front() + ")",
                         "pass --overwrite to replace them, or choose an empty --to directory")
        .InPhase(phase);
  for (const auto& [src, target] : jobs) {
    std::vector<std::string> argv{"cp", "-a", "--preserve=all", "--no-target-directory"};
    if (opt.overwrite) argv.push_back("--remove-destination");
    argv.insert(argv.end(), {"--", src, target});
    auto r = sys::RunCommand(argv, "coreutils");
    if (!r.ok()) return r.take_status().InPhase(phase);
    if (r->exit_code != 0)
      return Status::IoError("copying " + src + " to " + target + " failed: " + r->err,
                             "check free space and permissions in " + to +
                                 "; an I/O error means the vault could not be read")
          .InPhase(phase);
  }
  report.stats = (*session)->images().StatsJson();
  Status st = (*session)->Teardown();
  if (!st.ok()) return st;
  return report;
}

}  // namespace vmsnap::mount

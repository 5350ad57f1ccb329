// Linux snapshot providers (platform/snapshot.hpp).
#include "platform/snapshot.hpp"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "platform/quiesce.hpp"
#include "platform/snapshot_command.hpp"

namespace vmsnap::platform {
namespace fs = std::filesystem;

namespace {

constexpr const char* kPhase = "snapshot";

bool IsReflinkUnsupported(int err) {
  return err == EOPNOTSUPP || err == EXDEV || err == EINVAL || err == ENOTTY || err == ENOSYS;
}

std::string NewClonePath(const std::string& source) {
  static std::atomic<uint64_t> counter{0};
  return source + ".vmsnap-snap-" + std::to_string(::getpid()) + "-" +
         std::to_string(counter.fetch_add(1));
}

// The LVM tools live in /usr/sbin (or /sbin on unmerged systems).
std::string LvmTool(const std::string& name) {
  for (const char* dir : {"/usr/sbin/", "/sbin/", "/usr/bin/"}) {
    std::error_code ec;
    if (fs::exists(std::string(dir) + name, ec)) return std::string(dir) + name;
  }
  return "/usr/sbin/" + name;
}

class LinuxSnapshot final : public Snapshot {
 public:
  explicit LinuxSnapshot(std::string provider) : provider_(std::move(provider)) {}
  ~LinuxSnapshot() override { (void)Delete(); }

  const std::vector<SnapshotDisk>& disks() const override { return disks_; }
  bool atomic() const override { return atomic_ || disks_.size() <= 1; }
  int64_t completed_at_us() const override { return completed_at_us_; }
  const std::string& provider() const override { return provider_; }

  Status Delete() override {
    std::string problems;
    for (const auto& clone : clones_) {
      std::error_code ec;
      fs::remove(clone, ec);
      if (ec) problems += (problems.empty() ? "" : "; ") + clone + ": " + ec.message();
    }
    clones_.clear();
    for (const auto& lv : lvm_snapshots_) {
      ProcessSpec spec;
      spec.path = LvmTool("lvremove");
      spec.args = {"-f", "-y", lv};
      spec.timeout = std::chrono::seconds(60);
      auto r = RunProcess(spec);
      if (!r.ok() || !r->succeeded())
        problems += (problems.empty() ? "" : "; ") + std::string("lvremove ") + lv + ": " +
                    (r.ok() ? r->Describe() + ": " + r->output_tail : r.status().ToString());
    }
    lvm_snapshots_.clear();
    if (!cleanup_command_.empty()) {
      ProcessSpec spec;
      spec.path = cleanup_command_;
      for (const auto& d : disks_) spec.args.push_back(d.read_path);
      spec.timeout = std::chrono::seconds(60);
      auto r = RunProcess(spec);
      if (!r.ok())
        problems += (problems.empty() ? "" : "; ") + r.status().ToString();
      else if (!r->succeeded())
        problems += (problems.empty() ? "" : "; ") + cleanup_command_ + ": " + r->Describe() +
                    ": " + r->output_tail;
      cleanup_command_.clear();
    }
    if (problems.empty()) return Status::Ok();
    return Status::IoError("could not delete the snapshot: " + problems,
                           "delete the listed files or snapshots by hand")
        .InPhase("delete snapshot");
  }

  std::vector<SnapshotDisk> disks_;
  std::vector<std::string> clones_;
  std::vector<std::string> lvm_snapshots_;  // "VG/LV" of snapshots this backup created
  std::string cleanup_command_;
  bool atomic_ = false;
  int64_t completed_at_us_ = 0;
  std::string provider_;
};

Status CloneFor(LinuxSnapshot& snap, const std::string& disk, const std::string& source,
                const std::string& provider, bool guarded_fallback) {
  std::string clone = NewClonePath(source);
  Status s = ReflinkCopy(source, clone);
  SnapshotDisk d{disk, clone, provider, true, ""};
  if (s.ok()) {
    snap.clones_.push_back(clone);
  } else if (guarded_fallback && s.code() == Code::kInvalidArgument) {
    d.read_path = source;
    d.point_in_time = false;
    d.note = "no reflink on this filesystem (" + s.cause() +
             "): guarded read of the live file; compare its identity before and after reading";
  } else {
    return std::move(s).InPhase(kPhase);
  }
  snap.disks_.push_back(std::move(d));
  return Status::Ok();
}

// LVM: a snapshot LV of the disk's logical volume, created inside the freeze window. Thin
// volumes get a thin snapshot (no size, activation skip off); classic volumes a copy-on-write
// snapshot sized at 10 % of the origin. The snapshot is read through /dev/VG/NAME and removed
// with lvremove by Delete().
Status LvmSnapshotFor(LinuxSnapshot& snap, const std::string& disk,
                      std::chrono::steady_clock::time_point deadline) {
  std::error_code ec;
  if (!fs::exists("/dev/mapper/control", ec))
    return Status::InvalidArgument(
               "the lvm provider needs device-mapper, and /dev/mapper/control "
               "does not exist on this machine",
               "load the dm_mod kernel module, or use another provider")
        .InPhase(kPhase);
  if (!fs::exists(LvmTool("lvs"), ec) || !fs::exists(LvmTool("lvcreate"), ec))
    return Status::InvalidArgument(
               "the lvm provider needs lvm2 (lvs, lvcreate, lvremove), and it is not "
               "installed on this machine",
               "install lvm2 (apt-get install lvm2), or use another provider")
        .InPhase(kPhase);
  auto left = [&] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(deadline -
                                                                 std::chrono::steady_clock::now());
  };
  if (left().count() <= 0)
    return Status::Error(Code::kTimeout,
                         "the freeze deadline passed before " + disk + " was snapshotted")
        .InPhase(kPhase);
  ProcessSpec query;
  query.path = LvmTool("lvs");
  query.args = {"--noheadings", "--separator", "|", "-o", "vg_name,lv_name,lv_attr,pool_lv", disk};
  query.timeout = left();
  auto q = RunProcess(query);
  if (!q.ok()) return q.take_status().InPhase(kPhase);
  if (!q->succeeded())
    return Status::InvalidArgument("disk " + disk + " is not an LVM logical volume (" +
                                       q->Describe() + ": " + q->output_tail + ")",
                                   "use the lvm provider only for /dev/VG/LV disks (install lvm2)")
        .InPhase(kPhase);
  std::vector<std::string> fields;
  std::stringstream line(q->stdout_text);
  for (std::string f; std::getline(line, f, '|');) {
    f.erase(0, f.find_first_not_of(" \t\n"));
    f.erase(f.find_last_not_of(" \t\n") + 1);
    fields.push_back(f);
  }
  if (fields.size() < 3 || fields[0].empty() || fields[1].empty())
    return Status::InvalidArgument("lvs did not describe " + disk + ": " + q->stdout_text)
        .InPhase(kPhase);
  const std::string& vg = fields[0];
  const std::string& lv = fields[1];
  const bool thin = (fields.size() > 3 && !fields[3].empty()) || fields[2].rfind('V', 0) == 0;
  const std::string name = lv + "-vmsnap-" + std::to_string(::getpid()) + "-" +
                           std::to_string(snap.lvm_snapshots_.size());
  ProcessSpec create;
  create.path = LvmTool("lvcreate");
  create.args =
      thin ? std::vector<std::string>{"-s", "-kn", "-y", "-n", name, vg + "/" + lv}
           : std::vector<std::string>{"-s", "-y", "-l", "10%ORIGIN", "-n", name, vg + "/" + lv};
  create.timeout = left();
  auto c = RunProcess(create);
  if (!c.ok()) return c.take_status().InPhase(kPhase);
  if (c->timed_out)
    return Status::Error(Code::kTimeout, "lvcreate for " + disk + " ran past the freeze deadline",
                         "raise the freeze deadline (max 60 s)")
        .InPhase(kPhase);
  if (!c->succeeded())
    return Status::IoError("lvcreate snapshot of " + vg + "/" + lv + " failed: " + c->Describe() +
                               ": " + c->output_tail,
                           "check free extents in volume group " + vg +
                               " (classic snapshots "
                               "need 10 % of the origin)")
        .InPhase(kPhase);
  snap.lvm_snapshots_.push_back(vg + "/" + name);
  snap.disks_.push_back(
      {disk, "/dev/" + vg + "/" + name, "lvm", true, thin ? "thin snapshot" : "classic snapshot"});
  return Status::Ok();
}

}  // namespace

Status ReflinkCopy(const std::string& source, const std::string& target) {
  int src = ::open(source.c_str(), O_RDONLY | O_CLOEXEC);
  if (src < 0) return Status::FromErrno(errno, "open " + source);
  int dst = ::open(target.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (dst < 0) {
    int err = errno;
    ::close(src);
    return Status::FromErrno(err, "create clone " + target);
  }
  int rc = ::ioctl(dst, FICLONE, src);
  int err = errno;
  ::close(src);
  ::close(dst);
  if (rc == 0) return Status::Ok();
  ::unlink(target.c_str());
  if (IsReflinkUnsupported(err))
    return Status::InvalidArgument(
        "reflink copy of " + source + " is not supported (" + std::strerror(err) + ")",
        "keep the image on btrfs or XFS with reflink=1, or use the command provider");
  return Status::FromErrno(err, "reflink copy of " + source + " to " + target);
}

Result<std::unique_ptr<Snapshot>> TakeSnapshot(const std::vector<std::string>& disks,
                                               const SnapshotOptions& options,
                                               std::chrono::steady_clock::time_point deadline) {
  const std::string& p = options.provider;
  if (disks.empty()) return Status::InvalidArgument("no disk to snapshot").InPhase(kPhase);
  if (p == "lvm") {
    auto snap = std::make_unique<LinuxSnapshot>(p);
    for (const auto& disk : disks) VMSNAP_RETURN_IF_ERROR(LvmSnapshotFor(*snap, disk, deadline));
    snap->completed_at_us_ = MonotonicNowUs();
    return std::unique_ptr<Snapshot>(std::move(snap));
  }
  if (p != "auto" && p != "file" && p != "loop-reflink" && p != "command")
    return Status::InvalidArgument("unknown snapshot provider '" + p + "'",
                                   "use auto, file, loop-reflink, command or lvm")
        .InPhase(kPhase);

  auto snap = std::make_unique<LinuxSnapshot>(p);
  if (p == "command") {
    bool command_succeeded = false;
    auto taken = RunSnapshotCommand(disks, options, deadline, &command_succeeded);
    if (command_succeeded)  // cleans up even on a bad answer
      snap->cleanup_command_ = options.cleanup_command_path;
    if (!taken.ok()) return taken.take_status();
    snap->disks_ = std::move(*taken);
    snap->atomic_ = options.command_is_atomic;
    snap->completed_at_us_ = MonotonicNowUs();
    return std::unique_ptr<Snapshot>(std::move(snap));
  }

  for (const auto& disk : disks) {
    if (std::chrono::steady_clock::now() >= deadline)
      return Status::Error(Code::kTimeout,
                           "the freeze deadline passed before " + disk + " was snapshotted")
          .InPhase(kPhase);
    struct stat st {};
    if (::stat(disk.c_str(), &st) != 0)
      return Status::FromErrno(errno, "disk " + disk).InPhase(kPhase);
    const bool is_loop =
        S_ISBLK(st.st_mode) && fs::path(disk).filename().string().rfind("loop", 0) == 0;
    if ((p == "loop-reflink" || p == "auto") && is_loop) {
      auto backing = LoopBackingFile(disk);
      if (!backing.ok()) return backing.take_status().InPhase(kPhase);
      VMSNAP_RETURN_IF_ERROR(CloneFor(*snap, disk, *backing, "loop-reflink", false));
    } else if ((p == "file" || p == "auto") && S_ISREG(st.st_mode)) {
      VMSNAP_RETURN_IF_ERROR(CloneFor(*snap, disk, disk, "file", true));
    } else {
      return Status::InvalidArgument(
                 "no snapshot provider '" + p + "' for disk " + disk +
                     (S_ISBLK(st.st_mode) ? " (a block device that is not a loop device)" : ""),
                 "configure the command provider for this disk, or explicitly allow a "
                 "none-consistency live read")
          .InPhase(kPhase);
    }
  }
  snap->completed_at_us_ = MonotonicNowUs();
  return std::unique_ptr<Snapshot>(std::move(snap));
}

}  // namespace vmsnap::platform

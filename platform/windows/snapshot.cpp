// Windows snapshot providers (platform/snapshot.hpp).
//
// Volumes and physical disks get their point-in-time copy from VSS, which the consistency
// engine runs before TakeSnapshot is reached (platform/vss.hpp). What remains here:
//   "file"/"auto" for a disk image file: a guarded read of the live file (Windows has no
//                 reflink copy here; the reader compares the file's identity before and after)
//   "command"     an owner-supplied program (trusted: see CheckTrustedFile) that prints one
//                 path to read per disk
//   "loop-reflink", "lvm": Linux only, a clear kInvalidArgument.
#include "platform/snapshot.hpp"

#include <windows.h>

#include "platform/quiesce.hpp"
#include "platform/snapshot_command.hpp"
#include "platform/windows/win_util.hpp"

namespace vmsnap::platform {
namespace {

constexpr const char* kPhase = "snapshot";

class WindowsSnapshot final : public Snapshot {
 public:
  explicit WindowsSnapshot(std::string provider) : provider_(std::move(provider)) {}
  ~WindowsSnapshot() override { (void)Delete(); }

  const std::vector<SnapshotDisk>& disks() const override { return disks_; }
  bool atomic() const override { return atomic_ || disks_.size() <= 1; }
  int64_t completed_at_us() const override { return completed_at_us_; }
  const std::string& provider() const override { return provider_; }

  // Runs the command provider's cleanup program once (with the paths it printed).
  Status Delete() override {
    if (cleanup_command_.empty()) return Status::Ok();
    ProcessSpec spec;
    spec.path = cleanup_command_;
    for (const auto& d : disks_) spec.args.push_back(d.read_path);
    spec.timeout = std::chrono::seconds(60);
    cleanup_command_.clear();
    auto r = RunProcess(spec);
    if (r.ok() && r->succeeded()) return Status::Ok();
    return Status::IoError(
               "could not delete the snapshot: " + spec.path + ": " +
                   (r.ok() ? r->Describe() + ": " + r->output_tail : r.status().ToString()),
               "delete the snapshot the command made by hand")
        .InPhase("delete snapshot");
  }

  std::vector<SnapshotDisk> disks_;
  std::string cleanup_command_;
  bool atomic_ = false;
  int64_t completed_at_us_ = 0;
  std::string provider_;
};

bool IsDevice(const std::string& disk) {
  return disk.rfind("\\\\.\\", 0) == 0 || disk.rfind("\\\\?\\GLOBALROOT\\", 0) == 0;
}

}  // namespace

Status ReflinkCopy(const std::string& source, const std::string&) {
  return Status::InvalidArgument("reflink copy of " + source + " is not supported on Windows",
                                 "back up volumes and disks through VSS, or use the command "
                                 "provider");
}

Result<std::unique_ptr<Snapshot>> TakeSnapshot(const std::vector<std::string>& disks,
                                               const SnapshotOptions& options,
                                               std::chrono::steady_clock::time_point deadline) {
  const std::string& p = options.provider;
  if (disks.empty()) return Status::InvalidArgument("no disk to snapshot").InPhase(kPhase);
  if (p == "loop-reflink" || p == "lvm")
    return Status::InvalidArgument("snapshot provider '" + p + "' exists on Linux only",
                                   "on Windows use auto, file or command (VSS covers volumes "
                                   "and disks)")
        .InPhase(kPhase);
  if (p != "auto" && p != "file" && p != "command")
    return Status::InvalidArgument("unknown snapshot provider '" + p + "'",
                                   "use auto, file or command")
        .InPhase(kPhase);

  auto snap = std::make_unique<WindowsSnapshot>(p);
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
                           "the deadline passed before " + disk + " was snapshotted")
          .InPhase(kPhase);
    if (IsDevice(disk))
      return Status::InvalidArgument("no snapshot provider '" + p + "' for device " + disk +
                                         ": Windows snapshots volumes and disks with VSS",
                                     "make VSS available (run as Administrator on Windows), "
                                     "configure the command provider, or explicitly allow a "
                                     "none-consistency live read")
          .InPhase(kPhase);
    DWORD attrs = ::GetFileAttributesW(win::Widen(disk).c_str());
    if (attrs == INVALID_FILE_ATTRIBUTES)
      return win::FromWin32(::GetLastError(), "disk " + disk).InPhase(kPhase);
    if (attrs & FILE_ATTRIBUTE_DIRECTORY)
      return Status::InvalidArgument("disk " + disk + " is a directory",
                                     "pass a disk image file or a device")
          .InPhase(kPhase);
    snap->disks_.push_back(
        {disk, disk, "file", false,
         "no reflink copy on Windows: guarded read of the live file; compare its identity "
         "before and after reading"});
  }
  snap->completed_at_us_ = MonotonicNowUs();
  return std::unique_ptr<Snapshot>(std::move(snap));
}

}  // namespace vmsnap::platform

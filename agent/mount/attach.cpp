#include "agent/mount/attach.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include "agent/mount/image_fs.hpp"
#include "agent/mount/system.hpp"
#include "common/block_codec.hpp"
#include "platform/env.hpp"

namespace vmsnap::mount {

using nlohmann::json;
namespace fs = std::filesystem;

json FilesystemReport::ToJson() const {
  json j{{"name", name}, {"device", device}, {"type", type}, {"path", path}};
  if (!note.empty()) j["note"] = note;
  return j;
}

json DiskReport::ToJson() const {
  json f = json::array();
  for (const auto& x : filesystems) f.push_back(x.ToJson());
  return {{"index", index}, {"source", source},           {"size_bytes", size_bytes},
          {"image", image}, {"loop_device", loop_device}, {"filesystems", f}};
}

json MountReport::ToJson() const {
  json d = json::array();
  for (const auto& x : disks) d.push_back(x.ToJson());
  return {{"mountpoint", mountpoint},         {"recovery_point", recovery_point},
          {"consistency", consistency},       {"state_file", state_file},
          {"images", mountpoint + "/images"}, {"disks", d}};
}

json UnmountReport::ToJson() const {
  return {{"mountpoint", mountpoint},
          {"stopped_process", stopped_process},
          {"pid", pid},
          {"unmounted", unmounted},
          {"detached", detached}};
}

// What a mount created, persisted as JSON so that another process can undo it.
class MountSession::State {
 public:
  std::string file;
  std::string mountpoint;
  std::string images_dir;
  std::string recovery_point;
  int pid = 0;
  uint64_t pid_start_time = 0;
  std::vector<std::string> dirs;    // created by us, in creation order
  std::vector<std::string> mounts;  // filesystem mounts, in mount order
  std::vector<std::string> loops;   // loop devices attached by us

  static std::string FileFor(const std::string& state_dir, const std::string& mountpoint) {
    return state_dir + "/" + Sha256Hex(mountpoint).substr(0, 16) + ".json";
  }

  Status Save() const {
    json j{{"version", 1},
           {"mountpoint", mountpoint},
           {"images_dir", images_dir},
           {"recovery_point", recovery_point},
           {"pid", pid},
           {"pid_start_time", pid_start_time},
           {"dirs", dirs},
           {"mounts", mounts},
           {"loops", loops}};
    Status st = platform::Env::Default()->WriteFileAtomic(file, j.dump(2) + "\n", 0600);
    if (!st.ok())
      return std::move(st)
          .InPhase("write mount state")
          .WithFix("make the state directory writable or pass another --state-dir");
    return st;
  }

  static Result<State> Load(const std::string& file) {
    auto text = platform::Env::Default()->ReadFile(file);
    if (!text.ok()) return text.take_status();
    json j = json::parse(*text, nullptr, false);
    if (!j.is_object() || j.value("version", 0) != 1)
      return Status::Corruption("mount state file " + file + " is not valid",
                                "inspect it; remove it once the mount is cleaned up by hand");
    State s;
    s.file = file;
    s.mountpoint = j.value("mountpoint", "");
    s.images_dir = j.value("images_dir", "");
    s.recovery_point = j.value("recovery_point", "");
    s.pid = j.value("pid", 0);
    s.pid_start_time = j.value("pid_start_time", uint64_t{0});
    s.dirs = j.value("dirs", std::vector<std::string>{});
    s.mounts = j.value("mounts", std::vector<std::string>{});
    s.loops = j.value("loops", std::vector<std::string>{});
    return s;
  }

  bool OwnerAlive() const {
    auto t = sys::ProcessStartTime(pid);
    return t && *t == pid_start_time;
  }

  bool Under(const std::string& path) const {
    return !mountpoint.empty() && path.rfind(mountpoint + "/", 0) == 0;
  }
};

namespace {

// Loop devices whose backing file lies in images_dir (ours, whether recorded or not).
std::vector<std::string> LoopsBackedBy(const std::string& images_dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto it = fs::directory_iterator("/sys/block", ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (name.rfind("loop", 0) != 0) continue;
    std::string device = "/dev/" + name;
    if (sys::LoopBackingFile(device).rfind(images_dir + "/", 0) == 0) out.push_back(device);
  }
  return out;
}

// Undoes what `state` records. `live_fs`, when given, is the in-process FUSE filesystem.
Status TeardownState(const MountSession::State& state, ImageFilesystem* live_fs,
                     UnmountReport* report) {
  Status first;
  auto keep = [&](Status st) {
    if (!st.ok()) {
      spdlog::warn("{}", st.ToString());
      if (first.ok()) first = std::move(st);
    }
  };
  for (auto it = state.mounts.rbegin(); it != state.mounts.rend(); ++it) {
    if (!state.Under(*it)) continue;
    bool was = sys::IsMountPoint(*it), lazy = false;
    Status st = sys::Unmount(*it, &lazy);
    if (lazy) spdlog::warn("{} was busy: detached lazily", *it);
    if (st.ok() && was && report) report->unmounted.push_back(*it);
    keep(std::move(st).InPhase("unmount filesystem"));
  }
  std::vector<std::string> loops = state.loops;
  if (!state.images_dir.empty())
    for (const auto& l : LoopsBackedBy(state.images_dir))
      if (std::find(loops.begin(), loops.end(), l) == loops.end()) loops.push_back(l);
  for (const auto& loop : loops) {
    std::string backing = sys::LoopBackingFile(loop);
    if (backing.empty()) continue;  // already detached
    if (state.images_dir.empty() || backing.rfind(state.images_dir + "/", 0) != 0) {
      spdlog::warn("not detaching {}: its backing file {} is not one of ours", loop, backing);
      continue;
    }
    auto r = sys::RunCommand({"losetup", "-d", loop}, "util-linux");
    if (!r.ok()) {
      keep(r.take_status().InPhase("detach loop device"));
    } else if (r->exit_code != 0) {
      keep(Status::IoError("losetup -d " + loop + " failed: " + r->err,
                           "close programs using " + loop + " and run `vmsnap umount` again")
               .InPhase("detach loop device"));
    } else if (report) {
      report->detached.push_back(loop);
    }
  }
  if (live_fs) {
    keep(live_fs->Unmount().InPhase("unmount images"));
  } else if (state.Under(state.images_dir)) {
    bool was = sys::IsMountPoint(state.images_dir);
    Status st = sys::ForceUnmountFuse(state.images_dir);
    if (st.ok() && was && report) report->unmounted.push_back(state.images_dir);
    keep(std::move(st).InPhase("unmount images"));
  }
  for (auto it = state.dirs.rbegin(); it != state.dirs.rend(); ++it) {
    if (!state.Under(*it) || sys::IsMountPoint(*it)) continue;
    std::error_code ec;
    fs::remove(*it, ec);  // only if empty; a leftover is harmless and reported below
    if (ec) spdlog::warn("left directory {}: {}", *it, ec.message());
  }
  if (first.ok()) {
    std::error_code ec;
    fs::remove(state.file, ec);
  }
  return first;
}

std::string OptionsFor(const std::string& type, std::string& fstype) {
  fstype = type;
  if (type == "ext4" || type == "ext3") return "noload";
  if (type == "xfs") return "norecovery,nouuid";
  if (type == "btrfs") return "rescue=nologreplay";
  if (type == "ntfs") fstype = "ntfs3";
  return "";
}

bool Mountable(const std::string& type) {
  static const std::vector<std::string> kTypes{"ext2",  "ext3", "ext4", "xfs",
                                               "btrfs", "vfat", "ntfs", "exfat"};
  return std::find(kTypes.begin(), kTypes.end(), type) != kTypes.end();
}

}  // namespace

MountSession::MountSession() : state_(std::make_unique<State>()) {}

MountSession::~MountSession() {
  Status st = Teardown();
  if (!st.ok()) spdlog::error("cleaning up the mount failed: {}", st.ToString());
}

Status MountSession::Teardown() {
  if (torn_down_) return Status::Ok();
  torn_down_ = true;
  Status st = TeardownState(*state_, fs_.get(), nullptr);
  fs_.reset();
  return st;
}

Result<std::unique_ptr<MountSession>> MountSession::Start(const MountOptions& options) {
  std::unique_ptr<MountSession> s(new MountSession());
  Status st = s->Setup(options);
  if (!st.ok()) {
    Status td = s->Teardown();
    if (!td.ok()) spdlog::error("undoing the failed mount: {}", td.ToString());
    return st;
  }
  return s;
}

Status MountSession::Setup(const MountOptions& options) {
  const std::string phase = "mount recovery point";
  torn_down_ = true;  // nothing to undo until the state is recorded
  if (options.mountpoint.empty())
    return Status::InvalidArgument("no mount point given", "pass MOUNTPOINT").InPhase(phase);
  auto images = RecoveryPointImages::Open(options.images);
  if (!images.ok()) return images.take_status();
  images_ = std::move(*images);
  std::error_code ec;
  fs::path mp = fs::absolute(options.mountpoint, ec).lexically_normal();
  std::string mp_s = mp.string();
  while (mp_s.size() > 1 && mp_s.back() == '/') mp_s.pop_back();
  if (!fs::exists(mp_s, ec)) {
    if (!fs::create_directories(mp_s, ec))
      return Status::IoError("cannot create mount point " + mp_s + ": " + ec.message())
          .InPhase(phase);
    state_->dirs.push_back(mp_s);
  }
  mp_s = fs::canonical(mp_s, ec).string();
  if (ec || !fs::is_directory(mp_s))
    return Status::InvalidArgument("mount point " + options.mountpoint + " is not a directory",
                                   "pass an empty directory (or a path that does not exist)")
        .InPhase(phase);
  std::string state_file = State::FileFor(options.state_dir, mp_s);
  if (fs::exists(state_file, ec)) {
    auto old = State::Load(state_file);
    if (old.ok() && old->OwnerAlive())
      return Status::Error(Code::kAlreadyExists,
                           mp_s + " is already mounted by process " + std::to_string(old->pid),
                           "run `vmsnap umount " + mp_s + "` first")
          .InPhase(phase);
    return Status::Error(Code::kConflict,
                         "a previous mount of " + mp_s + " was not cleaned up (its process died)",
                         "run `vmsnap umount " + mp_s + "` first")
        .InPhase(phase);
  }
  if (!fs::is_empty(mp_s, ec))
    return Status::InvalidArgument("mount point " + mp_s + " is not empty",
                                   "pass an empty directory (or a path that does not exist)")
        .InPhase(phase);
  fs::create_directories(options.state_dir, ec);
  if (ec)
    return Status::IoError(
               "cannot create state directory " + options.state_dir + ": " + ec.message(),
               "pass a writable --state-dir")
        .InPhase(phase);

  State& s = *state_;
  s.file = state_file;
  s.mountpoint = mp_s;
  s.images_dir = mp_s + "/images";
  s.recovery_point = options.images.recovery_point;
  s.pid = sys::CurrentPid();
  s.pid_start_time = sys::ProcessStartTime(s.pid).value_or(0);
  s.dirs.push_back(s.images_dir);
  VMSNAP_RETURN_IF_ERROR(s.Save());
  torn_down_ = false;
  fs::create_directory(s.images_dir, ec);
  if (ec)
    return Status::IoError("cannot create " + s.images_dir + ": " + ec.message()).InPhase(phase);
  auto fuse = ImageFilesystem::Mount(*images_, s.images_dir);
  if (!fuse.ok()) return fuse.take_status();
  fs_ = std::move(*fuse);

  report_.mountpoint = mp_s;
  report_.recovery_point = options.images.recovery_point;
  report_.consistency = images_->consistency();
  report_.state_file = state_file;
  for (const auto& disk : images_->disks()) {
    DiskReport dr;
    dr.index = disk.index;
    dr.source = disk.source;
    dr.size_bytes = disk.size_bytes;
    dr.image = s.images_dir + "/" + ImageFilesystem::ImageName(disk.index);
    auto attach = sys::RunCommand(
        {"losetup", "--read-only", "--partscan", "--find", "--show", dr.image}, "util-linux");
    if (!attach.ok()) return attach.take_status().InPhase("attach loop device");
    std::string device = attach->out;
    while (!device.empty() && (device.back() == '\n' || device.back() == ' ')) device.pop_back();
    if (attach->exit_code != 0 || device.rfind("/dev/loop", 0) != 0)
      return Status::IoError("losetup could not attach " + dr.image + ": " + attach->err,
                             "check that loop devices are available (modprobe loop; losetup -l)")
          .InPhase("attach loop device");
    s.loops.push_back(device);
    VMSNAP_RETURN_IF_ERROR(s.Save());
    dr.loop_device = device;
    std::string disk_dir = mp_s + "/disk" + std::to_string(disk.index);
    fs::create_directory(disk_dir, ec);
    s.dirs.push_back(disk_dir);

    std::vector<std::pair<std::string, std::string>> candidates;  // name, device
    auto parts = sys::LoopPartitions(device);
    if (parts.empty()) {
      // Kernels built without partition table parsers find nothing with --partscan; partx
      // reads the table in user space (libblkid) and adds the partitions (BLKPG). Without a
      // table it fails, and the whole device is probed instead.
      auto added = sys::RunCommand({"partx", "--add", device}, "util-linux");
      if (added.ok() && added->exit_code == 0) parts = sys::LoopPartitions(device);
    }
    for (const auto& p : parts) candidates.push_back({"part" + std::to_string(p.number), p.device});
    if (parts.empty()) candidates.push_back({"whole", device});
    for (const auto& [name, dev] : candidates) {
      FilesystemReport fr;
      fr.name = name;
      fr.device = dev;
      auto probe = sys::RunCommand({"blkid", "-p", "-o", "value", "-s", "TYPE", dev}, "util-linux");
      if (!probe.ok()) return probe.take_status().InPhase("probe filesystems");
      fr.type = probe->out;
      while (!fr.type.empty() && (fr.type.back() == '\n' || fr.type.back() == ' '))
        fr.type.pop_back();
      if (fr.type.empty()) {
        fr.note = "no filesystem recognised";
      } else if (!Mountable(fr.type)) {
        fr.note = fr.type + " is not a mountable filesystem";
      } else {
        std::string target = disk_dir + "/" + name, fstype;
        std::string opts = OptionsFor(fr.type, fstype);
        fs::create_directory(target, ec);
        s.dirs.push_back(target);
        s.mounts.push_back(target);
        VMSNAP_RETURN_IF_ERROR(s.Save());
        Status mst = sys::MountReadOnly(dev, target, fstype, opts);
        if (mst.ok()) {
          fr.path = target;
        } else {
          fr.note = mst.cause();
          spdlog::warn("disk {} {}: {} (see dmesg)", disk.index, name, mst.cause());
          s.mounts.pop_back();
          s.dirs.pop_back();
          fs::remove(target, ec);
          VMSNAP_RETURN_IF_ERROR(s.Save());
        }
      }
      dr.filesystems.push_back(fr);
    }
    report_.disks.push_back(std::move(dr));
  }
  return Status::Ok();
}

Result<UnmountReport> UnmountRecorded(const std::string& mountpoint, const std::string& state_dir,
                                      int wait_seconds) {
  const std::string phase = "unmount";
  std::error_code ec;
  std::string mp = fs::absolute(mountpoint, ec).lexically_normal().string();
  while (mp.size() > 1 && mp.back() == '/') mp.pop_back();
  std::string canonical = fs::weakly_canonical(mp, ec).string();
  if (!ec) mp = canonical;
  UnmountReport report;
  report.mountpoint = mp;
  std::string file = MountSession::State::FileFor(state_dir, mp);
  if (!fs::exists(file, ec))
    return Status::NotFound("no vmsnap mount is recorded for " + mp + " in " + state_dir,
                            "check the path, or pass the --state-dir the mount used")
        .InPhase(phase);
  auto state = MountSession::State::Load(file);
  if (!state.ok()) return std::move(state.take_status()).InPhase(phase);
  if (state->mountpoint != mp)
    return Status::Corruption("state file " + file + " names " + state->mountpoint + ", not " + mp,
                              "remove the stale file after checking `findmnt` and `losetup -l`")
        .InPhase(phase);
  report.pid = state->pid;
  if (state->OwnerAlive() && state->pid != sys::CurrentPid()) {
    VMSNAP_RETURN_IF_ERROR(sys::Terminate(state->pid));
    report.stopped_process = true;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(wait_seconds);
    while (state->OwnerAlive() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (state->OwnerAlive())
      return Status::Error(Code::kTimeout,
                           "mount process " + std::to_string(state->pid) + " did not stop within " +
                               std::to_string(wait_seconds) + " s",
                           "check its log; `kill -9 " + std::to_string(state->pid) +
                               "` and run `vmsnap umount` again")
          .InPhase(phase);
    if (!fs::exists(file, ec)) return report;  // it cleaned up itself
    auto again = MountSession::State::Load(file);
    if (!again.ok()) return std::move(again.take_status()).InPhase(phase);
    state = std::move(again);
  }
  Status st = TeardownState(*state, nullptr, &report);
  if (!st.ok()) return std::move(st).InPhase(phase);
  return report;
}

}  // namespace vmsnap::mount

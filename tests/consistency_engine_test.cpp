// The orchestration (agent/consistency.hpp): level computation from evidence, snapshot
// providers, and the whole sequence on real filesystems whose images sit on a reflink-capable
// (btrfs) filesystem, also on loop devices the test creates.
#include "agent/consistency.hpp"
#include "consistency_fixtures.hpp"

namespace vmsnap::test {
namespace {

using namespace std::chrono_literals;
using agent::ComputeConsistencyLevel;
using agent::ConsistencyFacts;
using agent::ConsistencyLevel;

ConsistencyFacts FrozenInTime() {
  ConsistencyFacts f;
  f.disk_count = 1;
  f.scripts_configured = true;
  f.pre_scripts_all_ok = true;
  f.freeze_attempted = true;
  f.filesystems_total = 2;
  f.filesystems_frozen = 2;
  f.snapshot_taken = true;
  f.snapshot_point_in_time = true;
  f.snapshot_atomic = true;
  f.snapshot_before_thaw = true;
  return f;
}

TEST_CASE("level: computed from evidence") {
  CHECK(ComputeConsistencyLevel(FrozenInTime()).level == ConsistencyLevel::kApplication);
  {
    auto f = FrozenInTime();
    f.scripts_configured = false;
    f.pre_scripts_all_ok = false;
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kFileSystem);
  }
  {
    auto f = FrozenInTime();
    f.pre_scripts_all_ok = false;  // failed, continue allowed
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kFileSystem);
    f.pre_failure_fatal = true;
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kFailed);
    f.allow_none = true;  // a fatal pre failure is never downgraded to none
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kFailed);
  }
  {
    auto f = FrozenInTime();
    f.filesystems_frozen = 1;  // one filesystem was busy: a point-in-time snapshot only
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kCrash);
    f.disk_count = 2;
    f.snapshot_atomic = false;  // several disks, not atomic, not all frozen
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kFailed);
    f.allow_none = true;
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kNone);
  }
  {
    auto f = FrozenInTime();
    f.disk_count = 2;
    f.snapshot_atomic = false;  // several disks one after another, but all frozen: fine
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kApplication);
  }
  {
    auto f = FrozenInTime();
    f.snapshot_before_thaw = false;  // the snapshot completed after a thaw
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kCrash);
    f.deadline_hit = true;
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kFailed);
  }
  {
    auto f = FrozenInTime();
    f.freeze_attempted = false;  // fsFreezeEnabled false: point-in-time only
    f.filesystems_frozen = 0;
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kCrash);
  }
  {
    auto f = FrozenInTime();
    f.snapshot_taken = false;
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kFailed);
    f.allow_none = true;
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kNone);
  }
  {
    ConsistencyFacts f;  // a guarded read of one image file, nothing mounted
    f.disk_count = 1;
    f.snapshot_taken = true;
    f.guarded_read = true;
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kCrash);
    f.disk_count = 2;  // one of them snapshotted, the other read live: not one instant
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kFailed);
    f.every_disk_guarded = true;  // all read live, all identities checked over one window
    CHECK(ComputeConsistencyLevel(f).level == ConsistencyLevel::kCrash);
  }
  CHECK(std::string(agent::ConsistencyLevelName(ConsistencyLevel::kFileSystem)) == "file-system");
}

// A btrfs "host" filesystem holding the images of the filesystems being backed up (so that
// loop-reflink can clone them), plus hooks dir, runtime dir and an options template.
struct EngineSetup {
  TempDir dir;
  std::unique_ptr<LoopFs> host;
  std::string hooks = dir / "hooks.d";
  std::string log = dir / "hook.log";

  bool Build() {
    if (!RequireRoot() || !RequireTool("mkfs.btrfs")) return false;
    host = LoopFs::Create(dir.path(), "btrfs", 512, "host");
    fs::create_directories(hooks);
    return host != nullptr;
  }
  std::unique_ptr<LoopFs> Disk(const std::string& type, const std::string& name) {
    return LoopFs::Create(host->mount_point(), type, type == "ext4" ? 64 : 320, name);
  }
  agent::ConsistencyOptions Options(const std::vector<std::string>& disks) const {
    agent::ConsistencyOptions o;
    o.disks = disks;
    o.hooks.hooks_dir = hooks;
    o.hooks.azure_config_path = dir / "azure.json";
    o.runtime_dir = dir / "run";
    o.guard_binary = VMSNAP_FREEZE_GUARD_PATH;
    o.freeze_deadline = 10s;
    o.freeze_only_under = {TestRoot()};
    return o;
  }
  void Hook(const std::string& name, const std::string& on_freeze, int rc = 0) const {
    WriteFile(hooks + "/" + name,
              "#!/bin/sh\necho \"" + name + " $1\" >> " + log + "\nif [ \"$1\" = freeze ]; then " +
                  on_freeze + "; exit " + std::to_string(rc) + "; fi\n",
              0755);
  }
};

// The contents of a file inside an ext4 image (debugfs, read-only).
std::string ReadFromExt4Image(const std::string& image, const std::string& path) {
  return Sh("{ debugfs -R 'cat " + path + "' " + image + " 2>/dev/null; }").output;
}

// Mounts a (cloned) image read-write on its own loop device below the test root (XFS replays
// its log, as a restore would), reads a file, and undoes everything.
std::string ReadFromImageByMounting(const std::string& image, const std::string& type,
                                    const std::string& path) {
  TempDir mnt;
  struct Loop {
    std::string dev;
    ~Loop() {
      if (!dev.empty()) Sh("losetup -d " + dev);
    }
  } loop;
  auto l = Sh("losetup --find --show " + image);
  if (l.rc != 0) return "losetup failed: " + l.output;
  loop.dev = l.output.substr(0, l.output.find('\n'));
  std::string opts = type == "xfs" ? "-o nouuid" : "";
  if (Sh("mount -t " + type + " " + opts + " " + loop.dev + " " + mnt.path()).rc != 0)
    return "mount failed";
  std::string text = ReadFileText(mnt.path() + path);
  Sh("umount " + mnt.path());
  return text;
}

TEST_CASE("engine: hook marker in the snapshot, thaw hook runs, level application") {
  EngineSetup s;
  if (!s.Build()) return;
  auto disk = s.Disk("ext4", "app");
  REQUIRE(disk);
  const std::string app = disk->mount_point();
  s.Hook("10-app", "echo flushed > " + app + "/app-marker && sync");

  nlohmann::json evidence;
  auto view = agent::PrepareConsistentView(s.Options({disk->loop()}), &evidence);
  REQUIRE_MESSAGE(view.ok(), view.status().ToString() << "\n" << evidence.dump(2));
  CHECK(std::string(view->level_name()) == "application");
  CHECK(evidence["level"] == "application");
  REQUIRE(view->disks().size() == 1);
  const std::string clone = view->disks()[0].read_path;
  CHECK(clone != disk->image());
  CHECK(clone.rfind(disk->image(), 0) == 0);  // next to the backing file
  CHECK_FALSE(view->disks()[0].guarded_read);
  CHECK(ReadFromExt4Image(clone, "/app-marker") == "flushed\n");
  CHECK(Sh("e2fsck -fn " + clone).rc == 0);  // frozen: a clean filesystem
  CHECK(ReadFileText(s.log) == "10-app freeze\n10-app thaw\n");

  REQUIRE(evidence["filesystems"].size() == 1);
  CHECK(evidence["filesystems"][0]["mount_point"] == app);
  CHECK(evidence["filesystems"][0]["frozen"] == true);
  CHECK(evidence["filesystems"][0]["window_ms"].get<double>() > 0);
  CHECK(evidence["freeze"]["deadline_hit"] == false);
  CHECK(evidence["snapshot"]["completed_before_thaw"] == true);
  CHECK(evidence["scripts"].size() == 2);
  CHECK(evidence["scripts"][0]["exit_code"] == 0);
  CHECK(evidence["disks"][0]["provider"] == "loop-reflink");

  CHECK(WritableWithin(app, 2s));
  CHECK(view->Cleanup().ok());
  CHECK_FALSE(fs::exists(clone));
}

TEST_CASE("engine: no scripts -> file-system; two disks frozen together") {
  EngineSetup s;
  if (!s.Build()) return;
  auto a = s.Disk("ext4", "a");
  auto b = s.Disk("xfs", "b");
  REQUIRE(a);
  REQUIRE(b);
  WriteFile(b->mount_point() + "/before", "written before the backup\n");
  nlohmann::json evidence;
  auto view = agent::PrepareConsistentView(s.Options({a->loop(), b->loop()}), &evidence);
  REQUIRE_MESSAGE(view.ok(), view.status().ToString() << "\n" << evidence.dump(2));
  CHECK(std::string(view->level_name()) == "file-system");
  REQUIRE(view->disks().size() == 2);
  CHECK(view->disks()[0].disk == a->loop());
  CHECK(view->disks()[1].disk == b->loop());
  CHECK(Sh("e2fsck -fn " + view->disks()[0].read_path).rc == 0);
  CHECK(ReadFromImageByMounting(view->disks()[1].read_path, "xfs", "/before") ==
        "written before the backup\n");
  CHECK(evidence["filesystems"].size() == 2);
}

TEST_CASE("engine: failing pre script -> file-system with continue, failure without") {
  EngineSetup s;
  if (!s.Build()) return;
  auto disk = s.Disk("ext4", "app");
  REQUIRE(disk);
  s.Hook("10-ok", "true");
  s.Hook("20-fails", "true", 4);
  {
    nlohmann::json evidence;
    auto view = agent::PrepareConsistentView(s.Options({disk->loop()}), &evidence);
    REQUIRE_MESSAGE(view.ok(), view.status().ToString());
    CHECK(std::string(view->level_name()) == "file-system");
    CHECK(ReadFileText(s.log) == "10-ok freeze\n20-fails freeze\n20-fails thaw\n10-ok thaw\n");
  }
  fs::remove(s.log);
  {
    auto opt = s.Options({disk->loop()});
    opt.hooks.native_continue_on_failure = false;
    nlohmann::json evidence;
    auto view = agent::PrepareConsistentView(opt, &evidence);
    CHECK_FALSE(view.ok());
    CHECK(view.status().phase() == "pre scripts");
    CHECK(evidence["level"] == "failed");
    CHECK(ReadFileText(s.log) == "10-ok freeze\n20-fails freeze\n20-fails thaw\n10-ok thaw\n");
    CHECK(WritableWithin(disk->mount_point(), 2s));  // nothing stays frozen
    CHECK_FALSE(fs::exists(s.dir / "run/frozen.json"));
  }
}

TEST_CASE(
    "engine: a command provider hanging past the deadline -> thawed at the deadline, failed") {
  EngineSetup s;
  if (!s.Build()) return;
  auto disk = s.Disk("ext4", "app");
  REQUIRE(disk);
  const std::string cmd = s.dir / "snap-cmd";
  WriteFile(cmd, "#!/bin/sh\nsleep 60\n", 0755);
  auto opt = s.Options({disk->loop()});
  opt.freeze_deadline = 1500ms;
  opt.snapshot.provider = "command";
  opt.snapshot.command_path = cmd;
  nlohmann::json evidence;
  const auto start = std::chrono::steady_clock::now();
  auto view = agent::PrepareConsistentView(opt, &evidence);
  const auto took = std::chrono::steady_clock::now() - start;
  CHECK_FALSE(view.ok());
  CHECK(view.status().code() == Code::kTimeout);
  CHECK(evidence["level"] == "failed");
  CHECK(evidence["freeze"]["deadline_hit"] == true);
  CHECK(evidence["filesystems"][0]["frozen"] == true);
  CHECK(took < opt.freeze_deadline + 3s);  // the hang did not extend the freeze
  CHECK(WritableWithin(disk->mount_point(), 1s));
}

TEST_CASE("engine: command provider prints what to read; cleanup command gets the paths") {
  EngineSetup s;
  if (!s.Build()) return;
  auto disk = s.Disk("ext4", "app");
  REQUIRE(disk);
  const std::string cmd = s.dir / "snap-cmd", cleanup = s.dir / "cleanup-cmd";
  const std::string snap_file = s.host->mount_point() + "/cmd-snap.img";
  WriteFile(cmd,
            "#!/bin/sh\nfor d in \"$@\"; do :; done\ncp --reflink=always " + disk->image() + " " +
                snap_file + " && echo " + snap_file + "\n",
            0755);
  WriteFile(cleanup, "#!/bin/sh\nrm -f \"$@\"\n", 0755);
  auto opt = s.Options({disk->loop()});
  opt.snapshot.provider = "command";
  opt.snapshot.command_path = cmd;
  opt.snapshot.cleanup_command_path = cleanup;
  auto view = agent::PrepareConsistentView(opt);
  REQUIRE_MESSAGE(view.ok(), view.status().ToString());
  CHECK(std::string(view->level_name()) == "file-system");
  REQUIRE(view->disks().size() == 1);
  CHECK(view->disks()[0].read_path == snap_file);
  CHECK(Sh("e2fsck -fn " + snap_file).rc == 0);
  CHECK(view->Cleanup().ok());
  CHECK_FALSE(fs::exists(snap_file));

  // An untrusted command is refused before it runs.
  ::chmod(cmd.c_str(), 0777);
  auto refused = agent::PrepareConsistentView(opt);
  CHECK_FALSE(refused.ok());
  CHECK(refused.status().ToString().find("chmod go-w " + cmd) != std::string::npos);
  CHECK(WritableWithin(disk->mount_point(), 2s));
}

TEST_CASE("engine: file provider (clone or guarded read), lvm unsupported, allow_none") {
  EngineSetup s;
  if (!s.Build()) return;
  // An image file on btrfs, not attached: a reflink clone, nothing to freeze -> crash.
  const std::string on_btrfs = s.host->mount_point() + "/plain.img";
  REQUIRE(Sh("truncate -s 16M " + on_btrfs + " && echo hello | dd of=" + on_btrfs +
             " conv=notrunc status=none")
              .rc == 0);
  {
    auto opt = s.Options({on_btrfs});
    opt.snapshot.provider = "file";
    nlohmann::json evidence;
    auto view = agent::PrepareConsistentView(opt, &evidence);
    REQUIRE_MESSAGE(view.ok(), view.status().ToString());
    CHECK(std::string(view->level_name()) == "crash");
    CHECK_FALSE(view->disks()[0].guarded_read);
    CHECK(ReadFileText(view->disks()[0].read_path).substr(0, 6) == "hello\n");
    CHECK(evidence["freeze"]["attempted"] == false);
  }
  // The same on ext4 (no reflink): a guarded read of the live file, at best crash.
  auto ext4_host = LoopFs::Create(s.dir.path(), "ext4", 64, "ext4host");
  REQUIRE(ext4_host);
  const std::string on_ext4 = ext4_host->mount_point() + "/plain.img";
  REQUIRE(Sh("truncate -s 16M " + on_ext4).rc == 0);
  {
    auto opt = s.Options({on_ext4});
    opt.snapshot.provider = "file";
    nlohmann::json evidence;
    auto view = agent::PrepareConsistentView(opt, &evidence);
    REQUIRE_MESSAGE(view.ok(), view.status().ToString());
    CHECK(std::string(view->level_name()) == "crash");
    CHECK(view->disks()[0].guarded_read);
    CHECK(view->disks()[0].read_path == on_ext4);
    CHECK(evidence["disks"][0]["note"].get<std::string>().find("guarded read") !=
          std::string::npos);
  }
  // loop-reflink has no fallback: an image on ext4 behind a loop device fails clearly.
  auto disk_on_ext4 = LoopFs::Create(ext4_host->mount_point(), "ext4", 16, "inner");
  REQUIRE(disk_on_ext4);
  {
    auto opt = s.Options({disk_on_ext4->loop()});
    opt.snapshot.provider = "loop-reflink";
    auto view = agent::PrepareConsistentView(opt);
    CHECK_FALSE(view.ok());
    CHECK(view.status().ToString().find("reflink") != std::string::npos);
    CHECK(WritableWithin(disk_on_ext4->mount_point(), 2s));
  }
  // lvm on a loop device, which is never a logical volume: a clear error that names what is
  // missing on this machine (device-mapper, lvm2, or the disk is not an LV); with allow_none
  // the live disk is read as `none`.
  auto disk = s.Disk("ext4", "app");
  REQUIRE(disk);
  {
    auto opt = s.Options({disk->loop()});
    opt.snapshot.provider = "lvm";
    auto view = agent::PrepareConsistentView(opt);
    CHECK_FALSE(view.ok());
    const bool has_dm = std::filesystem::exists("/dev/mapper/control");
    // (the provider looks for lvs and lvcreate in /usr/sbin, /sbin and /usr/bin)
    auto lvm_tool = [](const std::string& name) {
      for (const char* dir : {"/usr/sbin/", "/sbin/", "/usr/bin/"})
        if (std::filesystem::exists(dir + name)) return true;
      return false;
    };
    const bool has_lvm2 = lvm_tool("lvs") && lvm_tool("lvcreate");
    const std::string expected = !has_dm     ? "needs device-mapper"
                                 : !has_lvm2 ? "needs lvm2"
                                             : "is not an LVM logical volume";
    CHECK_MESSAGE(view.status().ToString().find(expected) != std::string::npos,
                  view.status().ToString());
    opt.allow_none = true;
    auto none = agent::PrepareConsistentView(opt);
    REQUIRE_MESSAGE(none.ok(), none.status().ToString());
    CHECK(std::string(none->level_name()) == "none");
    CHECK(none->disks()[0].read_path == disk->loop());
    CHECK(WritableWithin(disk->mount_point(), 2s));
  }
}

}  // namespace
}  // namespace vmsnap::test

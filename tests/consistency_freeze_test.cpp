// Mount discovery, the freeze guard, the freeze session with its second thaw path, and the
// frozen-marker recovery, on real ext4/xfs/btrfs filesystems on loop devices.
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <nlohmann/json.hpp>

#include "consistency_fixtures.hpp"

extern char** environ;

namespace vmsnap::test {
namespace {

using namespace std::chrono_literals;
using platform::FreezeOptions;
using platform::FreezeSession;

FreezeOptions TestFreezeOptions(const TempDir& dir, std::chrono::milliseconds deadline) {
  FreezeOptions o;
  o.guard_binary = VMSNAP_FREEZE_GUARD_PATH;
  o.runtime_dir = dir / "run";
  o.deadline = deadline;
  o.only_under = {TestRoot()};
  o.thaw_confirm_wait = 500ms;
  return o;
}

std::vector<platform::MountedFilesystem> Discover(const std::vector<std::string>& disks) {
  auto found = platform::DiscoverFilesystems(disks);
  REQUIRE(found.ok());
  return *found;
}

// The guard started directly, as an agent would, for the "agent died" cases.
struct GuardProcess {
  pid_t pid = -1;
  int to_guard = -1;
  int from_guard = -1;
  std::string output;
  ~GuardProcess() {
    if (to_guard >= 0) ::close(to_guard);
    if (from_guard >= 0) ::close(from_guard);
    if (pid > 0) {
      ::kill(pid, SIGKILL);  // our own child, by pid
      ::waitpid(pid, nullptr, 0);
    }
  }
  bool Start(const std::vector<std::string>& args) {
    int in[2], out[2];
    if (::pipe2(in, O_CLOEXEC) || ::pipe2(out, O_CLOEXEC)) return false;
    posix_spawn_file_actions_t fa;
    ::posix_spawn_file_actions_init(&fa);
    ::posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    ::posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    std::vector<std::string> all{VMSNAP_FREEZE_GUARD_PATH};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : all) argv.push_back(a.data());
    argv.push_back(nullptr);
    int rc = ::posix_spawn(&pid, all[0].c_str(), &fa, nullptr, argv.data(), environ);
    ::posix_spawn_file_actions_destroy(&fa);
    ::close(in[0]);
    ::close(out[1]);
    to_guard = in[1];
    from_guard = out[0];
    return rc == 0;
  }
  // Reads until a line contains `what` or the time runs out.
  bool WaitFor(const std::string& what, std::chrono::milliseconds within) {
    auto end = std::chrono::steady_clock::now() + within;
    while (output.find(what) == std::string::npos) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          end - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      struct pollfd p = {from_guard, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char b[4096];
      ssize_t n = ::read(from_guard, b, sizeof b);
      if (n <= 0) return output.find(what) != std::string::npos;
      output.append(b, static_cast<size_t>(n));
    }
    return true;
  }
  int Exit() {
    int st = 0;
    ::waitpid(pid, &st, 0);
    pid = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  }
};

TEST_CASE("discovery: exactly the test mounts, bind mounts folded, image file via loop") {
  if (!RequireRoot()) return;
  TempDir dir;
  auto a = LoopFs::Create(dir.path(), "ext4", 512, "a");
  REQUIRE(a);
  // A second filesystem (on another loop device) nested inside the first.
  auto b = LoopFs::Create(a->mount_point(), "xfs", 320, "nested");
  REQUIRE(b);
  REQUIRE(a->BindAt(dir / "bind-of-a"));

  auto only_a = Discover({a->loop()});
  REQUIRE(only_a.size() == 1);
  CHECK(only_a[0].mount_point == a->mount_point());
  CHECK(only_a[0].fs_type == "ext4");
  CHECK(only_a[0].freezable);
  CHECK(only_a[0].disk == a->loop());
  REQUIRE(only_a[0].other_mount_points.size() == 1);
  CHECK(only_a[0].other_mount_points[0] == dir / "bind-of-a");

  auto by_image = Discover({a->image()});  // an image file maps to its loop device
  REQUIRE(by_image.size() == 1);
  CHECK(by_image[0].mount_point == a->mount_point());
  CHECK(by_image[0].disk == a->image());
  CHECK(platform::LoopDevicesBackedBy(a->image()) == std::vector<std::string>{a->loop()});
  auto backing = platform::LoopBackingFile(a->loop());
  REQUIRE(backing.ok());
  CHECK(*backing == a->image());

  auto both = Discover({a->loop(), b->loop()});
  REQUIRE(both.size() == 2);
  CHECK(both[0].mount_point == b->mount_point());  // deepest first
  CHECK(both[0].fs_type == "xfs");
  CHECK(both[1].mount_point == a->mount_point());

  CHECK(Discover({dir / "a.img"}).size() == 1);
  auto missing = platform::DiscoverFilesystems({dir / "nope"});
  CHECK(missing.status().code() == Code::kNotFound);
  CHECK(missing.status().phase() == "discover filesystems");
}

TEST_CASE("freeze session: real FIFREEZE on ext4, xfs and btrfs; a write waits for the thaw") {
  if (!RequireRoot()) return;
  for (const std::string type : {"ext4", "xfs", "btrfs"}) {
    CAPTURE(type);
    if (!RequireTool("mkfs." + type)) continue;
    TempDir dir;
    auto f = LoopFs::Create(dir.path(), type, type == "ext4" ? 64 : 320);
    REQUIRE(f);
    auto opt = TestFreezeOptions(dir, 10s);
    auto session = FreezeSession::Start(Discover({f->loop()}), opt);
    REQUIRE_MESSAGE(session.ok(), session.status().ToString());
    CHECK(fs::exists(opt.runtime_dir + "/frozen.json"));
    auto reports = (*session)->Filesystems();
    REQUIRE(reports.size() == 1);
    CHECK(reports[0].frozen);
    auto write = WriteAsync(f->mount_point() + "/during-freeze");
    // Frozen: the write must not complete while the filesystem is frozen.
    CHECK(write.wait_for(300ms) == std::future_status::timeout);
    Status thawed = (*session)->Thaw();
    CHECK_MESSAGE(thawed.ok(), thawed.ToString());
    CHECK(write.wait_for(5s) == std::future_status::ready);
    CHECK(write.get());
    reports = (*session)->Filesystems();
    CHECK(reports[0].thawed_by == "guard");
    CHECK(reports[0].window_ms() > 0);
    CHECK(reports[0].thaw_error.empty());
    CHECK_FALSE((*session)->deadline_hit());
    CHECK_FALSE(fs::exists(opt.runtime_dir + "/frozen.json"));  // removed after the thaw
  }
}

TEST_CASE("freeze session: guard SIGKILLed while frozen -> writable within deadline + 1 s (x20)") {
  if (!RequireRoot()) return;
  TempDir dir;
  auto f = LoopFs::Create(dir.path(), "ext4", 64);
  REQUIRE(f);
  const auto deadline = 1000ms;
  auto found = Discover({f->loop()});
  for (int rep = 0; rep < 20; ++rep) {
    CAPTURE(rep);
    auto session = FreezeSession::Start(found, TestFreezeOptions(dir, deadline));
    REQUIRE_MESSAGE(session.ok(), session.status().ToString());
    REQUIRE((*session)->Filesystems()[0].frozen);
    const auto start = std::chrono::steady_clock::now();
    REQUIRE(::kill((*session)->guard_pid(), SIGKILL) == 0);  // our child, by pid
    auto write = WriteAsync(f->mount_point() + "/w" + std::to_string(rep));
    const bool done = write.wait_for(deadline + 1s) == std::future_status::ready;
    if (!done) ThawForTest(f->mount_point());
    CHECK(done);
    CHECK(write.get());
    CHECK(std::chrono::steady_clock::now() - start < deadline + 1s + 500ms);
    CHECK((*session)->Thaw().ok());
    CHECK((*session)->Filesystems()[0].thawed_by == "agent");
  }
}

TEST_CASE(
    "freeze session: guard SIGSTOPped while frozen -> the agent thaws at the deadline (x20)") {
  if (!RequireRoot()) return;
  TempDir dir;
  auto f = LoopFs::Create(dir.path(), "ext4", 64);
  REQUIRE(f);
  const auto deadline = 1000ms;
  auto found = Discover({f->loop()});
  for (int rep = 0; rep < 20; ++rep) {
    CAPTURE(rep);
    auto session = FreezeSession::Start(found, TestFreezeOptions(dir, deadline));
    REQUIRE_MESSAGE(session.ok(), session.status().ToString());
    REQUIRE((*session)->Filesystems()[0].frozen);
    REQUIRE(::kill((*session)->guard_pid(), SIGSTOP) == 0);
    auto write = WriteAsync(f->mount_point() + "/s" + std::to_string(rep));
    // From now, at most the deadline (counted from Start, which was earlier) plus 1 s.
    const bool done = write.wait_for(deadline + 1s) == std::future_status::ready;
    if (!done) ThawForTest(f->mount_point());
    CHECK(done);
    CHECK(write.get());
    CHECK((*session)->deadline_hit());
    auto r = (*session)->Filesystems()[0];
    CHECK(r.thawed_by == "agent");
    CHECK((*session)->Thaw().ok());  // kills the stopped guard (by pid) and reaps it
  }
}

TEST_CASE("guard: thaws when the agent's pipe closes (agent died) and at its own deadline") {
  if (!RequireRoot()) return;
  TempDir dir;
  auto f = LoopFs::Create(dir.path(), "ext4", 64);
  REQUIRE(f);
  {
    GuardProcess g;
    REQUIRE(g.Start({"--deadline-ms", "20000", "--", f->mount_point()}));
    REQUIRE(g.WaitFor("\"event\":\"frozen\"", 5s));
    auto write = WriteAsync(f->mount_point() + "/after-agent-death");
    CHECK(write.wait_for(200ms) == std::future_status::timeout);
    ::close(g.to_guard);  // the agent is gone
    g.to_guard = -1;
    const bool done = write.wait_for(2s) == std::future_status::ready;
    if (!done) ThawForTest(f->mount_point());
    CHECK(done);
    CHECK(g.WaitFor("\"event\":\"thawed\"", 2s));
    CHECK(g.output.find("agent pipe closed") != std::string::npos);
    CHECK(g.Exit() == 0);
  }
  {
    GuardProcess g;  // the agent stays alive but silent: the guard's own deadline fires
    REQUIRE(g.Start({"--deadline-ms", "1000", "--", f->mount_point()}));
    REQUIRE(g.WaitFor("\"event\":\"frozen\"", 5s));
    auto write = WriteAsync(f->mount_point() + "/after-guard-deadline");
    const bool done = write.wait_for(2s) == std::future_status::ready;
    if (!done) ThawForTest(f->mount_point());
    CHECK(done);
    CHECK(g.WaitFor("\"event\":\"thawed\"", 2s));
    CHECK(g.output.find("\"reason\":\"deadline\"") != std::string::npos);
  }
  {
    GuardProcess g;  // SIGTERM thaws
    REQUIRE(g.Start({"--deadline-ms", "20000", "--", f->mount_point()}));
    REQUIRE(g.WaitFor("\"event\":\"frozen\"", 5s));
    ::kill(g.pid, SIGTERM);
    CHECK(g.WaitFor("\"event\":\"thawed\"", 2s));
    CHECK(g.output.find("signal 15") != std::string::npos);
    CHECK(WritableWithin(f->mount_point(), 2s));
  }
}

TEST_CASE("guard and session refuse mount points outside the test root") {
  if (!RequireRoot()) return;
  // Only non-existent paths outside the root are used, so that even a broken check could not
  // freeze a host filesystem.
  GuardProcess g;
  REQUIRE(g.Start({"--deadline-ms", "1000", "--", "/nonexistent-vmsnap-test/x"}));
  g.WaitFor("\n", 2s);
  CHECK(g.output.find("\"event\":\"refused\"") != std::string::npos);
  CHECK(g.Exit() == 2);

  TempDir dir;
  platform::MountedFilesystem outside;
  outside.mount_point = "/nonexistent-vmsnap-test/x";
  outside.fs_type = "ext4";
  outside.freezable = true;
  auto s = FreezeSession::Start({outside}, TestFreezeOptions(dir, 1s));
  CHECK(s.status().code() == Code::kPermissionDenied);
  CHECK(s.status().phase() == "freeze");

  auto bad_deadline = FreezeSession::Start({outside}, TestFreezeOptions(dir, 61s));
  CHECK(bad_deadline.status().code() == Code::kInvalidArgument);
}

TEST_CASE("freeze session: a filesystem frozen by someone else is recorded busy, not thawed") {
  if (!RequireRoot()) return;
  TempDir dir;
  auto busy = LoopFs::Create(dir.path(), "ext4", 64, "busy");
  auto ok = LoopFs::Create(dir.path(), "ext4", 64, "ok");
  REQUIRE(busy);
  REQUIRE(ok);
  REQUIRE(FreezeForTest(busy->mount_point()));
  {
    auto session =
        FreezeSession::Start(Discover({busy->loop(), ok->loop()}), TestFreezeOptions(dir, 5s));
    REQUIRE_MESSAGE(session.ok(), session.status().ToString());
    auto reports = (*session)->Filesystems();
    REQUIRE(reports.size() == 2);
    for (const auto& r : reports) {
      CAPTURE(r.mount_point);
      if (r.mount_point == busy->mount_point()) {
        CHECK_FALSE(r.frozen);
        CHECK(r.why_not.find("EBUSY") != std::string::npos);
      } else {
        CHECK(r.frozen);
      }
    }
    CHECK((*session)->Thaw().ok());
  }
  CHECK(WritableWithin(ok->mount_point(), 2s));
  // Still frozen by its owner (us): the session did not undo a freeze it did not make.
  auto write = WriteAsync(busy->mount_point() + "/still-frozen");
  CHECK(write.wait_for(300ms) == std::future_status::timeout);
  ThawForTest(busy->mount_point());
  CHECK(write.wait_for(5s) == std::future_status::ready);
}

TEST_CASE("marker: a restarted agent finds the marker and thaws") {
  if (!RequireRoot()) return;
  TempDir dir;
  auto f = LoopFs::Create(dir.path(), "xfs", 320);
  REQUIRE(f);
  const std::string run = dir / "run";
  fs::create_directories(run);
  // What a SIGKILLed agent + guard leave behind: a marker and a frozen filesystem.
  nlohmann::json marker = {{"version", 1}, {"mount_points", {f->mount_point()}}};
  WriteFile(run + "/frozen.json", marker.dump(), 0600);
  REQUIRE(FreezeForTest(f->mount_point()));

  auto found = platform::RecoverLeftoverFreeze(run);
  REQUIRE(found.ok());
  CHECK(found->found);
  REQUIRE(found->filesystems.size() == 1);
  CHECK(found->filesystems[0].mount_point == f->mount_point());
  CHECK(found->filesystems[0].outcome == "thawed");
  CHECK(found->marker_text.find(f->mount_point()) != std::string::npos);
  CHECK_FALSE(fs::exists(run + "/frozen.json"));
  CHECK(WritableWithin(f->mount_point(), 2s));

  auto again = platform::RecoverLeftoverFreeze(run);
  REQUIRE(again.ok());
  CHECK_FALSE(again->found);

  // A marker for a filesystem that is not frozen any more: reported, harmless.
  WriteFile(run + "/frozen.json", marker.dump(), 0600);
  auto stale = platform::RecoverLeftoverFreeze(run);
  REQUIRE(stale.ok());
  CHECK(stale->filesystems[0].outcome == "not frozen");
}

}  // namespace
}  // namespace vmsnap::test

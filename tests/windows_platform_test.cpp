// The Windows platform layer for real (windows_tests.exe, run under Wine by
// scripts/windows-test.sh): Env on image files, RunProcess with real child programs and a
// batch file, CheckTrustedFile on files with real security descriptors, LockRuntimeDir, and
// the Windows answers of the freeze/snapshot interface.
#include <doctest/doctest.h>

#include <windows.h>
// after windows.h
#include <sddl.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "agent/hooks.hpp"
#include "platform/env.hpp"
#include "platform/quiesce.hpp"
#include "platform/snapshot.hpp"
#include "tests/support/test_support.hpp"

using namespace vmsnap;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

std::string SelfPath() {
  wchar_t self[MAX_PATH] = {};
  ::GetModuleFileNameW(nullptr, self, MAX_PATH);
  auto u8 = fs::path(self).u8string();
  return std::string(u8.begin(), u8.end());
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream(fs::path(std::u8string(path.begin(), path.end())), std::ios::binary) << text;
}

// Creates `path` holding `text`, then gives it the security descriptor `sddl` (owner and
// protected DACL) with SetFileSecurityW, as an administrator's icacls would.
bool CreateWithSecurity(const std::string& path, const wchar_t* sddl,
                        const std::string& text = "@echo off\r\n") {
  std::wstring wpath = fs::path(std::u8string(path.begin(), path.end())).wstring();
  HANDLE h = ::CreateFileW(wpath.c_str(), GENERIC_WRITE, 0, nullptr, CREATE_NEW,
                           FILE_ATTRIBUTE_NORMAL, nullptr);
  if (h == INVALID_HANDLE_VALUE) return false;
  DWORD wrote = 0;
  ::WriteFile(h, text.data(), static_cast<DWORD>(text.size()), &wrote, nullptr);
  ::CloseHandle(h);
  PSECURITY_DESCRIPTOR sd = nullptr;
  if (!::ConvertStringSecurityDescriptorToSecurityDescriptorW(sddl, SDDL_REVISION_1, &sd, nullptr))
    return false;
  const bool ok =
      ::SetFileSecurityW(wpath.c_str(), OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION, sd);
  ::LocalFree(sd);
  return ok;
}

// Wine reports every file as owned by the current user (it keeps no other owner), so no file
// can pass CheckTrustedFile's owner rule there; on Windows the positive cases must pass.
bool UnderWine() {
  HMODULE ntdll = ::GetModuleHandleW(L"ntdll.dll");
  return ntdll != nullptr && ::GetProcAddress(ntdll, "wine_get_version") != nullptr;
}

bool ProcessAlive(DWORD pid) {
  HANDLE h = ::OpenProcess(SYNCHRONIZE, FALSE, pid);
  if (h == nullptr) return false;
  bool alive = ::WaitForSingleObject(h, 0) == WAIT_TIMEOUT;
  ::CloseHandle(h);
  return alive;
}

}  // namespace

TEST_CASE("windows env: image files are read positioned; writes are atomic and private") {
  test::TempDir dir;
  auto* env = platform::Env::Default();
  const std::string img = dir / "disk.img";
  test::CreateSparseFile(img, 8 << 20);
  test::WriteRandomBlocks(img, 65536, {3, 100}, 7);
  auto reader = env->OpenDiskForRead(img);
  REQUIRE(reader.ok());
  CHECK((*reader)->size() == (8u << 20));
  CHECK_FALSE((*reader)->is_block_device());

  // Block 3 as written; a range across the end reads zeros past it.
  const std::string whole = test::ReadWhole(img);
  REQUIRE(whole.size() == (8u << 20));
  std::vector<std::byte> buf(65536);
  REQUIRE((*reader)->ReadAt(3 * 65536, buf).ok());
  CHECK(std::memcmp(buf.data(), whole.data() + 3 * 65536, buf.size()) == 0);
  std::vector<std::byte> tail(65536, std::byte{0x55});
  REQUIRE((*reader)->ReadAt((8u << 20) - 4096, tail).ok());
  CHECK(std::memcmp(tail.data(), whole.data() + (8u << 20) - 4096, 4096) == 0);
  CHECK(tail[4096] == std::byte{0});
  CHECK(tail.back() == std::byte{0});

  // NextData never skips data: block 100 is inside the range found at or after block 4.
  auto next = (*reader)->NextData(4 * 65536);
  REQUIRE(next.ok());
  REQUIRE(next->has_value());
  CHECK((*next)->begin <= 100u * 65536);
  CHECK((*next)->end >= 101u * 65536);
  auto past = (*reader)->NextData(8u << 20);
  REQUIRE(past.ok());
  CHECK_FALSE(past->has_value());

  // Identity: stable while unchanged, different after a write.
  auto id1 = (*reader)->Identity();
  auto id2 = (*reader)->Identity();
  REQUIRE(id1.ok());
  REQUIRE(id2.ok());
  CHECK(*id1 == *id2);
  std::this_thread::sleep_for(20ms);
  test::WriteRandomBlocks(img, 65536, {5}, 8);
  auto id3 = (*reader)->Identity();
  REQUIRE(id3.ok());
  CHECK_FALSE(*id1 == *id3);

  // Errors name the problem.
  CHECK(env->OpenDiskForRead(dir / "missing.img").status().code() == Code::kNotFound);
  CHECK(env->OpenDiskForRead(dir.path()).status().code() == Code::kInvalidArgument);
  CHECK(env->ReadFile(dir / "missing.txt").status().code() == Code::kNotFound);

  // Atomic writes replace existing files; no temporary file is left behind.
  const std::string cfg = dir / "agent.json";
  REQUIRE(env->WriteFileAtomic(cfg, "first", 0600).ok());
  REQUIRE(env->WriteFileAtomic(cfg, "second", 0600).ok());
  CHECK(env->ReadFile(cfg).value() == "second");
  int files = 0;
  for (const auto& e : fs::directory_iterator(fs::path(dir.path()))) {
    (void)e;
    ++files;
  }
  CHECK(files == 2);  // disk.img and agent.json
  CHECK(env->WriteFileAtomic(dir / "no-such-dir/x", "x").code() == Code::kNotFound);

  // Restore targets: a new file starts zeroed at the requested size; a small one is refused.
  auto fresh = env->OpenDiskForWrite(dir / "restored.img", 4 << 20);
  REQUIRE(fresh.ok());
  CHECK((*fresh)->starts_zeroed());
  std::vector<std::byte> block(65536, std::byte{0xab});
  REQUIRE((*fresh)->WriteAt(65536, block).ok());
  REQUIRE((*fresh)->Sync().ok());
  fresh->reset();
  const std::string restored = test::ReadWhole(dir / "restored.img");
  CHECK(restored.size() == (4u << 20));
  CHECK(restored[0] == 0);
  CHECK(static_cast<unsigned char>(restored[65536]) == 0xab);
  auto small = env->OpenDiskForWrite(dir / "restored.img", 8 << 20);
  CHECK(small.status().code() == Code::kInvalidArgument);
  CHECK(small.status().cause().find("too small") != std::string::npos);

  CHECK_FALSE(env->HostName().empty());
  const auto& paths = platform::DefaultAgentPaths();
  CHECK(paths.config_file.find("\\vmsnap\\agent.json") != std::string::npos);
  CHECK(paths.hooks_dir.find("\\vmsnap\\hooks.d") != std::string::npos);
  CHECK(paths.azure_config.empty());
}

TEST_CASE("windows RunProcess: exit code, separate stdout, tail, quoting") {
  platform::ProcessSpec spec;
  spec.path = SelfPath();
  spec.args = {"--child-echo", "7", "two words", "quote\"inside", "trailing\\"};
  auto r = platform::RunProcess(spec);
  REQUIRE(r.ok());
  CHECK(r->exit_code == 7);
  CHECK_FALSE(r->timed_out);
  CHECK_FALSE(r->succeeded());
  CHECK(r->Describe() == "exit code 7");
  CHECK(r->stdout_text == "two words\r\nquote\"inside\r\ntrailing\\\r\n");
  CHECK(r->output_tail.find("err") != std::string::npos);
  CHECK(r->stdout_text.find("err") == std::string::npos);

  spec.args = {"--child-echo", "0", "ok"};
  spec.output_tail_bytes = 4;
  auto ok = platform::RunProcess(spec);
  REQUIRE(ok.ok());
  CHECK(ok->succeeded());
  CHECK(ok->output_tail.size() <= 4);

  platform::ProcessSpec missing;
  missing.path = "C:\\no\\such\\program.exe";
  auto m = platform::RunProcess(missing);
  CHECK_FALSE(m.ok());
  CHECK(m.status().cause().find("program.exe") != std::string::npos);
}

TEST_CASE("windows RunProcess: the timeout terminates the program and its children") {
  test::TempDir dir;
  const std::string pid_file = dir / "grandchild.pid";
  platform::ProcessSpec spec;
  spec.path = SelfPath();
  spec.args = {"--child-sleep", "60000", "--spawn-sleeper", pid_file};
  spec.timeout = 1500ms;
  const auto start = std::chrono::steady_clock::now();
  auto r = platform::RunProcess(spec);
  const auto took = std::chrono::steady_clock::now() - start;
  REQUIRE(r.ok());
  CHECK(r->timed_out);
  CHECK_FALSE(r->succeeded());
  CHECK(r->Describe().find("timed out") != std::string::npos);
  CHECK(took < 15s);
  const DWORD grandchild = static_cast<DWORD>(std::stoul(test::ReadWhole(pid_file)));
  REQUIRE(grandchild != 0);
  bool gone = false;
  for (int i = 0; i < 50 && !gone; ++i) {
    gone = !ProcessAlive(grandchild);
    if (!gone) std::this_thread::sleep_for(100ms);
  }
  CHECK(gone);
}

TEST_CASE("windows RunProcess: batch files run through cmd.exe") {
  test::TempDir dir;
  const std::string script = dir / "hook.cmd";
  WriteText(script, "@echo off\r\necho hook %1 %2\r\nexit /b 4\r\n");
  platform::ProcessSpec spec;
  spec.path = script;
  spec.args = {"freeze", "now"};
  auto r = platform::RunProcess(spec);
  REQUIRE(r.ok());
  CHECK(r->exit_code == 4);
  CHECK(r->stdout_text.find("hook freeze now") != std::string::npos);
}

TEST_CASE("windows IsProgramFile and hooks: programs by extension, skip patterns kept") {
  test::TempDir dir;
  fs::create_directory(fs::path(dir / "hooks.d"));
  // 10-app.cmd is trusted (Administrators own it, only they and SYSTEM may write it);
  // 20-db.BAT is writable by Everyone.
  REQUIRE(CreateWithSecurity(dir / "hooks.d/10-app.cmd",
                             L"O:BAD:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;0x1200a9;;;BU)",
                             "@echo off\r\necho app %1\r\n"));
  REQUIRE(CreateWithSecurity(dir / "hooks.d/20-db.BAT", L"O:BAD:P(A;;FA;;;SY)(A;;FA;;;WD)"));
  WriteText(dir / "hooks.d/30-notes.txt", "not a program");
  WriteText(dir / "hooks.d/40-old.cmd.sample", "@echo off\r\n");
  CHECK(platform::IsProgramFile(dir / "hooks.d/10-app.cmd"));
  CHECK(platform::IsProgramFile(dir / "hooks.d/20-db.BAT"));
  CHECK(platform::IsProgramFile(SelfPath()));
  CHECK_FALSE(platform::IsProgramFile(dir / "hooks.d/30-notes.txt"));
  CHECK_FALSE(platform::IsProgramFile(dir / "hooks.d"));
  CHECK_FALSE(platform::IsProgramFile(dir / "missing.exe"));

  agent::HookOptions options;
  options.hooks_dir = dir / "hooks.d";
  options.azure_config_path = "";
  auto hooks = agent::ScriptHooks::Load(options);
  auto pre = hooks.RunPre();
  hooks.RunPost();
  CHECK(pre.any_configured);
  CHECK_FALSE(pre.all_succeeded);
  std::vector<agent::ScriptRecord> freeze, thaw;
  for (const auto& rec : hooks.records()) (rec.phase == "freeze" ? freeze : thaw).push_back(rec);
  // Only the two batch files are hooks; the trusted one ran, the other was refused.
  REQUIRE(freeze.size() == 2);
  CHECK(freeze[0].name == "10-app.cmd");
  CHECK(freeze[1].name == "20-db.BAT");
  CHECK(freeze[1].refused);
  CHECK(freeze[1].error.find("writable by Everyone") != std::string::npos);
  if (UnderWine()) {  // no file is owned by Administrators under Wine: refused, never run
    CHECK(freeze[0].refused);
    CHECK(freeze[0].error.find("not SYSTEM or Administrators") != std::string::npos);
    CHECK(thaw.empty());
  } else {
    CHECK_MESSAGE(freeze[0].ok, freeze[0].error);
    CHECK(freeze[0].output_tail.find("app freeze") != std::string::npos);
    REQUIRE(thaw.size() == 1);
    CHECK(thaw[0].name == "10-app.cmd");
    CHECK(thaw[0].output_tail.find("app thaw") != std::string::npos);
  }
}

TEST_CASE("windows CheckTrustedFile: owner and DACL decide; the error names the icacls fix") {
  test::TempDir dir;
  const std::string good = dir / "good.cmd";
  REQUIRE(CreateWithSecurity(good, L"O:BAD:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;0x1200a9;;;BU)"));
  Status good_status = platform::CheckTrustedFile(good, "hook");
  if (UnderWine()) {
    CHECK(good_status.code() == Code::kPermissionDenied);
    CHECK(good_status.cause().find("not SYSTEM or Administrators") != std::string::npos);
  } else {
    CHECK_MESSAGE(good_status.ok(), good_status.ToString());
  }

  const std::string everyone = dir / "everyone.cmd";
  REQUIRE(CreateWithSecurity(everyone, L"O:BAD:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;FA;;;WD)"));
  Status st = platform::CheckTrustedFile(everyone, "hook");
  CHECK(st.code() == Code::kPermissionDenied);
  CHECK_MESSAGE(st.cause().find("writable by Everyone") != std::string::npos, st.ToString());
  CHECK(st.cause().find(everyone) != std::string::npos);
  CHECK(st.fix().find("icacls") != std::string::npos);
  CHECK(st.phase() == "check hook");

  const std::string users = dir / "users.cmd";
  REQUIRE(CreateWithSecurity(users, L"O:BAD:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;FA;;;BU)"));
  Status users_status = platform::CheckTrustedFile(users, "hook");
  CHECK(users_status.code() == Code::kPermissionDenied);
  if (!UnderWine())  // Wine keeps only owner/Everyone entries (from the unix mode bits)
    CHECK_MESSAGE(users_status.cause().find("writable by Users") != std::string::npos,
                  users_status.ToString());

  const std::string user_owned = dir / "mine.cmd";
  REQUIRE(CreateWithSecurity(user_owned, L"O:BUD:P(A;;FA;;;SY)(A;;FA;;;BA)"));
  Status owner = platform::CheckTrustedFile(user_owned, "hook");
  CHECK(owner.code() == Code::kPermissionDenied);
  CHECK(owner.cause().find("not SYSTEM or Administrators") != std::string::npos);

  CHECK(platform::CheckTrustedFile(dir.path(), "hook").cause().find("not a regular file") !=
        std::string::npos);
  CHECK_FALSE(platform::CheckTrustedFile(dir / "missing.cmd", "hook").ok());
}

TEST_CASE("windows LockRuntimeDir: one holder at a time, the second is told who holds it") {
  test::TempDir dir;
  const std::string runtime = dir / "run";
  {
    auto first = platform::LockRuntimeDir(runtime, 0ms);
    REQUIRE(first.ok());
    CHECK(first->held());
    auto second = platform::LockRuntimeDir(runtime, 300ms);
    REQUIRE_FALSE(second.ok());
    CHECK(second.status().code() == Code::kConflict);
    CHECK(second.status().cause().find("pid " + std::to_string(::GetCurrentProcessId())) !=
          std::string::npos);
    platform::RuntimeDirLock moved = std::move(*first);
    CHECK(moved.held());
    CHECK_FALSE(first->held());
  }
  auto again = platform::LockRuntimeDir(runtime, 0ms);
  REQUIRE(again.ok());
  CHECK(again->held());
}

TEST_CASE("windows freeze and snapshot interface: VSS instead of a freeze") {
  test::TempDir dir;
  const std::string img = dir / "disk.img";
  test::CreateSparseFile(img, 1 << 20);
  auto found = platform::DiscoverFilesystems({img});
  REQUIRE(found.ok());
  CHECK(found->empty());
  CHECK(platform::DiscoverFilesystems({dir / "missing.img"}).status().code() == Code::kNotFound);
  CHECK(platform::LoopDevicesBackedBy(img).empty());

  auto freeze = platform::FreezeSession::Start({}, platform::FreezeOptions{});
  REQUIRE_FALSE(freeze.ok());
  CHECK(freeze.status().code() == Code::kUnavailable);
  CHECK(freeze.status().cause().find("VSS") != std::string::npos);
  auto leftover = platform::RecoverLeftoverFreeze(dir / "run");
  REQUIRE(leftover.ok());
  CHECK_FALSE(leftover->found);

  const auto deadline = std::chrono::steady_clock::now() + 10s;
  platform::SnapshotOptions file;
  file.provider = "auto";
  auto snap = platform::TakeSnapshot({img}, file, deadline);
  REQUIRE(snap.ok());
  REQUIRE((*snap)->disks().size() == 1);
  CHECK((*snap)->disks()[0].read_path == img);
  CHECK((*snap)->disks()[0].provider == "file");
  CHECK_FALSE((*snap)->disks()[0].point_in_time);

  auto device = platform::TakeSnapshot({"\\\\.\\PhysicalDrive0"}, file, deadline);
  CHECK(device.status().code() == Code::kInvalidArgument);
  CHECK(device.status().cause().find("VSS") != std::string::npos);
  platform::SnapshotOptions lvm;
  lvm.provider = "lvm";
  CHECK(platform::TakeSnapshot({img}, lvm, deadline).status().cause().find("Linux only") !=
        std::string::npos);

  // The command provider refuses an untrusted program before running it.
  platform::SnapshotOptions command;
  command.provider = "command";
  command.command_path = dir / "snap.cmd";
  REQUIRE(CreateWithSecurity(command.command_path, L"O:BAD:P(A;;FA;;;SY)(A;;FA;;;WD)"));
  auto refused = platform::TakeSnapshot({img}, command, deadline);
  CHECK_FALSE(refused.ok());
  CHECK(refused.status().phase() == "check snapshot command");
}

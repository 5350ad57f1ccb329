// Integration tests of the data path against a real vmsnap-vault on loopback TLS, driving the
// real vmsnap-agent binary and asserting on its --json reports and on restored bytes.
#include <doctest/doctest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "tests/support/test_support.hpp"

using namespace vmsnap::test;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr uint64_t kBlock = 64 * 1024;

std::vector<std::string> Args(std::initializer_list<std::vector<std::string>> parts) {
  std::vector<std::string> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

json Backup(const Vault& v, const TempDir& dir, const std::vector<std::string>& disks,
            std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"backup"};
  auto c = v.conn();
  args.insert(args.end(), c.begin(), c.end());
  for (const auto& d : disks) {
    args.push_back("--disk");
    args.push_back(d);
  }
  args.insert(args.end(), {"--state-dir", dir / "state", "--item", "test-vm", "--json"});
  // The block counts below are in 64 KiB blocks unless a test gives its own --block-size.
  if (std::find(extra.begin(), extra.end(), "--block-size") == extra.end())
    args.insert(args.end(), {"--block-size", "64K"});
  args.insert(args.end(), extra.begin(), extra.end());
  auto r = Agent(args);
  INFO("stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  json j = r.json();
  REQUIRE(j.is_object());
  return j;
}

RunResult Restore(const Vault& v, const std::string& rp, const std::vector<std::string>& targets,
                  std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"restore"};
  auto c = v.conn();
  args.insert(args.end(), c.begin(), c.end());
  args.insert(args.end(), {"--rp", rp, "--json"});
  for (const auto& t : targets) {
    args.push_back("--to");
    args.push_back(t);
  }
  args.insert(args.end(), extra.begin(), extra.end());
  return Agent(args);
}

json List(const Vault& v) {
  auto c = v.conn();
  auto r = Agent(Args({{"list"}, c, {"--json"}}));
  REQUIRE(r.exit_code == 0);
  return r.json()["recovery_points"];
}

// A 32 MiB sparse image with data in a few known places.
std::string MakeImage(const TempDir& dir, const std::string& name, uint64_t seed) {
  std::string path = dir / name;
  CreateSparseFile(path, 32 << 20);
  WriteRandomBlocks(path, kBlock, {0, 1, 2, 40, 41, 100, 300, 511}, seed);
  return path;
}

}  // namespace

TEST_CASE("full backup, incremental uploads exactly the K changed blocks, restore is identical") {
  TempDir dir;
  Vault vault(dir / "vault");
  vault.Start();
  std::string img = MakeImage(dir, "disk.img", 1);

  json full = Backup(vault, dir, {img});
  CHECK(full["consistency"] == "crash");  // an image file nothing wrote during the read
  CHECK(full["recovery_point"].get<std::string>().size() > 10);
  CHECK(full["duration_ms"].is_number());
  // The phases cover the job, in order, without overlap.
  int64_t phases_total = 0;
  for (const char* phase : {"prepare", "consistency", "transfer", "commit"}) {
    INFO(phase);
    REQUIRE(full["phases_ms"].contains(phase));
    CHECK(full["phases_ms"][phase].get<int64_t>() >= 0);
    phases_total += full["phases_ms"][phase].get<int64_t>();
  }
  CHECK(phases_total <= full["duration_ms"].get<int64_t>());
  CHECK(phases_total >= full["duration_ms"].get<int64_t>() - 5);  // ms rounding of each phase
  const json& d0 = full["disks"][0];
  CHECK(d0["path"] == img);
  CHECK(d0["size_bytes"] == 32u << 20);
  CHECK(d0["blocks_total"] == 512);
  CHECK(d0["blocks_zero"] == 504);
  CHECK(d0["blocks_read"] == 8);  // holes are not read
  CHECK(d0["blocks_changed"] == 8);
  CHECK(d0["blocks_uploaded"] == 8);
  CHECK(d0["bytes_uploaded"].get<uint64_t>() >= 8 * kBlock);  // random data does not compress
  CHECK(d0["mode"] == "full");

  // Change exactly K = 3 known blocks: two with data, one that was a hole.
  WriteRandomBlocks(img, kBlock, {1, 41, 200}, 99);
  json inc = Backup(vault, dir, {img});
  const json& d1 = inc["disks"][0];
  CHECK(d1["mode"] == "incremental");
  CHECK(d1["parent"] == full["recovery_point"]);
  CHECK(d1["blocks_changed"] == 3);
  CHECK(d1["blocks_uploaded"] == 3);
  CHECK(d1["blocks_zero"] == 503);

  // Restore both points: each is byte-identical to the image as it was.
  std::string want_now = FileSha256(img);
  auto r = Restore(vault, inc["recovery_point"], {dir / "restored.img"});
  INFO("stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(FileSha256(dir / "restored.img") == want_now);
  CHECK(r.json()["disks"][0]["blocks_data"] == 9);
  CHECK_FALSE(fs::exists(dir / "restored.img.vmsnap-partial"));

  // Restoring over an existing, larger-or-equal file rewrites zero blocks too.
  WriteRandomBlocks(dir / "restored.img", kBlock, {5, 6}, 7);
  r = Restore(vault, inc["recovery_point"], {dir / "restored.img"});
  REQUIRE(r.exit_code == 0);
  CHECK(FileSha256(dir / "restored.img") == want_now);

  auto points = List(vault);
  REQUIRE(points.size() == 2);
  CHECK(points[0]["disks"][0]["full"] == true);
  CHECK(points[1]["disks"][0]["full"] == false);
  CHECK(vault.Stop() == 0);  // SIGTERM: clean shutdown
}

TEST_CASE("two disks in one backup, restored together") {
  TempDir dir;
  Vault vault(dir / "vault");
  vault.Start();
  std::string a = MakeImage(dir, "a.img", 1), b = MakeImage(dir, "b.img", 2);
  json full = Backup(vault, dir, {a, b});
  REQUIRE(full["disks"].size() == 2);
  CHECK(full["disks"][1]["path"] == b);
  WriteRandomBlocks(b, kBlock, {7}, 5);
  json inc = Backup(vault, dir, {a, b});
  CHECK(inc["disks"][0]["blocks_uploaded"] == 0);
  CHECK(inc["disks"][1]["blocks_uploaded"] == 1);
  auto r = Restore(vault, inc["recovery_point"], {dir / "ra.img", dir / "rb.img"});
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(FileSha256(dir / "ra.img") == FileSha256(a));
  CHECK(FileSha256(dir / "rb.img") == FileSha256(b));
  // One disk alone.
  r = Restore(vault, inc["recovery_point"], {dir / "only-b.img"}, {"--disk", "1"});
  REQUIRE(r.exit_code == 0);
  CHECK(FileSha256(dir / "only-b.img") == FileSha256(b));
  // Wrong number of targets is a clear error.
  r = Restore(vault, inc["recovery_point"], {dir / "x.img"});
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("one --to per disk") != std::string::npos);
}

TEST_CASE("without local state the agent compares with the vault's map and resends nothing") {
  TempDir dir;
  Vault vault(dir / "vault");
  vault.Start();
  std::string img = MakeImage(dir, "disk.img", 3);
  Backup(vault, dir, {img});
  fs::remove_all(dir / "state");
  WriteRandomBlocks(img, kBlock, {2}, 11);
  json inc = Backup(vault, dir, {img});
  const json& d = inc["disks"][0];
  CHECK(d["mode"] == "incremental-vault-map");
  CHECK(d["blocks_changed"] == 1);
  CHECK(d["blocks_uploaded"] == 1);
  auto r = Restore(vault, inc["recovery_point"], {dir / "r.img"});
  REQUIRE(r.exit_code == 0);
  CHECK(FileSha256(dir / "r.img") == FileSha256(img));
}

TEST_CASE("vault killed mid-upload: rerun uploads only the missing blocks, nothing partial") {
  TempDir dir;
  Vault vault(dir / "vault");
  vault.Start();
  std::string img = dir / "big.img";
  CreateSparseFile(img, 48 << 20);
  std::vector<uint64_t> all;
  for (uint64_t i = 0; i < 768; ++i) all.push_back(i);
  WriteRandomBlocks(img, kBlock, all, 42);

  // A rate limit stretches the upload so the kill lands in the middle of it.
  auto c = vault.conn();
  std::vector<std::string> argv{AgentBinary(), "backup"};
  argv.insert(argv.end(), c.begin(), c.end());
  argv.insert(argv.end(),
              {"--disk", img, "--state-dir", dir / "state", "--item", "test-vm", "--json",
               "--max-rate", "8000000", "--uploaders", "1", "--block-size", "64K"});
  Child agent(argv, dir / "agent.out", dir / "agent.err");
  size_t stored = 0;
  for (int i = 0; i < 400 && stored < 100; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
    stored = vault.StoredBlockCount();
  }
  REQUIRE(stored >= 100);
  vault.Kill(SIGKILL);
  int rc = agent.Wait();
  CHECK(rc != 0);
  std::string err = ReadWhole(dir / "agent.err");
  CHECK(err.find("unreachable") != std::string::npos);

  vault.Start();
  CHECK(List(vault).empty());  // no partial recovery point is ever listed
  size_t before = vault.StoredBlockCount();
  CHECK(before > 0);
  CHECK(before < 768);
  json rerun = Backup(vault, dir, {img});
  CHECK(rerun["disks"][0]["mode"] == "full");
  CHECK(rerun["disks"][0]["blocks_changed"] == 768);
  CHECK(rerun["disks"][0]["blocks_uploaded"] == 768 - before);
  CHECK(vault.StoredBlockCount() == 768);
  REQUIRE(List(vault).size() == 1);
  auto r = Restore(vault, rerun["recovery_point"], {dir / "r.img"});
  REQUIRE(r.exit_code == 0);
  CHECK(FileSha256(dir / "r.img") == FileSha256(img));
}

TEST_CASE("wrong CA file: the agent refuses to connect") {
  TempDir dir;
  Vault vault(dir / "vault");
  vault.Start();
  Vault other(dir / "other");
  other.Start();  // a second vault has its own CA
  std::string img = MakeImage(dir, "disk.img", 4);
  auto r = Agent({"backup", "--vault", vault.url(), "--ca", other.ca(), "--token", vault.token(),
                  "--disk", img, "--state-dir", dir / "state"});
  CHECK(r.exit_code == 4);
  CHECK(r.err.find("certificate failed verification") != std::string::npos);
  CHECK(r.err.find("--ca") != std::string::npos);
  // A CA file that is not a certificate at all.
  std::ofstream(dir / "junk.pem") << "not a certificate";
  r = Agent({"list", "--vault", vault.url(), "--ca", dir / "junk.pem", "--token", vault.token()});
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("CA file") != std::string::npos);
}

TEST_CASE("wrong token: 401 with a clear message") {
  TempDir dir;
  Vault vault(dir / "vault");
  vault.Start();
  auto r = Agent({"list", "--vault", vault.url(), "--ca", vault.ca(), "--token", "vst_wrong"});
  CHECK(r.exit_code == 4);
  CHECK(r.err.find("401") != std::string::npos);
  CHECK(r.err.find("token") != std::string::npos);
}

TEST_CASE("bad input: each a clear error and a non-zero exit") {
  TempDir dir;
  Vault vault(dir / "vault");
  vault.Start();
  auto c = vault.conn();
  std::string img = MakeImage(dir, "disk.img", 5);

  SUBCASE("missing disk path") {
    auto r = Agent(Args({{"backup"}, c, {"--disk", dir / "nope.img", "--state-dir", dir / "s"}}));
    CHECK(r.exit_code == 6);
    CHECK(r.err.find("open disk") != std::string::npos);
    CHECK(r.err.find("does not exist") != std::string::npos);
  }
  SUBCASE("block size not a power of two or out of range") {
    for (std::string bs : {"48K", "8K", "8M"}) {
      auto r = Agent(Args({{"backup"}, c, {"--disk", img, "--block-size", bs, "--json"}}));
      CHECK(r.exit_code == 2);
      CHECK(r.err.find("power of two between 16 KiB and 4 MiB") != std::string::npos);
      CHECK(r.json()["code"] == "INVALID_ARGUMENT");
    }
  }
  SUBCASE("unreachable vault, after bounded retries") {
    Vault gone(dir / "gone");
    gone.Start();
    std::string url = gone.url(), ca = gone.ca(), token = gone.token();
    gone.Stop();
    auto t0 = std::chrono::steady_clock::now();
    auto r = Agent({"backup", "--vault", url, "--ca", ca, "--token", token, "--disk", img,
                    "--retries", "3", "--state-dir", dir / "s"});
    auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK(r.exit_code == 3);
    CHECK(r.err.find("unreachable after 3 attempts") != std::string::npos);
    CHECK(r.err.find("check that vmsnap-vault is running") != std::string::npos);
    CHECK(secs < 60);  // bounded: it gives up
  }
  SUBCASE("restore target too small is refused and left untouched") {
    json full = Backup(vault, dir, {img});
    std::string small = dir / "small.img";
    CreateSparseFile(small, 1 << 20);
    WriteRandomBlocks(small, kBlock, {0}, 77);
    std::string before = FileSha256(small);
    auto r = Restore(vault, full["recovery_point"], {small});
    CHECK(r.exit_code == 2);
    CHECK(r.err.find("too small") != std::string::npos);
    CHECK(FileSha256(small) == before);
  }
  SUBCASE("unknown recovery point") {
    auto r = Restore(vault, "20990101T000000000Z-0000", {dir / "x.img"});
    CHECK(r.exit_code == 6);
    CHECK_FALSE(fs::exists(dir / "x.img"));
  }
  SUBCASE("corrupted block on the vault: restore names the block, leaves no target") {
    json full = Backup(vault, dir, {img});
    // Flip one payload byte of every stored block: whichever is read first is corrupt.
    size_t damaged = 0;
    for (const auto& rec : vault.StoredRecords()) {
      REQUIRE(rec.payload_bytes > 60);
      std::fstream f(rec.pack_path, std::ios::in | std::ios::out | std::ios::binary);
      const auto at = static_cast<std::streamoff>(rec.payload_offset + 59);
      char ch = 0;
      f.seekg(at);
      f.get(ch);
      f.seekp(at);
      f.put(static_cast<char>(ch ^ 0x20));
      REQUIRE(f.good());
      ++damaged;
    }
    REQUIRE(damaged == 8);
    auto r = Restore(vault, full["recovery_point"], {dir / "r.img"});
    CHECK(r.exit_code == 5);
    CHECK(r.err.find("corrupt") != std::string::npos);
    CHECK(r.err.find("block ") != std::string::npos);
    CHECK_FALSE(fs::exists(dir / "r.img"));
    CHECK_FALSE(fs::exists(dir / "r.img.vmsnap-partial"));
  }
}

TEST_CASE("a live block device: refused without a snapshot, consistency none when allowed") {
  if (!IsRoot()) {
    if (InCi()) FAIL("this test needs root (loop devices) and CI=true forbids skipping");
    MESSAGE("skipped: needs root to attach a loop device");
    return;
  }
  TempDir dir;
  Vault vault(dir / "vault");
  vault.Start();
  std::string img = MakeImage(dir, "disk.img", 6);
  auto attach = Run({"/sbin/losetup", "--find", "--show", img});
  REQUIRE(attach.exit_code == 0);
  std::string dev = attach.out.substr(0, attach.out.find('\n'));
  struct Detach {
    std::string dev;
    ~Detach() { Run({"/sbin/losetup", "-d", dev}); }
  } detach{dev};
  // The image sits on /tmp (no reflink): no snapshot provider can copy the device, and a
  // silent live read is not allowed.
  const std::vector<std::string> isolated{"--hooks-dir",         dir / "no-hooks", "--azure-config",
                                          dir / "no-azure.json", "--runtime-dir",  dir / "run"};
  auto c = vault.conn();
  auto refused = Agent(Args({{"backup"},
                             c,
                             {"--disk", dev, "--state-dir", dir / "state", "--item", "test-vm"},
                             isolated}));
  CHECK(refused.exit_code != 0);
  CHECK(refused.err.find("consistency") != std::string::npos);
  CHECK(refused.err.find("--allow-inconsistent") != std::string::npos);
  CHECK(List(vault).empty());  // nothing committed

  auto extra = isolated;
  extra.push_back("--allow-inconsistent");
  json j = Backup(vault, dir, {dev}, extra);
  CHECK(j["consistency"] == "none");
  CHECK(j["consistency_evidence"]["level"] == "none");
  CHECK(j["disks"][0]["path"] == dev);
  CHECK(j["disks"][0]["read_path"] == dev);
  CHECK(j["disks"][0]["blocks_changed"] == 8);
  CHECK(j["disks"][0]["blocks_read"] == 512);  // a device has no holes to skip
  auto r = Restore(vault, j["recovery_point"], {dir / "r.img"});
  REQUIRE(r.exit_code == 0);
  CHECK(FileSha256(dir / "r.img") == FileSha256(img));
}

TEST_CASE("without --block-size: 32 KiB for a first backup, then the latest point's block size") {
  TempDir dir;
  Vault vault(dir / "vault");
  vault.Start();
  auto c = vault.conn();
  auto backup_without_size = [&](const std::string& img, const std::string& item) {
    auto r = Agent(Args(
        {{"backup"}, c, {"--disk", img, "--state-dir", dir / "state", "--item", item, "--json"}}));
    INFO("stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    return r.json();
  };
  // A new machine gets the default, 32 KiB: its 8 random 64 KiB extents are 16 blocks.
  json first = backup_without_size(MakeImage(dir, "new.img", 3), "new-vm");
  CHECK(first["disks"][0]["block_size"] == 32 * 1024);
  CHECK(first["disks"][0]["blocks_uploaded"] == 16);
  // A machine backed up with 64 KiB blocks (e.g. before the default changed) stays
  // incremental at 64 KiB: a changed default never forces a full backup.
  std::string old_img = MakeImage(dir, "old.img", 4);
  json old = Backup(vault, dir, {old_img});
  REQUIRE(old["disks"][0]["block_size"] == 64 * 1024);
  WriteRandomBlocks(old_img, kBlock, {7}, 5);
  json inc = backup_without_size(old_img, "test-vm");
  CHECK(inc["disks"][0]["block_size"] == 64 * 1024);
  CHECK(inc["disks"][0]["mode"] == "incremental");
  CHECK(inc["disks"][0]["blocks_uploaded"] == 1);
  auto r = Restore(vault, inc["recovery_point"], {dir / "old-restored.img"});
  REQUIRE(r.exit_code == 0);
  CHECK(FileSha256(dir / "old-restored.img") == FileSha256(old_img));
}

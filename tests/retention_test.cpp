// Recovery point lifecycle (issue 5): seed 002's storage table and its three expiry cases,
// stop protection / soft delete with an injected clock, verify, cleanup racing an upload and a
// long seeded random run. The process-level tests drive a real vault (--test-clock), real
// `vmsnap-agent backup/restore` and the real admin CLI; the race and the long run drive
// Catalog, BlockStore and Lifecycle in-process to force interleavings and stay fast.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "common/block_codec.hpp"
#include "common/bytes.hpp"
#include "common/manifest.hpp"
#include "tests/support/test_support.hpp"
#include "vault/block_store.hpp"
#include "vault/catalog.hpp"
#include "vault/db.hpp"
#include "vault/disk_space.hpp"
#include "vault/id_sets.hpp"
#include "vault/retention.hpp"

using namespace vmsnap;
using namespace vmsnap::test;
using nlohmann::json;

namespace {

// The block index of a vault's block store (DATA/blocks/index.db), opened beside the store's
// own connection in this process (the store holds it exclusively against other processes, not
// against other connections of its own), to damage or age blocks as a test needs.
std::unique_ptr<vault::Db> BlockIndex(const std::string& blocks_dir) {
  auto db = vault::Db::Open(blocks_dir + "/index.db");
  REQUIRE(db.ok());
  return std::move(*db);
}

// The rows of a block store's index (its log included), read beside the store.
int64_t IndexedRows(const std::string& blocks_dir) {
  auto rows = BlockIndex(blocks_dir)->Query("SELECT count(*) FROM blocks");
  REQUIRE(rows.ok());
  return (*rows)[0].Int(0);
}

// Overwrites bytes of a stored block's payload in its pack file. Finds the block in a copy of
// the index (and its log): a running vault process holds the index itself exclusively.
void CorruptStoredBlock(const std::string& blocks_dir, const BlockId& id, uint64_t at,
                        std::string_view bytes) {
  TempDir copy;
  CopyBlockIndex(blocks_dir, copy.path());
  auto rows = BlockIndex(copy.path())
                  ->Query("SELECT pack, offset FROM blocks WHERE id = x'" + id.Hex() + "'");
  REQUIRE(rows.ok());
  REQUIRE(rows->size() == 1);
  char name[32];
  std::snprintf(name, sizeof name, "%08lld.pack", static_cast<long long>((*rows)[0].Int(0)));
  std::fstream f(blocks_dir + "/packs/" + name, std::ios::in | std::ios::out | std::ios::binary);
  REQUIRE(f.good());
  f.seekp(static_cast<std::streamoff>((*rows)[0].Int(1) + 41 + at));
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

// Removes a block from the index, as if its data had been lost. In this process's store, or in
// a stopped vault's (a running vault process holds its index exclusively).
void LoseStoredBlock(const std::string& blocks_dir, const BlockId& id) {
  auto db = BlockIndex(blocks_dir);
  REQUIRE(db->Exec("DELETE FROM blocks WHERE id = x'" + id.Hex() + "'").ok());
  REQUIRE(db->Changes() == 1);
}

constexpr uint64_t kBlock = 16 * 1024;
// A pack of 16 blocks of kBlock random bytes put one at a time: a 4 KiB header, then per put
// the record (41 bytes of header + the block) padded to 4 KiB.
constexpr uint64_t kSmallPack = 4096 + 16 * ((kBlock + 41 + 4095) / 4096 * 4096);
constexpr int64_t kDay = 86400000;
// 2030-01-31T00:00:00Z: a month boundary follows one day later.
constexpr int64_t kJan31 = 1896048000000;

RunResult Admin(const Vault& v, std::vector<std::string> args) {
  std::vector<std::string> argv{VMSNAP_ADMIN_BINARY};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.insert(argv.end(), {"--vault-config", v.data() + "/vault.json", "--json"});
  return Run(argv);
}

json AdminJson(const Vault& v, std::vector<std::string> args) {
  auto r = Admin(v, args);
  INFO("vmsnap " << args[0] << " stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  json j = r.json();
  REQUIRE(!j.is_null());
  return j;
}

void SetClock(const Vault& v, int64_t now_ms) {
  auto r =
      Run({"/usr/bin/curl", "-s", "--cacert", v.ca(), "-H", "Authorization: Bearer " + v.token(),
           "-d", json{{"now_ms", now_ms}}.dump(), v.url() + "/v1/admin/clock"});
  INFO("clock: " << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  REQUIRE(r.json()["now_ms"] == now_ms);
}

std::string Iso(int64_t ms) {
  std::time_t t = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// Blocks older than the collector's safety margin (real time) can be freed: wait past it, so
// every block written or touched before this call is old enough however fast the test ran.
void LetBlocksAge() {
  std::this_thread::sleep_for(std::chrono::milliseconds(vault::Lifecycle::kBlockAgeMarginMs + 300));
}

// A vault with a test clock and one enrolled (registered) VM whose 4-block disk image the test
// changes and backs up with the admin token (`vmsnap-agent backup --item`).
struct SeedVm {
  TempDir tmp;
  Vault vault{tmp / "data"};
  std::string name = "vm1";
  std::string disk = tmp / "vm1.img";
  std::map<std::string, std::string> kept;  // rp id -> copy of the image it must restore

  explicit SeedVm(int64_t start_ms, std::vector<std::string> vault_args = {}) {
    vault_args.insert(vault_args.begin(), "--test-clock");
    vault.Configure(vault_args);
    vault.Start();
    SetClock(vault, start_ms);
    CreateSparseFile(disk, 4 * kBlock);
    json token = AdminJson(vault, {"enroll-token", "create", "--expires", "1h"});
    json info = json::parse(ReadWhole(vault.data() + "/vault.json"));
    auto r =
        Agent({"enroll", "--vault", vault.url(), "--ca-fingerprint", info["ca_fingerprint_sha256"],
               "--token", token["token"], "--name", name, "--disk", disk, "--config",
               tmp / "agent.json", "--state-dir", tmp / "enroll-state", "--json"});
    INFO("enroll: " << r.err);
    REQUIRE(r.exit_code == 0);
  }

  // Backs the image up at vault time `at_ms` and keeps a copy of it.
  std::string Backup(int64_t at_ms) {
    SetClock(vault, at_ms);
    std::vector<std::string> args{"backup"};
    auto c = vault.conn();
    args.insert(args.end(), c.begin(), c.end());
    args.insert(args.end(), {"--disk", disk, "--block-size", "16K", "--item", name, "--state-dir",
                             tmp / "state", "--json"});
    auto r = Agent(args);
    INFO("backup: " << r.err);
    REQUIRE(r.exit_code == 0);
    std::string rp = r.json()["recovery_point"];
    std::filesystem::copy_file(disk, tmp / (rp + ".img"));
    kept[rp] = tmp / (rp + ".img");
    return rp;
  }

  uint64_t StoredBytes() {
    json s = AdminJson(vault, {"storage", name});
    REQUIRE(s["items"].size() == 1);
    CHECK(s["items"][0]["stored_bytes"] == s["vault"]["stored_bytes"]);
    return s["items"][0]["stored_bytes"];
  }

  std::vector<std::string> Points() {
    std::vector<std::string> ids;
    json list = AdminJson(vault, {"rp", "list", name});
    for (const auto& p : list["recovery_points"]) ids.push_back(p["id"]);
    return ids;
  }

  // Every remaining point restores exactly the image it was made from.
  void CheckRestores() {
    for (const auto& id : Points()) {
      std::vector<std::string> args{"restore"};
      auto c = vault.conn();
      args.insert(args.end(), c.begin(), c.end());
      std::string out = tmp / ("restored-" + id + ".img");
      std::filesystem::remove(out);
      args.insert(args.end(), {"--rp", id, "--to", out, "--json"});
      auto r = Agent(args);
      INFO("restore " << id << ": " << r.err);
      REQUIRE(r.exit_code == 0);
      REQUIRE(kept.count(id));
      CHECK(FileSha256(out) == FileSha256(kept[id]));
    }
  }

  void Policy(const std::string& policy, int daily, int weekly, int monthly) {
    AdminJson(vault, {"policy", "create", policy, "--schedule", "daily 23:59", "--keep-daily",
                      std::to_string(daily), "--keep-weekly", std::to_string(weekly),
                      "--keep-monthly", std::to_string(monthly), "--keep-yearly", "0"});
    AdminJson(vault, {"protect", name, "--policy", policy});
  }
};

// Seed 002's three backups: RP1 = D1+D2 (blocks 0, 1; 2 and 3 zero), RP2 adds D3 (block 2),
// RP3 changes D2 -> D2' and D3 -> D3'. Random data: every block is stored raw (16 KiB).
std::vector<std::string> SeedBackups(SeedVm& s, int64_t t1, int64_t t2, int64_t t3) {
  std::vector<std::string> rps;
  WriteRandomBlocks(s.disk, kBlock, {0, 1}, 1);
  rps.push_back(s.Backup(t1));
  CHECK(s.StoredBytes() == 2 * kBlock);
  WriteRandomBlocks(s.disk, kBlock, {2}, 2);
  rps.push_back(s.Backup(t2));
  CHECK(s.StoredBytes() == 3 * kBlock);
  WriteRandomBlocks(s.disk, kBlock, {1, 2}, 3);
  rps.push_back(s.Backup(t3));
  CHECK(s.StoredBytes() == 5 * kBlock);
  json list = AdminJson(s.vault, {"rp", "list", s.name})["recovery_points"];
  REQUIRE(list.size() == 3);
  CHECK(list[0]["full"] == true);
  CHECK(list[0]["added_bytes"] == 2 * kBlock);
  CHECK(list[1]["added_bytes"] == kBlock);
  CHECK(list[2]["added_bytes"] == 2 * kBlock);
  return rps;
}

json CleanupNow(const Vault& v) {
  return AdminJson(v, {"cleanup", "--now"});
}

}  // namespace

TEST_CASE("seed 002, case 1: the initial full expires and is merged into the next point") {
  SeedVm s(kJan31 - 10 * kDay);
  auto rps = SeedBackups(s, kJan31 - 10 * kDay + 3600000, kJan31 - 9 * kDay + 3600000,
                         kJan31 - 8 * kDay + 3600000);
  // Keep 2 daily points: at day 3, day 1's point (RP1) has expired.
  s.Policy("two-days", 2, 0, 0);
  LetBlocksAge();
  json report = CleanupNow(s.vault);
  CHECK(report["removed"] == json::array({rps[0]}));
  CHECK(report["bytes_freed"] == 0);  // D1, D2 are still needed by RP2
  CHECK(s.StoredBytes() == 5 * kBlock);
  json list = AdminJson(s.vault, {"rp", "list", s.name})["recovery_points"];
  REQUIRE(list.size() == 2);
  CHECK(list[0]["id"] == rps[1]);
  CHECK(list[0]["full"] == true);  // RP2 became the full
  CHECK(list[0]["added_bytes"] == 3 * kBlock);
  s.CheckRestores();
  // Nothing else is due: a second cleanup changes nothing.
  CHECK(CleanupNow(s.vault)["removed"].empty());
}

TEST_CASE("seed 002, case 2: a middle incremental expires and is merged into the next") {
  SeedVm s(kJan31);
  // RP1 on Jan 31 (the January point), RP2 Feb 1, RP3 Feb 2.
  auto rps =
      SeedBackups(s, kJan31 + 43200000, kJan31 + kDay + 43200000, kJan31 + 2 * kDay + 43200000);
  s.Policy("daily-and-monthly", 1, 0, 12);
  auto list = AdminJson(s.vault, {"rp", "list", s.name})["recovery_points"];
  CHECK(list[0]["kept_by"] == json::array({"daily", "monthly"}));
  CHECK(list[0]["expires_ms"] == kJan31 + 335LL * kDay);  // 2031-01-01
  CHECK(list[1]["expires_ms"] == kJan31 + 2 * kDay);
  LetBlocksAge();
  json report = CleanupNow(s.vault);
  CHECK(report["removed"] == json::array({rps[1]}));
  CHECK(report["bytes_freed"] == kBlock);  // D3, replaced by D3' in RP3
  CHECK(s.StoredBytes() == 4 * kBlock);
  CHECK(s.Points() == std::vector<std::string>{rps[0], rps[2]});
  s.CheckRestores();
}

TEST_CASE("seed 002, case 3: an on-demand point expires and is merged into the next") {
  SeedVm s(kJan31 - 20 * kDay);
  const int64_t d0 = kJan31 - 20 * kDay + 3600000;
  WriteRandomBlocks(s.disk, kBlock, {0, 1}, 1);
  std::string rp1 = s.Backup(d0);
  WriteRandomBlocks(s.disk, kBlock, {2}, 2);
  std::string rp2 = s.Backup(d0 + kDay);
  // RP2 is on demand, kept until 12 hours after it was made.
  AdminJson(s.vault, {"rp", "retain", rp2, "--until", Iso(d0 + kDay + 43200000)});
  WriteRandomBlocks(s.disk, kBlock, {1, 2}, 3);
  std::string rp3 = s.Backup(d0 + 2 * kDay);
  CHECK(s.StoredBytes() == 5 * kBlock);
  s.Policy("five-days", 5, 0, 0);
  auto list = AdminJson(s.vault, {"rp", "list", s.name})["recovery_points"];
  CHECK(list[1]["kept_by"] == json::array({"on-demand"}));
  LetBlocksAge();
  json report = CleanupNow(s.vault);
  CHECK(report["removed"] == json::array({rp2}));
  CHECK(report["bytes_freed"] == kBlock);
  CHECK(s.StoredBytes() == 4 * kBlock);
  CHECK(s.Points() == std::vector<std::string>{rp1, rp3});
  s.CheckRestores();
}

TEST_CASE("stop protection: keep data, resume, soft delete, undelete, purge") {
  const int64_t t0 = kJan31;
  SeedVm s(t0, {"--soft-delete-days", "14"});
  WriteRandomBlocks(s.disk, kBlock, {0, 1}, 11);
  std::string rp1 = s.Backup(t0 + 3600000);
  WriteRandomBlocks(s.disk, kBlock, {1}, 12);
  std::string rp2 = s.Backup(t0 + kDay + 3600000);
  s.Policy("one-day", 1, 0, 0);

  // Keep data: nothing expires, however late it gets.
  AdminJson(s.vault, {"unprotect", s.name, "--keep-data"});
  SetClock(s.vault, t0 + 30 * kDay);
  CHECK(CleanupNow(s.vault)["removed"].empty());
  auto list = AdminJson(s.vault, {"rp", "list", s.name})["recovery_points"];
  REQUIRE(list.size() == 2);
  CHECK(list[0]["expires_ms"].is_null());
  CHECK(list[0]["kept_by"] == json::array({"protection stopped"}));
  json vms = AdminJson(s.vault, {"vm", "list"})["vms"];
  CHECK(vms[0]["protection"] == "stopped");

  // Protect again: retention applies again (keep 1 daily: RP1 goes, the newest stays).
  AdminJson(s.vault, {"protect", s.name, "--policy", "one-day"});
  CHECK(CleanupNow(s.vault)["removed"] == json::array({rp1}));
  CHECK(s.Points() == std::vector<std::string>{rp2});

  // Delete data: soft-deleted, not billable, kept past its expiry.
  LetBlocksAge();
  const int64_t deleted_at = t0 + 30 * kDay + 3600000;  // before the 23:59 slot
  SetClock(s.vault, deleted_at);
  json del = AdminJson(s.vault, {"unprotect", s.name, "--delete-data"});
  CHECK(del["purge_after_ms"] == deleted_at + 14 * kDay);
  json storage = AdminJson(s.vault, {"storage", s.name});
  CHECK(storage["items"][0]["soft_deleted"] == true);
  CHECK(storage["items"][0]["billable_bytes"] == 0);
  CHECK(storage["items"][0]["stored_bytes"] == 2 * kBlock);
  CHECK(Admin(s.vault, {"backup", s.name}).exit_code != 0);  // undelete first
  SetClock(s.vault, deleted_at + 13 * kDay);
  CHECK(CleanupNow(s.vault)["purged_items"].empty());
  CHECK(s.Points() == std::vector<std::string>{rp2});

  // Undelete within the window brings everything back.
  json undel = AdminJson(s.vault, {"undelete", s.name});
  CHECK(undel["recovery_points"] == 1);
  CHECK(AdminJson(s.vault, {"storage", s.name})["items"][0]["billable_bytes"] == 2 * kBlock);
  s.CheckRestores();
  CHECK(Admin(s.vault, {"undelete", s.name}).exit_code != 0);  // not deleted any more

  // Delete again and let the window pass: purged, blocks freed.
  const int64_t deleted_again = deleted_at + 13 * kDay + 3600000;
  SetClock(s.vault, deleted_again);
  AdminJson(s.vault, {"unprotect", s.name, "--delete-data"});
  SetClock(s.vault, deleted_again + 14 * kDay + 1);
  json report = CleanupNow(s.vault);
  // The scheduled cleanup of SetClock may already have purged it; either way it is gone.
  CHECK(s.Points().empty());
  json after = AdminJson(s.vault, {"storage"});
  CHECK(after["vault"]["stored_bytes"] == 0);
  CHECK(AdminJson(s.vault, {"vm", "list"})["vms"][0]["protection"] == "unprotected");
  CHECK(Admin(s.vault, {"undelete", s.name}).exit_code != 0);
  (void)report;
}

TEST_CASE("verify finds a corrupted and a missing block") {
  SeedVm s(kJan31);
  WriteRandomBlocks(s.disk, kBlock, {0, 1, 3}, 21);
  std::string rp1 = s.Backup(kJan31 + 1000);
  WriteRandomBlocks(s.disk, kBlock, {2}, 22);
  std::string rp2 = s.Backup(kJan31 + 2000);
  json ok = AdminJson(s.vault, {"verify", s.name});
  CHECK(ok["ok"] == true);
  CHECK(ok["blocks_checked"] == 4);

  // Flip one byte of block 1's file (a block RP1 and RP2 both need).
  std::string data = ReadWhole(s.kept[rp1]);
  std::string_view block1(data.data() + kBlock, kBlock);
  BlockId id = Sha256Block(std::as_bytes(std::span(block1.data(), block1.size())));
  std::string hex = id.Hex();
  CorruptStoredBlock(s.vault.data() + "/blocks", id, 100, "\x5a\xa5");
  auto bad = Admin(s.vault, {"verify", s.name});
  CHECK(bad.exit_code != 0);
  json report = bad.json();
  CHECK(report["ok"] == false);
  CHECK(report["corrupt"] == 2);  // referenced by both points
  CHECK(report["points"][0]["corrupt"] == json::array({hex}));
  // One point only.
  auto one = Admin(s.vault, {"verify", s.name, "--rp", rp2});
  CHECK(one.exit_code != 0);
  CHECK(one.json()["points"].size() == 1);

  // A missing block is reported as missing.
  std::string data2 = ReadWhole(s.kept[rp2]);
  BlockId id2 = Sha256Block(std::as_bytes(std::span(data2.data() + 2 * kBlock, kBlock)));
  REQUIRE(s.vault.Stop() == 0);
  LoseStoredBlock(s.vault.data() + "/blocks", id2);
  s.vault.Start();
  SetClock(s.vault, kJan31 + 3000);
  json r2 = Admin(s.vault, {"verify", s.name, "--rp", rp2}).json();
  CHECK(r2["points"][0]["missing"] == json::array({id2.Hex()}));
  // Bad input: unknown point.
  auto unknown = Admin(s.vault, {"verify", s.name, "--rp", "20300101T000000000Z-0000"});
  CHECK(unknown.exit_code != 0);
  CHECK(unknown.err.find("does not exist") != std::string::npos);
}

TEST_CASE("scheduled verify runs on the vault's clock and records the damage it finds") {
  // The vault's clock starts at the real time; the test keeps it there until it moves it a day,
  // so the verifier's first look (which starts the interval) cannot see a jump.
  const int64_t t0 = std::chrono::duration_cast<std::chrono::milliseconds>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count();
  SeedVm s(t0, {"--verify-interval", "86400"});
  WriteRandomBlocks(s.disk, kBlock, {0, 2}, 31);
  std::string rp1 = s.Backup(t0 + 1000);
  auto history = [&] { return AdminJson(s.vault, {"verify-history", s.name})["verifications"]; };
  auto scheduled_runs = [&] {
    int n = 0;
    for (const auto& v : history()) n += v["trigger"] == "scheduled";
    return n;
  };
  CHECK(scheduled_runs() == 0);  // a new vault does not read everything at start-up

  // Damage one block file, then let a day pass on the vault's clock.
  std::string data = ReadWhole(s.kept[rp1]);
  BlockId id = Sha256Block(std::as_bytes(std::span(data.data() + 2 * kBlock, kBlock)));
  CorruptStoredBlock(s.vault.data() + "/blocks", id, 200, "XYZ");
  SetClock(s.vault, t0 + kDay + 2000);
  for (int i = 0; i < 100 && scheduled_runs() == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  json runs = history();
  REQUIRE(runs.size() == 1);
  CHECK(runs[0]["trigger"] == "scheduled");
  CHECK(runs[0]["vm"] == s.name);
  CHECK(runs[0]["ok"] == false);
  CHECK(runs[0]["corrupt"] == 1);
  CHECK(runs[0]["missing"] == 0);
  CHECK(runs[0]["blocks_checked"] == 2);
  CHECK(AdminJson(s.vault, {"dashboard"})["verify_runs_damaged_7d"] == 1);

  // Half a day later: not due again. An on-demand verify is recorded as such.
  SetClock(s.vault, t0 + kDay + kDay / 2);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  CHECK(scheduled_runs() == 1);
  CHECK(Admin(s.vault, {"verify", s.name}).exit_code != 0);
  runs = history();
  REQUIRE(runs.size() == 2);
  CHECK(runs[0]["trigger"] == "on-demand");
  CHECK(runs[0]["corrupt"] == 1);
  // The table form names the damage.
  auto table = Run(
      {VMSNAP_ADMIN_BINARY, "verify-history", "--vault-config", s.vault.data() + "/vault.json"});
  CHECK(table.exit_code == 0);
  CHECK(table.out.find("DAMAGED") != std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// In-process tests: Catalog + BlockStore + Lifecycle with an injected clock.

namespace {

using vault::BlockStore;
using vault::Catalog;
using vault::ItemRules;
using vault::ItemState;
using vault::Lifecycle;
using vault::LifecycleInputs;

using Image = std::vector<std::string>;  // per block: content, empty = zero

struct Lib {
  TempDir tmp;
  // Small packs, so that cleanups exercise pack rewriting and deletion.
  BlockStore store{tmp / "blocks", kSmallPack};
  int64_t now = kJan31;
  Catalog catalog{tmp.path(), &store, [this] { return now; }};
  // Real clock ahead by a minute: every block not protected by an open session is "old" (and
  // an agent that promised keepalives more often than every 12 s is gone).
  int64_t real_ahead_ms = 60000;
  Lifecycle lifecycle{&catalog, &store, [this] {
                        return std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count() +
                               real_ahead_ms;
                      }};
  std::map<std::string, Image> kept;  // rp id -> image

  Lib() {
    REQUIRE(store.Open().ok());
    REQUIRE(catalog.Open().ok());
  }

  static BlockId IdOf(const std::string& content) {
    return Sha256Block(std::as_bytes(std::span(content.data(), content.size())));
  }

  void PutBlock(const std::string& content) {
    BlockId id = IdOf(content);
    auto enc = EncodeBlock(id, std::as_bytes(std::span(content.data(), content.size())));
    REQUIRE(store.Put({enc}).ok());
  }

  // Uploads what changed since the item's latest point and commits; returns the rp id.
  std::string Backup(const std::string& item, const Image& image, json origin = json::object()) {
    auto session = catalog.CreateSession(item);
    REQUIRE(session.ok());
    Manifest m;
    m.disk_size = image.size() * kBlock;
    m.block_size = kBlock;
    Image base(image.size());
    if (auto latest = catalog.Latest(item); latest.ok()) {
      m.parent = latest->id;
      base = kept.at(latest->id);
    }
    for (uint64_t i = 0; i < image.size(); ++i) {
      if (!m.parent.empty() && image[i] == base[i]) continue;
      if (image[i].empty()) {
        if (!m.parent.empty()) m.entries.push_back({i, std::nullopt});
        continue;
      }
      if (!store.HasForUpload(IdOf(image[i]))) PutBlock(image[i]);
      m.entries.push_back({i, IdOf(image[i])});
    }
    REQUIRE(catalog.PutManifest(*session, 0, EncodeManifest(m)).ok());
    json body{{"consistency", "crash"},
              {"disks", json::array({{{"index", 0}, {"key", "/dev/" + item}}})},
              {"origin", origin}};
    auto rp = catalog.Commit(*session, body);
    INFO(rp.status().ToString());
    REQUIRE(rp.ok());
    kept[rp->id] = image;
    return rp->id;
  }

  // Every remaining point restores its image; the store holds exactly their blocks.
  void CheckAll() {
    std::set<std::string> needed_hex;
    for (const auto& rp : catalog.List("")) {
      REQUIRE(kept.count(rp.id));
      const Image& want = kept[rp.id];
      auto m = catalog.ResolvedManifest(rp.id, 0);
      INFO(rp.id << ": " << m.status().ToString());
      REQUIRE(m.ok());
      Image got(want.size());
      std::vector<std::byte> plain;
      for (const auto& e : m->entries) {
        auto b = store.Get(*e.id);
        REQUIRE(b.ok());
        REQUIRE(DecodeBlock(*b, plain).ok());
        got[e.index].assign(reinterpret_cast<const char*>(plain.data()), plain.size());
        needed_hex.insert(e.id->Hex());
      }
      CHECK(got == want);
    }
    std::set<std::string> stored_hex;
    uint64_t stored_bytes = 0, needed_bytes = 0;
    store.ForEach([&](const BlockId& id, uint64_t bytes, int64_t) {
      stored_hex.insert(id.Hex());
      stored_bytes += bytes;
    });
    for (const auto& hex : needed_hex) needed_bytes += store.StoredBytes(*BlockId::FromHex(hex));
    CHECK(stored_hex == needed_hex);
    CHECK(stored_bytes == needed_bytes);
  }
};

std::string RandomBlock(std::mt19937_64& rng) {
  std::string s(kBlock, '\0');
  for (size_t i = 0; i < s.size(); i += 8) {
    uint64_t v = rng();
    std::memcpy(s.data() + i, &v, 8);
  }
  return s;
}

// Every block's last touch an hour earlier (as if written by an older backup). Only rows in
// the index: call BlockStore::SyncIndex first (as the older backup's commit did).
void Backdate(const std::string& blocks_dir) {
  REQUIRE(BlockIndex(blocks_dir)->Exec("UPDATE blocks SET touched_ms = touched_ms - 3600000").ok());
}

}  // namespace

TEST_CASE("verify in batches: each block read once, damage reported per point in map order") {
  Lib lib;
  // Three blocks per batch: the 20 blocks below span several batches and several packs.
  lib.lifecycle.set_verify_batch_bytes(3 * kBlock);
  std::mt19937_64 rng(61);
  Image image(20);
  for (auto& b : image) b = RandomBlock(rng);
  image[9] = image[4];  // the same block at two indexes: read once, reported at both
  const std::string first = lib.Backup("vm", image);
  Image next = image;
  const std::string overwritten = image[12];
  next[12] = RandomBlock(rng);
  next[15].clear();  // a zero block in the later point
  const std::string second = lib.Backup("vm", next);

  auto all = lib.lifecycle.Verify("vm", "");
  REQUIRE(all.ok());
  CHECK((*all)["ok"] == true);
  CHECK((*all)["blocks_checked"] == 20);  // 19 unique in the first point, one new in the second
  CHECK((*all)["points"][0]["blocks"] == 20);
  CHECK((*all)["points"][1]["blocks"] == 19);

  // Damage: the block only the first point needs, a block both need (twice in each map), and
  // a missing block in the middle of a batch.
  const std::string blocks_dir = lib.tmp / "blocks";
  CorruptStoredBlock(blocks_dir, Lib::IdOf(overwritten), 10, "\x01\x02");
  CorruptStoredBlock(blocks_dir, Lib::IdOf(image[4]), 5000, "\xff");
  LoseStoredBlock(blocks_dir, Lib::IdOf(image[7]));
  const std::string h4 = Lib::IdOf(image[4]).Hex(), h7 = Lib::IdOf(image[7]).Hex(),
                    h12 = Lib::IdOf(overwritten).Hex();
  auto bad = lib.lifecycle.Verify("vm", "");
  REQUIRE(bad.ok());
  const json& r = *bad;
  CHECK(r["ok"] == false);
  CHECK(r["blocks_checked"] == 20);
  CHECK(r["points"][0]["corrupt"] == json::array({h4, h4, h12}));  // in index order: 4, 9, 12
  CHECK(r["points"][0]["missing"] == json::array({h7}));
  CHECK(r["points"][1]["corrupt"] == json::array({h4, h4}));  // 12 was overwritten
  CHECK(r["points"][1]["missing"] == json::array({h7}));
  CHECK(r["corrupt"] == 5);
  CHECK(r["missing"] == 2);

  // One point: only what its map needs. The second point does not need block 12's old content.
  auto one = lib.lifecycle.Verify("vm", second);
  REQUIRE(one.ok());
  CHECK((*one)["points"].size() == 1);
  CHECK((*one)["points"][0]["corrupt"] == json::array({h4, h4}));
  CHECK((*one)["blocks_checked"] == 18);  // 19 entries, one block twice

  // Batches as large as the whole map find the same damage.
  lib.lifecycle.set_verify_batch_bytes(Lifecycle::kVerifyBatchBytes);
  auto big = lib.lifecycle.Verify("vm", "");
  REQUIRE(big.ok());
  CHECK((*big)["points"] == r["points"]);
}

TEST_CASE("expiry rules: periods, several rules, the longest wins, the newest is kept") {
  using vault::ComputeExpiry;
  using vault::Period;
  using vault::PeriodStart;
  // 2030-01-31 is a Thursday; its ISO week starts Monday 2030-01-28.
  CHECK(PeriodStart(Period::kDay, kJan31 + 5000, 1) == kJan31 + kDay);
  CHECK(PeriodStart(Period::kWeek, kJan31 + 5000, 0) == kJan31 - 3 * kDay);
  CHECK(PeriodStart(Period::kMonth, kJan31 + 5000, 1) == kJan31 + kDay);  // Feb 1
  CHECK(PeriodStart(Period::kMonth, kJan31, 12) == kJan31 + kDay + 365LL * kDay - 31 * kDay);
  CHECK(PeriodStart(Period::kYear, kJan31, 1) == kJan31 + 335LL * kDay);  // 2031-01-01
  vault::Retention r;
  r.daily = 2;
  r.weekly = 1;
  r.monthly = 0;
  r.yearly = 0;
  std::vector<vault::PointTimes> pts{{"a", kJan31 + 1000, std::nullopt},
                                     {"b", kJan31 + 2000, std::nullopt},
                                     {"c", kJan31 + kDay, 5 * kDay + kJan31},
                                     {"d", kJan31 + 2 * kDay, std::nullopt}};
  auto e = ComputeExpiry(pts, r);
  CHECK(e[0].expires_ms == kJan31 + 1000);  // not the newest of any period: expired at once
  CHECK(e[0].kept_by.empty());
  CHECK(e[1].expires_ms == kJan31 + 2 * kDay);  // daily point of Jan 31
  CHECK(e[1].kept_by == std::vector<std::string>{"daily"});
  CHECK(e[2].expires_ms == 5 * kDay + kJan31);  // on demand: its own retention
  CHECK(e[3].expires_ms == vault::kNeverExpires);
  CHECK(e[3].kept_by == std::vector<std::string>{"daily", "weekly", "newest"});
  auto none = ComputeExpiry(pts, std::nullopt);
  CHECK(none[0].expires_ms == vault::kNeverExpires);
  CHECK(none[2].expires_ms == 5 * kDay + kJan31);
}

TEST_CASE("cleanup racing an upload never loses a block") {
  Lib lib;
  std::mt19937_64 rng(7);
  std::string b0 = RandomBlock(rng), b1 = RandomBlock(rng), b1x = RandomBlock(rng),
              b2 = RandomBlock(rng), fresh = RandomBlock(rng);
  // Item A: RP1 {b0, b1, b2}, then RP2 replaces b1 and b2 -> b1 and b2 live only in RP1.
  std::string a1 = lib.Backup("a", {b0, b1, b2, ""});
  lib.now += kDay;
  std::string a2 = lib.Backup("a", {b0, b1x, "", ""});
  Backdate(lib.tmp / "blocks");

  // Item B's backup is running: it opened a session, asked which blocks the vault is missing
  // (b1 is present: it will not upload it) and uploaded a new block.
  lib.now += kDay;
  auto session = lib.catalog.CreateSession("b");
  REQUIRE(session.ok());
  CHECK(lib.store.HasForUpload(Lib::IdOf(b1)));
  CHECK(!lib.store.HasForUpload(Lib::IdOf(fresh)));
  lib.PutBlock(fresh);

  // Cleanup now: A keeps one daily point, so RP1 expires and b1, b2 are unreferenced.
  LifecycleInputs in;
  ItemRules rules;
  rules.state = ItemState::kProtected;
  rules.retention = vault::Retention{1, 0, 0, 0};
  in.items["a"] = rules;
  auto report = lib.lifecycle.Cleanup(lib.now, in);
  REQUIRE(report.ok());
  CHECK(report->removed == std::vector<std::string>{a1});
  CHECK(!lib.store.Has(Lib::IdOf(b2)));  // untouched: freed
  CHECK(lib.store.Has(Lib::IdOf(b1)));   // the running backup relies on it
  CHECK(lib.store.Has(Lib::IdOf(fresh)));
  CHECK(report->blocks_freed == 1);

  // B commits: it succeeds and restores exactly.
  Manifest m;
  m.disk_size = 4 * kBlock;
  m.block_size = kBlock;
  m.entries = {{0, Lib::IdOf(b1)}, {2, Lib::IdOf(fresh)}};
  REQUIRE(lib.catalog.PutManifest(*session, 0, EncodeManifest(m)).ok());
  auto rp = lib.catalog.Commit(*session, {{"consistency", "crash"},
                                          {"disks", json::array({{{"index", 0}, {"key", "/b"}}})}});
  REQUIRE(rp.ok());
  lib.kept[rp->id] = {b1, "", fresh, ""};
  lib.kept.erase(a1);
  (void)a2;
  // After commit and once the session is old, the store holds exactly what points need.
  lib.now += 2 * kDay;
  REQUIRE(lib.lifecycle.Cleanup(lib.now, in).ok());
  lib.CheckAll();
}

TEST_CASE(
    "an agent that stopped sending keepalives holds cleanup back no more; one that sends them "
    "does, and each keepalive counts") {
  Lib lib;
  std::mt19937_64 rng(13);
  std::string b0 = RandomBlock(rng), b1 = RandomBlock(rng), orphan = RandomBlock(rng),
              fresh = RandomBlock(rng);
  // Item A: RP1 {b0, b1}, then RP2 {b0}: b1 lives only in RP1, which one daily point expires.
  std::string a1 = lib.Backup("a", {b0, b1, "", ""});
  lib.now += kDay;
  lib.Backup("a", {b0, "", "", ""});
  Backdate(lib.tmp / "blocks");
  lib.now += kDay;
  LifecycleInputs in;
  ItemRules rules;
  rules.state = ItemState::kProtected;
  rules.retention = vault::Retention{1, 0, 0, 0};
  in.items["a"] = rules;
  const json commit_body{{"consistency", "crash"},
                         {"disks", json::array({{{"index", 0}, {"key", "/b"}}})}};

  // A's next backup was killed after uploading a block: its agent promised a keepalive every
  // second and sent none for the minute the lifecycle's clock runs ahead.
  auto gone = lib.catalog.CreateSession("a", 1000);
  REQUIRE(gone.ok());
  lib.PutBlock(orphan);
  auto report = lib.lifecycle.Cleanup(lib.now, in);
  REQUIRE(report.ok());
  CHECK(report->removed == std::vector<std::string>{a1});  // A's expiry is not held
  CHECK(report->sessions_deleted == 3);  // and A's two committed ones, a day old or more
  CHECK_FALSE(lib.store.Has(Lib::IdOf(b1)));
  CHECK_FALSE(lib.store.Has(Lib::IdOf(orphan)));  // nor is the collection's cutoff
  CHECK(lib.catalog.KeepSessionAlive(*gone).code() == Code::kNotFound);
  Manifest m;
  m.disk_size = 4 * kBlock;
  m.block_size = kBlock;
  m.entries = {{0, Lib::IdOf(b0)}};
  CHECK(lib.catalog.PutManifest(*gone, 0, EncodeManifest(m)).code() == Code::kNotFound);

  // B's agent promised one every minute: within 5 minutes of its last sign of life its session
  // holds what it uploaded, and it commits.
  auto live = lib.catalog.CreateSession("b", 60000);
  REQUIRE(live.ok());
  lib.PutBlock(fresh);
  REQUIRE(lib.catalog.KeepSessionAlive(*live).ok());
  report = lib.lifecycle.Cleanup(lib.now, in);
  REQUIRE(report.ok());
  CHECK(report->sessions_deleted == 0);
  CHECK(lib.store.Has(Lib::IdOf(fresh)));
  m.entries = {{1, Lib::IdOf(fresh)}};
  REQUIRE(lib.catalog.PutManifest(*live, 0, EncodeManifest(m)).ok());
  REQUIRE(lib.catalog.Commit(*live, commit_body).ok());

  // Each keepalive counts: two sessions promise one every 2 s (gone after 10 s without); one
  // of them sends one 3 s later. With the clock 9 s ahead the other is past 12 s and dropped,
  // while 9 s have passed since the keepalive.
  auto quiet = lib.catalog.CreateSession("c", 2000);
  auto talking = lib.catalog.CreateSession("d", 2000);
  REQUIRE(quiet.ok());
  REQUIRE(talking.ok());
  std::this_thread::sleep_for(std::chrono::seconds(3));
  REQUIRE(lib.catalog.KeepSessionAlive(*talking).ok());
  lib.real_ahead_ms = 9000;
  report = lib.lifecycle.Cleanup(lib.now, in);
  REQUIRE(report.ok());
  CHECK(report->sessions_deleted == 1);
  CHECK(lib.catalog.KeepSessionAlive(*quiet).code() == Code::kNotFound);
  CHECK(lib.catalog.KeepSessionAlive(*talking).ok());
}

TEST_CASE("a manifest in parts: in order, resent parts replace, the seal checks size and content") {
  Lib lib;
  std::mt19937_64 rng(11);
  std::vector<std::string> blocks;
  Manifest m;
  m.block_size = kBlock;
  m.disk_size = 64 * kBlock;
  for (uint64_t i = 0; i < 64; i += 2) {
    blocks.push_back(RandomBlock(rng));
    lib.PutBlock(blocks.back());
    m.entries.push_back({i, Lib::IdOf(blocks.back())});
  }
  const std::string enc = EncodeManifest(m);
  REQUIRE(enc.size() > 1000);
  auto session = lib.catalog.CreateSession("parts");
  REQUIRE(session.ok());
  auto& c = lib.catalog;
  // A part beyond what arrived is a conflict that names where to resume.
  Status gap = c.PutManifestPart(*session, 0, 500, enc.substr(500, 500));
  CHECK(gap.code() == Code::kConflict);
  CHECK(gap.fix().find("from offset 0") != std::string::npos);
  REQUIRE(c.PutManifestPart(*session, 0, 0, enc.substr(0, 500)).ok());
  REQUIRE(c.PutManifestPart(*session, 0, 500, "garbage that a resend replaces").ok());
  REQUIRE(c.PutManifestPart(*session, 0, 500, enc.substr(500, 500)).ok());
  // Sealed too early: the size does not match, nothing is published.
  Status early = c.SealManifest(*session, 0, enc.size());
  CHECK(early.code() == Code::kConflict);
  CHECK(early.fix().find("from offset 1000") != std::string::npos);
  REQUIRE(c.PutManifestPart(*session, 0, 1000, enc.substr(1000)).ok());
  REQUIRE(c.SealManifest(*session, 0, enc.size()).ok());
  CHECK(c.SealManifest(*session, 0, enc.size()).ok());  // a repeated seal (lost answer)
  auto rp = c.Commit(*session, {{"consistency", "crash"},
                                {"disks", json::array({{{"index", 0}, {"key", "/p"}}})}});
  REQUIRE(rp.ok());
  auto back = c.LoadManifest(rp->id, 0);
  REQUIRE(back.ok());
  CHECK(*back == m);

  // Damaged content is refused at the seal and its parts are dropped.
  auto s2 = c.CreateSession("parts");
  REQUIRE(s2.ok());
  std::string bad = enc;
  bad[100] ^= 1;
  REQUIRE(c.PutManifestPart(*s2, 1, 0, bad).ok());
  CHECK(c.SealManifest(*s2, 1, bad.size()).code() == Code::kCorruption);
  CHECK(c.SealManifest(*s2, 1, bad.size()).code() == Code::kConflict);  // no parts left
  CHECK(c.PutManifestPart("0123456789abcdef0123456789abcdef", 0, 0, "x").code() == Code::kNotFound);
  CHECK(c.PutManifestPart(*s2, 0, Catalog::kMaxManifestBytes, "x").code() ==
        Code::kInvalidArgument);
}

TEST_CASE("the resolved map in pages: every entry once, in order, from any index") {
  Lib lib;
  std::mt19937_64 rng(12);
  Image image;
  for (int i = 0; i < 10; ++i) image.push_back(i % 3 == 2 ? "" : RandomBlock(rng));
  std::string first = lib.Backup("m", image);
  image[2] = RandomBlock(rng);
  image[4] = "";
  std::string second = lib.Backup("m", image);
  auto whole = lib.catalog.ResolvedManifest(second, 0);
  REQUIRE(whole.ok());
  REQUIRE(whole->entries.size() == 7);
  for (uint64_t limit : {1u, 2u, 3u, 7u, 100u}) {
    CAPTURE(limit);
    std::vector<ManifestEntry> seen;
    for (uint64_t from = 0;;) {
      auto page = lib.catalog.ResolvedManifestPage(second, 0, from, limit);
      REQUIRE(page.ok());
      CHECK(page->disk_size == whole->disk_size);
      CHECK(page->entries.size() <= limit);
      seen.insert(seen.end(), page->entries.begin(), page->entries.end());
      if (page->entries.size() < limit) break;
      from = page->entries.back().index + 1;
    }
    CHECK(seen == whole->entries);
  }
  // From the middle of a gap: the next entry with a larger index comes first.
  auto mid = lib.catalog.ResolvedManifestPage(second, 0, 5, 2);
  REQUIRE(mid.ok());
  REQUIRE(mid->entries.size() == 2);
  CHECK(mid->entries[0].index == 6);
  // Paging one point and then another gives each its own map.
  auto other = lib.catalog.ResolvedManifestPage(first, 0, 0, 100);
  REQUIRE(other.ok());
  CHECK(other->entries.size() == 7);
  CHECK(other->entries[2].index == 3);
  CHECK(lib.catalog.ResolvedManifestPage("no-such-point", 0, 0, 1).status().code() ==
        Code::kNotFound);
}

TEST_CASE("the resolved map merged from a long chain: each point's image, in any page size") {
  Lib lib;
  std::mt19937_64 rng(13);
  Image image(200);
  for (auto& b : image)
    if (rng() % 2) b = RandomBlock(rng);
  std::vector<std::string> points{lib.Backup("c", image)};
  for (int k = 0; k < 7; ++k) {  // changes, blocks zeroed and blocks written again
    for (int n = 0; n < 30; ++n) {
      auto& b = image[rng() % image.size()];
      b = rng() % 3 == 0 ? "" : RandomBlock(rng);
    }
    points.push_back(lib.Backup("c", image));
  }
  auto expected = [&](const std::string& rp) {
    std::vector<ManifestEntry> want;
    const Image& at = lib.kept.at(rp);
    for (uint64_t i = 0; i < at.size(); ++i)
      if (!at[i].empty()) want.push_back({i, Lib::IdOf(at[i])});
    return want;
  };
  for (const auto& rp : points) {
    CAPTURE(rp);
    auto whole = lib.catalog.ResolvedManifest(rp, 0);
    REQUIRE(whole.ok());
    CHECK(whole->parent.empty());
    CHECK(whole->disk_size == 200 * kBlock);
    CHECK(whole->entries == expected(rp));
  }
  // Pages of the newest point, then a page from before where the cursor stands (reopened),
  // and a page past the end (empty).
  const std::string last = points.back();
  for (uint64_t limit : {1u, 5u, 64u}) {
    CAPTURE(limit);
    std::vector<ManifestEntry> seen;
    for (uint64_t from = 0;;) {
      auto page = lib.catalog.ResolvedManifestPage(last, 0, from, limit);
      REQUIRE(page.ok());
      seen.insert(seen.end(), page->entries.begin(), page->entries.end());
      if (page->entries.size() < limit) break;
      from = page->entries.back().index + 1;
    }
    CHECK(seen == expected(last));
  }
  const auto want = expected(last);
  auto again = lib.catalog.ResolvedManifestPage(last, 0, 0, 3);
  REQUIRE(again.ok());
  CHECK(again->entries == std::vector<ManifestEntry>(want.begin(), want.begin() + 3));
  auto back = lib.catalog.ResolvedManifestPage(last, 0, 1, 2);  // behind the cursor
  REQUIRE(back.ok());
  std::vector<ManifestEntry> from_one;
  for (const auto& e : want)
    if (e.index >= 1 && from_one.size() < 2) from_one.push_back(e);
  CHECK(back->entries == from_one);
  auto past = lib.catalog.ResolvedManifestPage(last, 0, 200, 10);
  REQUIRE(past.ok());
  CHECK(past->entries.empty());
  // Six maps paged in turn, more than the vault keeps cursors for: each still comes whole.
  std::vector<std::vector<ManifestEntry>> seen(6);
  std::vector<uint64_t> next(6, 0);
  for (bool more = true; more;) {
    more = false;
    for (size_t k = 0; k < 6; ++k) {
      if (next[k] == UINT64_MAX) continue;
      auto page = lib.catalog.ResolvedManifestPage(points[k + 2], 0, next[k], 4);
      REQUIRE(page.ok());
      seen[k].insert(seen[k].end(), page->entries.begin(), page->entries.end());
      next[k] = page->entries.size() < 4 ? UINT64_MAX : page->entries.back().index + 1;
      more = more || next[k] != UINT64_MAX;
    }
  }
  for (size_t k = 0; k < 6; ++k) CHECK(seen[k] == expected(points[k + 2]));
  // Removing points merges them into their children: the maps stay the same.
  for (size_t i = 1; i + 1 < points.size(); i += 2)
    REQUIRE(lib.catalog.RemovePoint(points[i]).ok());
  auto merged = lib.catalog.ResolvedManifest(last, 0);
  REQUIRE(merged.ok());
  CHECK(merged->entries == want);
}

TEST_CASE("a commit that fails leaves no half point: missing blocks, a damaged manifest") {
  Lib lib;
  std::mt19937_64 rng(14);
  const std::string stored = RandomBlock(rng), absent = RandomBlock(rng);
  lib.PutBlock(stored);
  Manifest m{4 * kBlock, kBlock, "", {{0, Lib::IdOf(stored)}, {2, Lib::IdOf(absent)}}};
  auto session = lib.catalog.CreateSession("f");
  REQUIRE(session.ok());
  REQUIRE(lib.catalog.PutManifest(*session, 0, EncodeManifest(m)).ok());
  const json body{{"consistency", "crash"},
                  {"disks", json::array({{{"index", 0}, {"key", "/dev/f"}}})}};
  auto leftovers = [&] {
    size_t n = 0;
    for (auto it = std::filesystem::directory_iterator(lib.tmp / "rps");
         it != std::filesystem::directory_iterator(); ++it)
      ++n;
    return n;
  };
  auto missing = lib.catalog.Commit(*session, body);
  CHECK(missing.status().code() == Code::kConflict);
  CHECK(missing.status().cause().find("1 blocks referenced") != std::string::npos);
  CHECK(missing.status().cause().find("(first: " + Lib::IdOf(absent).Hex() + ")") !=
        std::string::npos);
  CHECK(leftovers() == 0);
  // The staged manifest damaged on the vault's disk after it was accepted.
  m.entries.pop_back();
  REQUIRE(lib.catalog.PutManifest(*session, 0, EncodeManifest(m)).ok());
  const std::string staged = lib.tmp / ("staging/" + *session + "/disk-0.manifest");
  {
    std::fstream f(staged, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(60);
    f.put('\x5a');
  }
  CHECK(lib.catalog.Commit(*session, body).status().code() == Code::kCorruption);
  CHECK(leftovers() == 0);
  CHECK(lib.catalog.List("f").empty());
  // Sent again, it commits.
  REQUIRE(lib.catalog.PutManifest(*session, 0, EncodeManifest(m)).ok());
  auto rp = lib.catalog.Commit(*session, body);
  REQUIRE(rp.ok());
  CHECK(rp->disks[0].manifest_entries == 1);
  CHECK(leftovers() == 1);
}

TEST_CASE("a point is not expired while its item has an open session or a job") {
  Lib lib;
  std::mt19937_64 rng(9);
  std::string a1 = lib.Backup("a", {RandomBlock(rng), ""});
  lib.now += kDay;
  lib.Backup("a", {RandomBlock(rng), ""});
  lib.now += kDay;
  LifecycleInputs in;
  in.items["a"].state = ItemState::kProtected;
  in.items["a"].retention = vault::Retention{1, 0, 0, 0};
  in.items["a"].busy = true;
  CHECK(lib.lifecycle.Cleanup(lib.now, in)->removed.empty());
  in.items["a"].busy = false;
  auto session = lib.catalog.CreateSession("a");
  REQUIRE(session.ok());
  CHECK(lib.lifecycle.Cleanup(lib.now, in)->removed.empty());
  // The session is abandoned after 24 h (vault clock): deleted, and expiry proceeds.
  lib.now += kDay + 1;
  auto r = lib.lifecycle.Cleanup(lib.now, in);
  REQUIRE(r.ok());
  CHECK(r->removed == std::vector<std::string>{a1});
  CHECK(r->sessions_deleted >= 1);
  lib.kept.erase(a1);
  lib.CheckAll();
}

TEST_CASE("long seeded random run: 60 days of backups, retention and daily cleanup") {
  Lib lib;
  std::mt19937_64 rng(20300131);
  constexpr int kBlocks = 8;
  Image image(kBlocks);
  std::vector<std::string> history;  // contents seen (for dedup by reuse)
  LifecycleInputs in;
  in.items["vm"].state = ItemState::kProtected;
  in.items["vm"].retention = vault::Retention{7, 4, 2, 0};
  // A second VM with no policy shares some blocks (dedup across VMs) and keeps everything.
  Image other(kBlocks);
  uint64_t removed_total = 0;
  for (int day = 0; day < 60; ++day) {
    lib.now = kJan31 + day * kDay + 22 * 3600000;
    int changes = 1 + static_cast<int>(rng() % 3);
    for (int c = 0; c < changes; ++c) {
      size_t idx = rng() % kBlocks;
      int kind = static_cast<int>(rng() % 10);
      if (kind == 0)
        image[idx].clear();  // zeroed
      else if (kind == 1 && !history.empty())
        image[idx] = history[rng() % history.size()];  // old content again
      else
        image[idx] = RandomBlock(rng);
      if (!image[idx].empty()) history.push_back(image[idx]);
    }
    lib.Backup("vm", image);
    if (rng() % 5 == 0) {  // an on-demand point a few hours later, kept 1-20 days
      lib.now += 3600000;
      image[rng() % kBlocks] = RandomBlock(rng);
      int64_t until = lib.now + static_cast<int64_t>(1 + rng() % 20) * kDay;
      lib.Backup("vm", image, {{"trigger", "on-demand"}, {"retain_until_ms", until}});
    }
    if (day % 10 == 0) {
      other[rng() % kBlocks] = image[rng() % kBlocks];
      lib.Backup("other", other);
    }
    auto report = lib.lifecycle.Cleanup(lib.now + 3600000, in);
    REQUIRE(report.ok());
    removed_total += report->removed.size();
    for (const auto& id : report->removed) lib.kept.erase(id);
    if (day % 15 == 14) lib.CheckAll();
  }
  lib.CheckAll();
  // Retention bounds what is left: at most 7 daily + 4 weekly + 2 monthly + the newest, plus
  // on-demand points still inside their retention (at most 20 days of them).
  auto left = lib.catalog.List("vm");
  CHECK(removed_total > 0);
  size_t policy_points = 0;
  for (const auto& rp : left)
    if (!rp.origin.contains("retain_until_ms")) policy_points++;
  CHECK(policy_points <= 14);
  CHECK(policy_points >= 7);
  CHECK(lib.catalog.List("other").size() == 6);
  json storage = lib.lifecycle.Storage("", in);
  CHECK(storage["vault"]["referenced_bytes"] == storage["vault"]["stored_bytes"]);
  // Compaction keeps every closed pack at least half live: the disk holds at most twice the
  // live records plus the active pack.
  auto usage = lib.store.Usage();
  CHECK(usage.live_bytes > 0);
  CHECK(usage.pack_bytes <= 2 * usage.live_bytes + kSmallPack);
  CHECK(storage["vault"]["sum_of_items_bytes"].get<uint64_t>() -
            storage["vault"]["dedup_saved_bytes"].get<uint64_t>() ==
        storage["vault"]["stored_bytes"].get<uint64_t>());
}

// ---------------------------------------------------------------------------------------------
// The block store's pack files and index.

namespace {

EncodedBlock Encoded(const std::string& content) {
  return EncodeBlock(Lib::IdOf(content), std::as_bytes(std::span(content.data(), content.size())));
}

std::string Plain(const EncodedBlock& b) {
  std::vector<std::byte> out;
  REQUIRE(DecodeBlock(b, out).ok());
  return std::string(reinterpret_cast<const char*>(out.data()), out.size());
}

std::vector<std::string> PackFiles(const std::filesystem::path& blocks) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(blocks / "packs"))
    names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

TEST_CASE("block store: many blocks per pack, durable across reopen, index rebuilt from packs") {
  TempDir tmp;
  const std::filesystem::path blocks = tmp / "blocks";
  std::mt19937_64 rng(41);
  std::vector<std::string> contents;
  for (int i = 0; i < 40; ++i) contents.push_back(RandomBlock(rng));
  {
    BlockStore store{blocks};
    REQUIRE(store.Open().ok());
    for (int batch = 0; batch < 4; ++batch) {
      std::vector<EncodedBlock> blocks;
      for (int i = batch * 10; i < batch * 10 + 10; ++i) blocks.push_back(Encoded(contents[i]));
      blocks.push_back(Encoded(contents[0]));  // present already (or twice in the batch)
      auto stats = store.Put(blocks);
      REQUIRE(stats.ok());
      CHECK(stats->stored == 10);
      CHECK(stats->already_present == 1);
    }
    CHECK(PackFiles(blocks) == std::vector<std::string>{"00000001.pack"});
    for (const auto& c : contents) CHECK(Plain(*store.Get(Lib::IdOf(c))) == c);
    // Records as stored are the fetch answer: any order, duplicates repeated, runs of
    // adjacent records read at once; the same bytes as encoding what Get returns.
    std::vector<BlockId> ids;
    std::vector<EncodedBlock> expected;
    for (int i : {3, 4, 5, 6, 12, 11, 4, 39, 0}) {
      ids.push_back(Lib::IdOf(contents[i]));
      expected.push_back(*store.Get(ids.back()));
    }
    std::string records = "VMB1" + std::string("\x09\0\0\0", 4);
    REQUIRE(store.AppendRecords(ids, records).ok());
    CHECK(records == EncodeBatch(expected));
    ids.push_back(Lib::IdOf(RandomBlock(rng)));
    CHECK(store.AppendRecords(ids, records).code() == Code::kNotFound);
    CHECK(store.Get(Lib::IdOf(RandomBlock(rng))).status().code() == Code::kNotFound);
  }
  // A crash in the middle of an append leaves a torn record at the end of the pack.
  {
    std::ofstream f(tmp / "blocks/packs/00000001.pack", std::ios::app | std::ios::binary);
    f << std::string(60, 'x');
  }
  {
    BlockStore store{blocks};
    REQUIRE(store.Open().ok());
    for (const auto& c : contents) CHECK(store.Has(Lib::IdOf(c)));
    // New blocks never go after a tail a crash may have torn: a new pack.
    std::string extra = RandomBlock(rng);
    REQUIRE(store.Put({Encoded(extra)}).ok());
    CHECK(store.Locate(Lib::IdOf(extra))->pack_path.ends_with("/00000002.pack"));
    contents.push_back(extra);
  }
  // The index is lost: the packs are read again, the torn record skipped.
  for (const char* f : {"index.db", "index.db-wal", "index.db-shm"})
    std::filesystem::remove(blocks / f);
  BlockStore store{blocks};
  REQUIRE(store.Open().ok());
  uint64_t count = 0;
  store.ForEach([&](const BlockId&, uint64_t bytes, int64_t) {
    count++;
    CHECK(bytes > 0);
  });
  CHECK(count == contents.size());
  for (const auto& c : contents) CHECK(Plain(*store.Get(Lib::IdOf(c))) == c);
}

TEST_CASE("block store: a commit makes the index rows of the blocks it publishes durable") {
  Lib lib;
  std::mt19937_64 rng(17);
  const std::filesystem::path blocks = lib.tmp / "blocks";
  auto rows_on_disk = [&] {
    TempDir copy;
    std::filesystem::copy_file(blocks / "index.db", copy / "index.db");
    auto db = BlockIndex(copy.path());
    // Before the first checkpoint even the table exists only in the log.
    auto tables = db->Query("SELECT count(*) FROM sqlite_master WHERE name = 'blocks'");
    REQUIRE(tables.ok());
    if ((*tables)[0].Int(0) == 0) return int64_t{0};
    auto rows = db->Query("SELECT count(*) FROM blocks");
    REQUIRE(rows.ok());
    return (*rows)[0].Int(0);
  };
  const std::string a = RandomBlock(rng), b = RandomBlock(rng), c = RandomBlock(rng);
  // An upload's rows are kept in memory (written, with the pack flushed first, every
  // BlockStore::kMaxPendingRows rows or two seconds)...
  lib.PutBlock(a);
  lib.PutBlock(b);
  CHECK(rows_on_disk() == 0);
  // ...and a commit syncs them before it publishes the point that refers to them.
  lib.Backup("item", {a, b, "", ""});
  CHECK(rows_on_disk() == 2);
  lib.PutBlock(c);
  CHECK(rows_on_disk() == 2);
  REQUIRE(lib.store.SyncIndex().ok());
  CHECK(rows_on_disk() == 3);
  CHECK(lib.store.Has(Lib::IdOf(c)));
}

TEST_CASE("block store: sizes and absences of thousands of ids at once, in order") {
  // More ids than one locked group of lookups (4096), most rows in the index file, the last
  // few still pending in memory, absent ids among them.
  TempDir tmp;
  BlockStore store{tmp / "blocks", BlockStore::kPackTargetBytes,
                   /*max_pending_rows=*/64};
  REQUIRE(store.Open().ok());
  std::vector<EncodedBlock> blocks;
  std::vector<BlockId> ids;
  std::vector<uint64_t> expected;
  for (int i = 0; i < 9000; ++i) {
    const std::string content = "block " + std::to_string(i) + std::string(i % 5, 'x');
    if (i % 1000 == 999) {  // never stored
      ids.push_back(Lib::IdOf(content + " absent"));
      expected.push_back(0);
      continue;
    }
    blocks.push_back(Encoded(content));
    ids.push_back(blocks.back().id);
    expected.push_back(blocks.back().payload.size());
  }
  for (size_t at = 0; at < blocks.size(); at += 500)
    REQUIRE(store
                .Put(std::vector<EncodedBlock>(blocks.begin() + at,
                                               blocks.begin() + std::min(blocks.size(), at + 500)))
                .ok());
  CHECK(store.StoredBytes(ids) == expected);
  const BlockStore::Absent absent = store.FindAbsent(ids);
  CHECK(absent.count == 9);
  CHECK(absent.first == ids[999]);
  CHECK(store.FindAbsent(std::span(ids).first(999)).count == 0);
  CHECK(store.StoredBytes(std::span<const BlockId>()).empty());
}

TEST_CASE("block store: ForEach walks every block once, in id order, a page at a time") {
  // More blocks than two pages of the walk (16 Ki rows each), the last ones still pending.
  TempDir tmp;
  BlockStore store{tmp / "blocks", BlockStore::kPackTargetBytes,
                   /*max_pending_rows=*/1 << 20};
  REQUIRE(store.Open().ok());
  std::map<BlockId, uint64_t> expected;
  std::vector<EncodedBlock> batch;
  for (int i = 0; i < 40000; ++i) {
    batch.push_back(Encoded("walk " + std::to_string(i) + std::string(i % 7, 'y')));
    expected[batch.back().id] = batch.back().payload.size();
    if (batch.size() == 1000) {
      REQUIRE(store.Put(batch).ok());
      batch.clear();
    }
  }
  std::vector<BlockId> seen;
  size_t wrong_size = 0;
  store.ForEach([&](const BlockId& id, uint64_t bytes, int64_t touched) {
    seen.push_back(id);
    auto it = expected.find(id);
    if (it == expected.end() || it->second != bytes || touched <= 0) wrong_size++;
  });
  CHECK(seen.size() == expected.size());
  CHECK(wrong_size == 0);
  CHECK(std::is_sorted(seen.begin(), seen.end()));
  CHECK(std::adjacent_find(seen.begin(), seen.end()) == seen.end());
}

TEST_CASE("id sets: sorted, without repeats, bounded; prefixes answer maybe") {
  std::vector<BlockId> distinct;
  for (int i = 0; i < 70000; ++i) distinct.push_back(Lib::IdOf("id " + std::to_string(i)));
  vault::BlockIdSet exact;
  vault::BlockIdPrefixSet prefixes;
  size_t largest = 0;
  for (int round = 0; round < 3; ++round)  // every id three times, so merges meet repeats
    for (const auto& id : distinct) {
      exact.Add(id);
      prefixes.Add(vault::IdPrefix(id));
    }
  exact.Seal();
  prefixes.Seal();
  REQUIRE(exact.size() == distinct.size());
  CHECK(prefixes.size() == distinct.size());
  CHECK(std::is_sorted(exact.keys().begin(), exact.keys().end()));
  size_t missing = 0;
  for (const auto& id : distinct)
    if (!exact.Contains(id) || !prefixes.Contains(vault::IdPrefix(id))) missing++;
  CHECK(missing == 0);
  BlockId other = Lib::IdOf("not added");
  CHECK_FALSE(exact.Contains(other));
  CHECK_FALSE(prefixes.Contains(vault::IdPrefix(other)));
  // Same first 8 bytes as a member, different after: the prefix set says "maybe", the exact
  // set says no.
  BlockId twin = distinct[123];
  twin.bytes[31] ^= 1;
  CHECK_FALSE(exact.Contains(twin));
  CHECK(prefixes.Contains(vault::IdPrefix(twin)));
  // Memory follows the distinct keys, not the adds: 1.4 M adds of 70 000 ids never hold more
  // than twice the distinct keys plus the minimum tail.
  vault::BlockIdPrefixSet bounded;
  for (int round = 0; round < 20; ++round)
    for (const auto& id : distinct) {
      bounded.Add(vault::IdPrefix(id));
      largest = std::max(largest, bounded.held());
    }
  bounded.Seal();
  CHECK(bounded.size() == distinct.size());
  CHECK(largest <= 2 * distinct.size() + vault::BlockIdPrefixSet::kMinTail);
  CHECK(largest < 20 * distinct.size() / 4);
}

TEST_CASE("block store: stored blocks are served before their index rows are written") {
  TempDir tmp;
  const std::filesystem::path blocks = tmp / "blocks";
  std::mt19937_64 rng(47);
  auto indexed = [&] { return IndexedRows(blocks); };
  BlockStore store{blocks, BlockStore::kPackTargetBytes, /*max_pending_rows=*/4};
  REQUIRE(store.Open().ok());
  std::vector<std::string> contents;
  std::vector<BlockId> ids;
  for (int i = 0; i < 3; ++i) {
    contents.push_back(RandomBlock(rng));
    ids.push_back(Lib::IdOf(contents.back()));
    auto put = store.Put({Encoded(contents.back())});
    REQUIRE(put.ok());
    CHECK(put->stored == 1);
  }
  CHECK(indexed() == 0);
  // Pending rows answer every lookup: presence, reads, fetches, sizes, usage, a re-upload.
  for (size_t i = 0; i < ids.size(); ++i) {
    CHECK(store.Has(ids[i]));
    CHECK(Plain(*store.Get(ids[i])) == contents[i]);
    CHECK(store.StoredBytes(ids[i]) == kBlock);
  }
  CHECK(store.HasForUpload(ids) == std::vector<bool>{true, true, true});
  std::string records;
  REQUIRE(store.AppendRecords(ids, records).ok());
  CHECK(records.size() == 3 * (kRecordHeaderSize + kBlock));
  CHECK(store.Usage().live_bytes == 3 * (kRecordHeaderSize + kBlock));
  auto again = store.Put({Encoded(contents[0])});
  REQUIRE(again.ok());
  CHECK(again->stored == 0);
  CHECK(again->already_present == 1);
  CHECK(indexed() == 0);
  // The fourth pending row reaches the limit: that Put writes all four.
  contents.push_back(RandomBlock(rng));
  ids.push_back(Lib::IdOf(contents.back()));
  REQUIRE(store.Put({Encoded(contents.back())}).ok());
  CHECK(indexed() == 4);
  for (size_t i = 0; i < ids.size(); ++i) CHECK(Plain(*store.Get(ids[i])) == contents[i]);
  // Rows older than kMaxPendingAge are written by the next Put, however few.
  const std::string late = RandomBlock(rng);
  REQUIRE(store.Put({Encoded(late)}).ok());
  CHECK(indexed() == 4);
  std::this_thread::sleep_for(BlockStore::kMaxPendingAge + std::chrono::milliseconds(100));
  REQUIRE(store.Put({Encoded(RandomBlock(rng))}).ok());
  CHECK(indexed() == 6);
  // Garbage collection sees pending rows too (they are written first).
  REQUIRE(store.Put({Encoded(RandomBlock(rng))}).ok());
  uint64_t seen = 0;
  store.ForEach([&](const BlockId&, uint64_t, int64_t) { seen++; });
  CHECK(seen == 7);
  CHECK(indexed() == 7);
}

namespace {

// Runs `work` in a forked child, which must end by calling SigkillSelf() while its objects are
// alive (a vault process dying without any cleanup: no destructor runs); a child that returns
// from `work` exits 1. The test then requires the SIGKILL.
void SigkillSelf() {
  ::kill(::getpid(), SIGKILL);
}
void RunInChildKilled(const std::function<void()>& work) {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    work();
    ::_exit(1);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);
}

}  // namespace

TEST_CASE(
    "block store: every stored batch the vault answered survives a SIGKILL of the vault "
    "process") {
  TempDir tmp;
  const std::filesystem::path blocks = tmp / "blocks";
  std::mt19937_64 rng(59);
  std::vector<std::string> contents;
  for (int i = 0; i < 5; ++i) contents.push_back(RandomBlock(rng));
  RunInChildKilled([&] {  // the vault's store (default limits): five answered Puts, no SyncIndex
    BlockStore store{blocks};
    bool ok = store.Open().ok();
    for (const auto& c : contents) ok = ok && store.Put({Encoded(c)}).ok();
    if (ok) SigkillSelf();
  });
  BlockStore store{blocks};
  REQUIRE(store.Open().ok());
  for (const auto& c : contents) {
    REQUIRE(store.Has(Lib::IdOf(c)));
    CHECK(Plain(*store.Get(Lib::IdOf(c))) == c);
  }
}

TEST_CASE(
    "block store: answered uploads whose index rows were pending when the vault was killed are "
    "re-indexed at start; a damaged one is skipped and can be stored again") {
  TempDir tmp;
  const std::filesystem::path blocks = tmp / "blocks";
  const std::filesystem::path damaged_at = tmp / "damaged-offset";
  std::mt19937_64 rng(53);
  const std::string synced = RandomBlock(rng), a = RandomBlock(rng), damaged = RandomBlock(rng),
                    c = RandomBlock(rng);
  auto indexed = [&] { return IndexedRows(blocks); };
  RunInChildKilled([&] {  // the "vault": syncs the first block, three more stay pending
    BlockStore store{blocks, BlockStore::kPackTargetBytes, /*max_pending_rows=*/16};
    if (!store.Open().ok() || !store.Put({Encoded(synced)}).ok() || !store.SyncIndex().ok()) return;
    for (const std::string* content : {&a, &damaged, &c})
      if (!store.Put({Encoded(*content)}).ok()) return;
    auto where = store.Locate(Lib::IdOf(damaged));
    if (!where.ok()) return;
    std::ofstream(damaged_at) << where->record_offset;
    SigkillSelf();
  });
  CHECK(indexed() == 1);
  // One pending record is damaged on disk (a byte of its payload flipped).
  uint64_t offset = 0;
  std::ifstream(damaged_at) >> offset;
  REQUIRE(offset > 0);
  {
    std::fstream f(blocks / "packs/00000001.pack", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset + kRecordHeaderSize + 100));
    const char byte = static_cast<char>(f.get());
    f.seekp(static_cast<std::streamoff>(offset + kRecordHeaderSize + 100));
    f.put(static_cast<char>(~byte));
    REQUIRE(f.good());
  }
  BlockStore store{blocks};
  REQUIRE(store.Open().ok());
  CHECK(indexed() == 3);
  for (const std::string* content : {&synced, &a, &c})
    CHECK(Plain(*store.Get(Lib::IdOf(*content))) == *content);
  CHECK_FALSE(store.Has(Lib::IdOf(damaged)));
  CHECK(store.HasForUpload(std::vector<BlockId>{Lib::IdOf(damaged)}) == std::vector<bool>{false});
  // The damaged record is dead bytes, not a row pointing at it.
  const vault::StoreUsage usage = store.Usage();
  CHECK(usage.live_bytes == 3 * (kRecordHeaderSize + kBlock));
  CHECK(usage.pack_bytes >= usage.live_bytes + kRecordHeaderSize + kBlock);
  auto again = store.Put({Encoded(damaged)});
  REQUIRE(again.ok());
  CHECK(again->stored == 1);
  CHECK(Plain(*store.Get(Lib::IdOf(damaged))) == damaged);
  // A second start has nothing left to re-index: the position moved past every record.
  REQUIRE(store.SyncIndex().ok());
  auto from = BlockIndex(blocks)->Query("SELECT pack, offset FROM unindexed_from");
  REQUIRE(from.ok());
  REQUIRE(from->size() == 1);
  CHECK((*from)[0].Int(0) == 2);  // the pack this run appended to
  CHECK(static_cast<uint64_t>((*from)[0].Int(1)) ==
        std::filesystem::file_size(blocks / "packs/00000002.pack"));
}

TEST_CASE(
    "block store: a vault killed by SIGKILL at a random moment during concurrent uploads keeps "
    "every upload it answered") {
  TempDir tmp;
  const std::filesystem::path blocks = tmp / "blocks";
  std::mt19937_64 rng(61);
  constexpr int kThreads = 4, kPutsPerThread = 30, kBlocksPerPut = 2;
  constexpr int kPuts = kThreads * kPutsPerThread;
  std::vector<std::string> contents;
  constexpr int kRounds = 3;
  for (int i = 0; i < kRounds * kPuts * kBlocksPerPut; ++i) contents.push_back(RandomBlock(rng));
  std::set<int> answered;  // first content index of every Put answered in some round
  // Each round starts a vault process on the same store (re-indexing what the last one left),
  // which uploads new blocks from four threads, reporting each answered Put on a pipe, and is
  // killed after a random number of answers.
  for (int round = 0; round < kRounds; ++round) {
    int report[2];
    REQUIRE(::pipe(report) == 0);
    const int kill_after = std::uniform_int_distribution<int>(5, kPuts - 5)(rng);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::close(report[0]);
      BlockStore store{blocks, BlockStore::kPackTargetBytes, /*max_pending_rows=*/8};
      if (!store.Open().ok()) ::_exit(1);
      std::vector<std::thread> threads;
      for (int t = 0; t < kThreads; ++t)
        threads.emplace_back([&, t] {
          for (int k = 0; k < kPutsPerThread; ++k) {
            const int put = (round * kPuts + t * kPutsPerThread + k) * kBlocksPerPut;
            std::vector<EncodedBlock> batch;
            for (int b = 0; b < kBlocksPerPut; ++b) batch.push_back(Encoded(contents[put + b]));
            if (!store.Put(batch).ok()) ::_exit(1);
            if (::write(report[1], &put, sizeof put) != sizeof put) ::_exit(1);
          }
        });
      for (auto& t : threads) t.join();
      for (;;) ::pause();  // every Put answered: wait for the signal
    }
    ::close(report[1]);
    int put = 0, seen = 0;
    while (::read(report[0], &put, sizeof put) == sizeof put) {
      answered.insert(put);
      if (++seen == kill_after) REQUIRE(::kill(pid, SIGKILL) == 0);
    }
    ::close(report[0]);
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGKILL);
    BlockStore store{blocks};
    REQUIRE(store.Open().ok());
    int missing = 0;
    for (int p : answered)
      for (int b = 0; b < kBlocksPerPut; ++b) {
        const std::string& content = contents[p + b];
        if (!store.Has(Lib::IdOf(content)))
          missing++;
        else
          CHECK(Plain(*store.Get(Lib::IdOf(content))) == content);
      }
    INFO("round ", round, ": killed after ", kill_after, " answers");
    CHECK(missing == 0);
  }
}

TEST_CASE("block store: a damaged record is reported as corruption, not served") {
  TempDir tmp;
  const std::filesystem::path blocks = tmp / "blocks";
  std::mt19937_64 rng(43);
  std::string a = RandomBlock(rng), b = RandomBlock(rng);
  BlockStore store{blocks};
  REQUIRE(store.Open().ok());
  REQUIRE(store.Put({Encoded(a), Encoded(b)}).ok());
  // Overwrite b's id inside its record: the index points at a record holding another id.
  auto loc = store.Locate(Lib::IdOf(b));
  REQUIRE(loc.ok());
  {
    std::fstream f(loc->pack_path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(loc->record_offset));
    f.write("\0\0\0\0", 4);
  }
  auto got = store.Get(Lib::IdOf(b));
  REQUIRE_FALSE(got.ok());
  CHECK(got.status().code() == Code::kCorruption);
  CHECK(got.status().cause().find(loc->pack_path) != std::string::npos);
  std::string records;
  std::vector<BlockId> both{Lib::IdOf(a), Lib::IdOf(b)};
  Status fetch = store.AppendRecords(both, records);
  CHECK(fetch.code() == Code::kCorruption);
  CHECK(fetch.cause().find(Lib::IdOf(b).Hex()) != std::string::npos);
  CHECK(Plain(*store.Get(Lib::IdOf(a))) == a);
  // A batch with a block that does not match its id stores nothing.
  EncodedBlock lie = Encoded(RandomBlock(rng));
  lie.id = Lib::IdOf(RandomBlock(rng));
  std::string c = RandomBlock(rng);
  auto put = store.Put({Encoded(c), lie});
  REQUIRE_FALSE(put.ok());
  CHECK(put.status().code() == Code::kCorruption);
  CHECK_FALSE(store.Has(Lib::IdOf(c)));
}

TEST_CASE("block store: blocks of the old one-file-per-block layout move into packs") {
  TempDir tmp;
  const std::filesystem::path blocks = tmp / "blocks";
  std::mt19937_64 rng(47);
  std::vector<std::string> contents{RandomBlock(rng), RandomBlock(rng), RandomBlock(rng)};
  std::filesystem::create_directories(blocks);
  for (const auto& c : contents) {
    EncodedBlock e = Encoded(c);
    std::string hex = e.id.Hex();
    std::filesystem::create_directories(blocks / hex.substr(0, 2));
    std::ofstream(blocks / hex.substr(0, 2) / hex, std::ios::binary)
        << EncodeBatch(std::span(&e, 1));
  }
  // Touched an hour ago: garbage collection must keep judging blocks by their last use.
  const std::string first_hex = Lib::IdOf(contents[0]).Hex();
  const auto first_file = blocks / first_hex.substr(0, 2) / first_hex;
  struct timespec old[2];
  clock_gettime(CLOCK_REALTIME, &old[0]);
  old[0].tv_sec -= 3600;
  old[1] = old[0];
  REQUIRE(::utimensat(AT_FDCWD, first_file.c_str(), old, 0) == 0);
  // An interrupted upload of the old layout and a damaged file.
  std::ofstream(blocks / first_hex.substr(0, 2) / (first_hex + ".tmp123")) << "partial";
  const std::string junk_hex(64, 'e');
  std::filesystem::create_directories(blocks / "ee");
  std::ofstream(blocks / "ee" / junk_hex) << "not a block";

  BlockStore store{blocks};
  REQUIRE(store.Open().ok());
  for (const auto& c : contents) CHECK(Plain(*store.Get(Lib::IdOf(c))) == c);
  CHECK_FALSE(std::filesystem::exists(first_file));
  CHECK_FALSE(std::filesystem::exists(first_file.parent_path()));  // emptied and removed
  CHECK(std::filesystem::exists(blocks / "ee" / junk_hex));        // left for the operator
  int64_t touched = 0;
  store.ForEach([&](const BlockId& id, uint64_t, int64_t t) {
    if (id.Hex() == first_hex) touched = t;
  });
  const int64_t hour_ago_ms = int64_t{old[0].tv_sec} * 1000;
  CHECK(touched >= hour_ago_ms);
  CHECK(touched < hour_ago_ms + 2000);
}

TEST_CASE("block store: cleanup drops untouched blocks and compaction returns their space") {
  TempDir tmp;
  const std::filesystem::path blocks = tmp / "blocks";
  std::mt19937_64 rng(53);
  BlockStore store{blocks, kSmallPack};
  REQUIRE(store.Open().ok());
  std::vector<std::string> contents;
  for (int i = 0; i < 64; ++i) {
    contents.push_back(RandomBlock(rng));
    REQUIRE(store.Put({Encoded(contents.back())}).ok());
  }
  const size_t packs_before = PackFiles(blocks).size();
  CHECK(packs_before == 4);
  const auto before = store.Usage();
  // Drop three quarters of the blocks of the first three packs (blocks 0-47), all of the
  // last pack's are kept; one dropped block was touched after the cutoff and survives.
  REQUIRE(store.SyncIndex().ok());
  Backdate(blocks.string());
  std::vector<BlockId> drop;
  for (int i = 0; i < 48; ++i)
    if (i % 4 != 0) drop.push_back(Lib::IdOf(contents[i]));
  CHECK(store.HasForUpload(Lib::IdOf(contents[1])));  // a backup relies on it now
  const int64_t cutoff = std::chrono::duration_cast<std::chrono::milliseconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count() -
                         60000;
  auto removed = store.RemoveUntouchedSince(drop, cutoff);
  REQUIRE(removed.ok());
  CHECK(removed->blocks == drop.size() - 1);
  CHECK(removed->bytes == (drop.size() - 1) * kBlock);  // random data is stored raw
  auto compacted = store.Compact();
  REQUIRE(compacted.ok());
  CHECK(compacted->packs_rewritten == 3);
  CHECK(compacted->packs_deleted == 3);
  CHECK(compacted->blocks_moved == 12 + 1);
  const auto after = store.Usage();
  CHECK(after.pack_bytes < before.pack_bytes);
  CHECK(compacted->bytes_reclaimed == 3 * kSmallPack);
  // Packs 1-3 are gone, their live blocks are in a new pack after the active one.
  CHECK(PackFiles(blocks) == std::vector<std::string>{"00000004.pack", "00000005.pack"});
  CHECK(after.pack_bytes + compacted->bytes_reclaimed ==
        before.pack_bytes + std::filesystem::file_size(blocks / "packs/00000005.pack"));
  CHECK(after.live_bytes == (64 - 35) * (kBlock + 41));
  // The copies' rows are written, and the position from which a restart after a crash
  // re-reads records moved past the copies.
  auto from = BlockIndex(blocks)->Query("SELECT pack, offset FROM unindexed_from");
  REQUIRE(from.ok());
  REQUIRE(from->size() == 1);
  CHECK((*from)[0].Int(0) == 5);
  CHECK(static_cast<uint64_t>((*from)[0].Int(1)) ==
        std::filesystem::file_size(blocks / "packs/00000005.pack"));
  for (int i = 0; i < 64; ++i) {
    const bool dropped = i < 48 && i % 4 != 0 && i != 1;
    auto got = store.Get(Lib::IdOf(contents[i]));
    if (dropped) {
      CHECK(got.status().code() == Code::kNotFound);
    } else {
      REQUIRE_MESSAGE(got.ok(), got.status().ToString());
      CHECK(Plain(*got) == contents[i]);
    }
  }
  // A second compaction finds nothing to do; after a reopen everything is still there.
  CHECK(store.Compact()->packs_deleted == 0);
  BlockStore reopened{blocks, kSmallPack};
  REQUIRE(reopened.Open().ok());
  CHECK(Plain(*reopened.Get(Lib::IdOf(contents[1]))) == contents[1]);
  CHECK(Plain(*reopened.Get(Lib::IdOf(contents[63]))) == contents[63]);
}

TEST_CASE("block store: more packs than it keeps open stay readable") {
  TempDir tmp;
  const std::filesystem::path blocks = tmp / "blocks";
  std::mt19937_64 rng(61);
  // One block per pack: 200 packs, more than the store keeps open at once (64).
  BlockStore store{blocks, 4096 + (kBlock + 41 + 4095) / 4096 * 4096};
  REQUIRE(store.Open().ok());
  std::vector<std::string> contents;
  for (int i = 0; i < 200; ++i) {
    contents.push_back(RandomBlock(rng));
    REQUIRE(store.Put({Encoded(contents.back())}).ok());
  }
  CHECK(PackFiles(blocks).size() == 200);
  // With 150 descriptors to spare, keeping every pack open would fail with EMFILE.
  size_t open_now = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd"))
    ++open_now;
  struct rlimit saved {};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
  struct Restore {
    struct rlimit limit;
    ~Restore() { ::setrlimit(RLIMIT_NOFILE, &limit); }
  } restore{saved};
  struct rlimit tight = saved;
  tight.rlim_cur = open_now + 150;
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &tight) == 0);
  for (int round = 0; round < 2; ++round)
    for (const auto& c : contents) {
      auto got = store.Get(Lib::IdOf(c));
      REQUIRE_MESSAGE(got.ok(), got.status().ToString());
      CHECK(Plain(*got) == c);
    }
}

namespace {

// True when files in `dir` can be opened with O_DIRECT (not on tmpfs, for instance).
bool DirectIoWorks(const std::filesystem::path& dir) {
  const std::string probe = dir / "direct-probe";
  { std::ofstream(probe) << "x"; }
  int fd = ::open(probe.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (fd >= 0) ::close(fd);
  std::filesystem::remove(probe);
  return fd >= 0;
}

}  // namespace

TEST_CASE(
    "block store: records are read in pack order, those close together in one direct read, "
    "and answered in request order as stored") {
  TempDir tmp;
  BlockStore store{tmp / "blocks"};
  REQUIRE(store.Open().ok());
  std::mt19937_64 rng(71);
  std::vector<std::string> contents;
  std::vector<EncodedBlock> batch;
  std::vector<BlockId> ids;
  for (int i = 0; i < 64; ++i) {  // 64 x 16 KiB of random data: a 1 MiB run in one pack
    contents.push_back(RandomBlock(rng));
    ids.push_back(Lib::IdOf(contents.back()));
    batch.push_back(Encoded(contents.back()));
  }
  REQUIRE(store.Put(batch).ok());
  const bool direct_io = DirectIoWorks(tmp.path());
  if (!direct_io) MESSAGE("O_DIRECT is refused under " << tmp.path() << ": reads are buffered");
  // Each record on its own: one read each, starting inside a 4 KiB page; the record decodes to
  // the block it was stored from.
  std::vector<std::string> single(ids.size());
  auto before = store.read_counts();
  for (size_t i = 0; i < ids.size(); ++i) {
    REQUIRE(store.AppendRecords(std::span(&ids[i], 1), single[i]).ok());
    CHECK(single[i].size() == kRecordHeaderSize + kBlock);
    ByteReader reader(single[i]);
    BlockRecordView view;
    REQUIRE(ReadRecord(reader, view));
    CHECK(Plain(view.ToOwned()) == contents[i]);
  }
  auto after = store.read_counts();
  CHECK(after.reads - before.reads == ids.size());
  CHECK(after.direct - before.direct == (direct_io ? ids.size() : 0));
  // Records 3..63 in order: one run starting inside a 4 KiB page, read at once.
  std::vector<BlockId> run(ids.begin() + 3, ids.end());
  std::string records, want;
  for (size_t i = 3; i < ids.size(); ++i) want += single[i];
  before = store.read_counts();
  REQUIRE(store.AppendRecords(run, records).ok());
  after = store.read_counts();
  CHECK(records == want);
  CHECK(after.reads - before.reads == 1);
  CHECK(after.bytes - before.bytes == want.size());
  CHECK(after.direct - before.direct == (direct_io ? 1u : 0u));
  // Backwards: no two requested records are adjacent in that order, but they are in the pack:
  // one read, the answer in request order.
  std::vector<BlockId> backwards(ids.rbegin(), ids.rend());
  std::string reversed, want_reversed;
  for (size_t i = ids.size(); i-- > 0;) want_reversed += single[i];
  before = store.read_counts();
  REQUIRE(store.AppendRecords(backwards, reversed).ok());
  after = store.read_counts();
  CHECK(reversed == want_reversed);
  CHECK(after.reads - before.reads == 1);
  // Every other record, with a repeat: the gaps (one record each) are read through, in one read
  // of the whole span; each requested record appears where it was asked for.
  std::vector<BlockId> sparse;
  std::string sparse_records, want_sparse;
  for (size_t i = 0; i < 16; i += 2) {
    sparse.push_back(ids[i]);
    want_sparse += single[i];
  }
  sparse.push_back(ids[4]);
  want_sparse += single[4];
  before = store.read_counts();
  REQUIRE(store.AppendRecords(sparse, sparse_records).ok());
  after = store.read_counts();
  CHECK(sparse_records == want_sparse);
  CHECK(after.reads - before.reads == 1);
  CHECK(after.bytes - before.bytes == 15 * single[0].size());  // records 0..14, gaps included
  // Records further apart than BlockStore::kMaxReadGap: one read each.
  static_assert(BlockStore::kMaxReadGap < 19 * (kRecordHeaderSize + kBlock));
  std::vector<BlockId> far{ids[40], ids[0], ids[20]};
  std::string far_records;
  before = store.read_counts();
  REQUIRE(store.AppendRecords(far, far_records).ok());
  after = store.read_counts();
  CHECK(far_records == single[40] + single[0] + single[20]);
  CHECK(after.reads - before.reads == 3);
  CHECK(after.bytes - before.bytes == 3 * single[0].size());
  for (size_t i = 0; i < ids.size(); i += 9) CHECK(Plain(*store.Get(ids[i])) == contents[i]);
  // An answer larger than the limit is refused before anything is read or allocated.
  std::vector<BlockId> too_many(BlockStore::kMaxAnswerBytes / single[0].size() + 1, ids[7]);
  std::string refused;
  before = store.read_counts();
  Status big = store.AppendRecords(too_many, refused);
  after = store.read_counts();
  CHECK(big.code() == Code::kInvalidArgument);
  CHECK(big.fix().find("fewer blocks") != std::string::npos);
  CHECK(refused.empty());
  CHECK(after.reads == before.reads);
  // At the limit it is answered.
  std::vector<BlockId> at_limit(BlockStore::kMaxAnswerBytes / single[0].size(), ids[7]);
  std::string answered;
  REQUIRE(store.AppendRecords(at_limit, answered).ok());
  CHECK(answered.size() == at_limit.size() * single[0].size());
  CHECK(answered.compare(answered.size() - single[7].size(), single[7].size(), single[7]) == 0);
}

TEST_CASE(
    "block store: a request interleaving the records of two packs (an incremental point's "
    "changed blocks among its parent's) takes one read per pack, not one per record") {
  TempDir tmp;
  std::mt19937_64 rng(72);
  std::vector<std::string> contents[2];
  std::vector<BlockId> ids[2];
  for (int pack = 0; pack < 2; ++pack) {
    // A store opened anew appends to a new pack.
    BlockStore store{tmp / "blocks"};
    REQUIRE(store.Open().ok());
    std::vector<EncodedBlock> batch;
    for (int i = 0; i < 32; ++i) {
      contents[pack].push_back(RandomBlock(rng));
      ids[pack].push_back(Lib::IdOf(contents[pack].back()));
      batch.push_back(Encoded(contents[pack].back()));
    }
    REQUIRE(store.Put(batch).ok());
  }
  BlockStore store{tmp / "blocks"};
  REQUIRE(store.Open().ok());
  // Disk order of an incremental point: most blocks from the first pack, every fourth one
  // replaced by a block of the second.
  std::vector<BlockId> request;
  std::vector<const std::string*> want;
  for (int i = 0; i < 32; ++i) {
    const int pack = i % 4 == 3 ? 1 : 0;
    request.push_back(ids[pack][i]);
    want.push_back(&contents[pack][i]);
  }
  std::string records;
  const auto before = store.read_counts();
  REQUIRE(store.AppendRecords(request, records).ok());
  const auto after = store.read_counts();
  CHECK(after.reads - before.reads == 2);
  ByteReader reader(records);
  for (size_t i = 0; i < request.size(); ++i) {
    CAPTURE(i);
    BlockRecordView view;
    REQUIRE(ReadRecord(reader, view));
    CHECK(view.id == request[i]);
    CHECK(Plain(view.ToOwned()) == *want[i]);
  }
  CHECK(reader.remaining() == 0);
}

TEST_CASE(
    "a full backup stores each segment's blocks as adjacent records, so a restore of the point "
    "reads the packs in few large reads") {
  TempDir tmp;
  Vault vault{tmp / "data"};
  vault.Start();
  const std::string disk = tmp / "disk.img";
  constexpr uint64_t kDiskBlock = 32 * 1024;
  CreateSparseFile(disk, 16 << 20);
  std::vector<uint64_t> written;
  for (uint64_t i = 0; i < 384; ++i) written.push_back(i);  // 12 MiB of random data
  WriteRandomBlocks(disk, kDiskBlock, written, 5);
  std::vector<std::string> args{"backup"};
  auto c = vault.conn();
  args.insert(args.end(), c.begin(), c.end());
  args.insert(args.end(), {"--disk", disk, "--block-size", "32K", "--item", "layout", "--state-dir",
                           tmp / "state", "--json"});
  auto backup = Agent(args);
  INFO("backup: " << backup.err);
  REQUIRE(backup.exit_code == 0);
  const std::string rp = backup.json()["recovery_point"];
  args = {"restore"};
  args.insert(args.end(), c.begin(), c.end());
  args.insert(args.end(), {"--rp", rp, "--to", tmp / "restored.img", "--json"});
  auto restore = Agent(args);
  INFO("restore: " << restore.err);
  REQUIRE(restore.exit_code == 0);
  CHECK(FileSha256(tmp / "restored.img") == FileSha256(disk));
  REQUIRE(vault.Stop() == 0);

  // The point's blocks in disk order, fetched as a restore asks for them.
  BlockStore store{vault.data() + "/blocks"};
  REQUIRE(store.Open().ok());
  Catalog catalog{vault.data(), &store};
  REQUIRE(catalog.Open().ok());
  auto manifest = catalog.LoadManifest(rp, 0);
  REQUIRE(manifest.ok());
  std::vector<BlockId> ids;
  for (const auto& e : manifest->entries)
    if (e.id) ids.push_back(*e.id);
  REQUIRE(ids.size() == written.size());
  std::string records;
  REQUIRE(store.AppendRecords(ids, records).ok());
  // Blocks queued one by one by two workers and taken by two uploaders ended up interleaved
  // in the packs (a run of one or two records per read); in groups of 1 MiB per segment
  // they form runs of 32 blocks or more.
  const auto reads = store.read_counts().reads;
  INFO("reads: " << reads << " for " << ids.size() << " blocks");
  CHECK(reads <= ids.size() / 16);
}

TEST_CASE(
    "run key set: membership between adds matches a reference set, batch by batch, whether "
    "added by Insert or as known-absent sorted runs") {
  // Keys drawn from a small pool so that batches repeat keys within and across themselves;
  // one variant with uniform leading bits (as block id prefixes have), one with all keys'
  // leading bits equal (every directory degenerates to one bucket: slower, still exact).
  for (const bool uniform : {true, false}) {
    CAPTURE(uniform);
    std::mt19937_64 rng(uniform ? 7 : 8);
    std::vector<vault::IdPrefix128> pool;
    for (int i = 0; i < 30000; ++i) pool.push_back(vault::IdPrefix128{uniform ? rng() : 42, rng()});
    vault::RunKeySet<vault::IdPrefix128> set;
    std::set<vault::IdPrefix128> reference;
    size_t max_runs = 0, batches = 0;
    std::vector<vault::IdPrefix128> batch;
    std::vector<size_t> absent, added;
    while (reference.size() < pool.size() * 9 / 10) {
      batch.clear();
      const size_t n = 1 + rng() % (batches % 7 == 0 ? 5000 : 300);
      for (size_t i = 0; i < n; ++i) batch.push_back(pool[rng() % pool.size()]);
      absent.clear();
      set.FindAbsent(batch, absent);
      std::vector<size_t> expected_absent, expected_added;
      std::set<vault::IdPrefix128> first_seen;
      for (size_t i = 0; i < batch.size(); ++i) {
        if (reference.count(batch[i])) continue;
        expected_absent.push_back(i);
        if (first_seen.insert(batch[i]).second) expected_added.push_back(i);
      }
      REQUIRE(absent == expected_absent);
      if (batches % 3 == 2) {
        // As the points listing does: the absent keys gathered in a second set, whose runs
        // then join the first without a lookup.
        std::vector<vault::IdPrefix128> absent_keys;
        for (size_t i : absent) absent_keys.push_back(batch[i]);
        vault::RunKeySet<vault::IdPrefix128> fresh;
        fresh.Insert(absent_keys);
        size_t spans = 0;
        fresh.ForEachKeys(
            [&](std::span<const vault::IdPrefix128> keys) {
              set.InsertAbsentSorted(keys);
              spans++;
            },
            std::numeric_limits<size_t>::max());
        CHECK(spans == fresh.runs());
      } else {
        added.assign(1, 99999);  // Insert appends after what `added` holds
        set.Insert(batch, &added);
        REQUIRE(added.front() == 99999);
        added.erase(added.begin());
        REQUIRE(added == expected_added);
      }
      reference.insert(batch.begin(), batch.end());
      REQUIRE(set.size() == reference.size());
      max_runs = std::max(max_runs, set.runs());
      batches++;
    }
    // Never more runs than log2(size) + 1, however the batches came.
    CHECK(max_runs <= static_cast<size_t>(std::log2(static_cast<double>(set.size()))) + 1);
    size_t wrong = 0;
    for (const auto& key : pool)
      if (set.Contains(key) != (reference.count(key) == 1)) wrong++;
    CHECK(wrong == 0);
    CHECK(set.size() < pool.size());  // some pool keys were never added, and are not members
  }
}

TEST_CASE("id prefixes: 16-byte prefixes keep the ids' first 16 bytes and their order") {
  BlockId a, b;
  a.bytes[0] = 1;
  b.bytes[0] = 2;
  CHECK(vault::IdPrefix16(a) != vault::IdPrefix16(b));
  BlockId c = a;
  c.bytes[15] ^= 0x80;  // differs within the prefix
  CHECK(vault::IdPrefix16(a) != vault::IdPrefix16(c));
  BlockId d = a;
  d.bytes[16] ^= 1;  // differs only after it: the same prefix
  CHECK(vault::IdPrefix16(a) == vault::IdPrefix16(d));
  // OrderBits never contradicts the prefixes' order (the directories depend on it).
  std::mt19937_64 rng(3);
  std::vector<vault::IdPrefix128> keys;
  for (int i = 0; i < 1000; ++i) {
    BlockId id;
    for (auto& byte : id.bytes) byte = static_cast<uint8_t>(rng());
    keys.push_back(vault::IdPrefix16(id));
  }
  std::sort(keys.begin(), keys.end());
  for (size_t i = 1; i < keys.size(); ++i)
    CHECK(vault::OrderBits(keys[i - 1]) <= vault::OrderBits(keys[i]));
}

TEST_CASE(
    "points listing: a point's added blocks are those no earlier point has; a damaged map "
    "adds none") {
  Lib lib;
  std::mt19937_64 rng(21);
  // Blocks from a small pool: points share blocks and a point repeats one at several indexes.
  std::vector<std::string> pool;
  for (int i = 0; i < 40; ++i) pool.push_back(RandomBlock(rng));
  Image image(64);
  std::vector<std::string> rps;
  std::set<std::string> used;  // every non-zero block of every image
  for (int p = 0; p < 5; ++p) {
    for (auto& block : image) {
      if (p > 0 && rng() % 3 != 0) continue;  // unchanged
      const uint64_t kind = rng() % 6;
      if (kind == 0) {
        block.clear();  // zero
      } else if (kind <= 2) {
        pool.push_back(RandomBlock(rng));  // new to the vault
        block = pool.back();
      } else {
        block = pool[rng() % pool.size()];
      }
    }
    for (const auto& block : image)
      if (!block.empty()) used.insert(block);
    lib.now += kDay;
    rps.push_back(lib.Backup("pl", image));
  }
  using Added = std::vector<std::pair<uint64_t, uint64_t>>;  // per point: blocks, bytes
  auto listed = [&] {
    Added out;
    for (const auto& p : lib.lifecycle.Points("pl", lib.now, LifecycleInputs{}))
      out.emplace_back(p["added_blocks"].get<uint64_t>(), p["added_bytes"].get<uint64_t>());
    return out;
  };
  // The reference: each point's stored map in order, a std::set of the blocks seen, a map that
  // cannot be read whole adding nothing.
  auto expected = [&] {
    Added out;
    std::set<BlockId> seen;
    for (const auto& rp : lib.catalog.List("pl")) {
      std::vector<BlockId> ids;
      Status st = lib.catalog.ForEachEntry(rp.id, 0, [&](std::span<const ManifestEntry> es) {
        for (const auto& e : es)
          if (e.id) ids.push_back(*e.id);
        return Status::Ok();
      });
      uint64_t blocks = 0, bytes = 0;
      for (const auto& id : st.ok() ? ids : std::vector<BlockId>{})
        if (seen.insert(id).second) {
          blocks++;
          bytes += lib.store.StoredBytes(id);
        }
      out.emplace_back(blocks, bytes);
    }
    return out;
  };
  const Added whole = listed();
  CHECK(whole == expected());
  uint64_t total_blocks = 0;
  for (const auto& [blocks, bytes] : whole) total_blocks += blocks;
  CHECK(total_blocks == used.size());
  for (const auto& [blocks, bytes] : whole) CHECK(blocks > 0);  // every point brought some
  CHECK(whole[0].second == whole[0].first * lib.store.StoredBytes(Lib::IdOf(pool[0])));

  // The third point's stored map damaged: it adds nothing, and the blocks only it brought
  // are counted by the next point that has them.
  {
    std::fstream f(lib.tmp / ("rps/" + rps[2] + "/disk-0.manifest"),
                   std::ios::in | std::ios::out | std::ios::binary);
    REQUIRE(f.good());
    f.seekp(60);
    f.put('\x5a');
  }
  const Added damaged = listed();
  CHECK(damaged == expected());
  CHECK(damaged[2] == std::pair<uint64_t, uint64_t>{0, 0});
  CHECK(damaged[0] == whole[0]);
  CHECK(damaged[1] == whole[1]);
  CHECK(damaged[3].first + damaged[4].first > whole[3].first + whole[4].first);
}

TEST_CASE(
    "block store: uploads past the early-flush threshold flush the pack, not the index "
    "rows, and stay readable") {
  TempDir tmp;
  const std::filesystem::path blocks = tmp / "blocks";
  std::mt19937_64 rng(71);
  auto indexed = [&] { return IndexedRows(blocks); };
  std::vector<std::string> contents;
  for (int i = 0; i < 12; ++i) contents.push_back(RandomBlock(rng));
  {
    BlockStore store{blocks, BlockStore::kPackTargetBytes, /*max_pending_rows=*/1000};
    REQUIRE(store.Open().ok());
    CHECK(store.early_flushes() == 0);
    // What one Put of one block appends (records are padded for direct writes), measured
    // with early flushes off; then a threshold of 2.5 of them is crossed every third Put.
    store.set_early_flush_bytes(0);
    const auto pack = blocks / "packs/00000001.pack";
    REQUIRE(store.Put({Encoded(contents[0])}).ok());
    const uint64_t before = std::filesystem::file_size(pack);
    REQUIRE(store.Put({Encoded(contents[1])}).ok());
    const uint64_t record = std::filesystem::file_size(pack) - before;
    REQUIRE(record >= kBlock);
    REQUIRE(store.SyncIndex().ok());
    CHECK(indexed() == 2);
    store.set_early_flush_bytes(record * 5 / 2);
    for (int i = 2; i < 11; ++i) REQUIRE(store.Put({Encoded(contents[i])}).ok());
    CHECK(store.early_flushes() == 3);
    CHECK(indexed() == 2);  // the rows stay pending: an early flush is of the pack only
    for (int i = 0; i < 11; ++i) CHECK(Plain(*store.Get(Lib::IdOf(contents[i]))) == contents[i]);
    REQUIRE(store.SyncIndex().ok());
    CHECK(indexed() == 11);
    store.set_early_flush_bytes(0);  // never
    REQUIRE(store.Put({Encoded(contents[11])}).ok());
    CHECK(store.early_flushes() == 3);
  }
  BlockStore reopened{blocks};
  REQUIRE(reopened.Open().ok());
  for (const auto& content : contents) CHECK(Plain(*reopened.Get(Lib::IdOf(content))) == content);
}

TEST_CASE("disk space reserve: requests in flight count against it until they end") {
  TempDir dir;
  const uint64_t available = std::filesystem::space(dir.path()).available;
  REQUIRE(available > (400ull << 20));
  constexpr uint64_t kMiB = 1 << 20;
  // 100 MiB above the reserve: one 60 MiB request fits, two at once do not (the margins allow
  // for 40 MiB written or freed by others meanwhile).
  vault::DiskSpaceReserve reserve(dir.path(), available - 100 * kMiB);
  CHECK(reserve.ReserveBytes() == available - 100 * kMiB);
  {
    auto first = reserve.Admit(60 * kMiB);
    REQUIRE_MESSAGE(first.ok(), first.status().ToString());
    auto second = reserve.Admit(60 * kMiB);
    REQUIRE_FALSE(second.ok());
    CHECK(second.status().code() == Code::kResourceExhausted);
    CHECK(second.status().ToString().find("under " + dir.path()) != std::string::npos);
    CHECK(second.status().ToString().find("vmsnap cleanup --now") != std::string::npos);
  }
  auto again = reserve.Admit(60 * kMiB);  // the first has ended (and wrote nothing)
  CHECK_MESSAGE(again.ok(), again.status().ToString());
  // No reserve admits anything; the default is 1 % of the filesystem, at most 1 GiB.
  CHECK(vault::DiskSpaceReserve(dir.path(), 0).Admit(UINT64_MAX / 2).ok());
  const uint64_t size = std::filesystem::space(dir.path()).capacity;
  const uint64_t by_default =
      vault::DiskSpaceReserve(dir.path(), vault::DiskSpaceReserve::kDefault).ReserveBytes();
  CHECK(by_default <= (1ull << 30));
  CHECK(by_default >= std::min<uint64_t>(size / 100, 1ull << 30) * 99 / 100);
}

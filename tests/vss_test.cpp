// The VSS requester (platform/vss_requester.cpp) and the VSS path of the consistency engine
// (agent/consistency.cpp), driven by a fake VssBackupComponents: VSS itself exists only on
// Windows. The fake enforces the VSS call order (VSS_E_BAD_STATE otherwise), can fail any
// call, make named writers fail at a stage, report VSS_E_SNAPSHOT_SET_IN_PROGRESS a number of
// times, and time out the hold-writes window; it records every call.
//
// Portable (std::filesystem only, no tests/support): the same file runs in the Windows test
// executable under Wine. Only the pre/post script test (POSIX shell scripts) and the backup
// pipeline test (a real vault, tests/support) are Linux-only.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "agent/consistency.hpp"
#include "platform/vss.hpp"

#ifndef _WIN32
#include <unistd.h>

#include <cstdlib>

#include "agent/backup.hpp"
#include "agent/restore.hpp"
#include "agent/vault_client.hpp"
#include "tests/support/test_support.hpp"
#endif

namespace vmsnap::test {
namespace {

namespace fs = std::filesystem;
using agent::ConsistencyLevel;
using agent::ConsistencyOptions;
using json = nlohmann::json;
using platform::VssBackupComponents;
using platform::VssSnapshotSet;
using platform::VssWriterState;
namespace vss_hr = platform::vss_hr;
using namespace std::chrono_literals;

// ---------------------------------------------------------------------------------------------
// The fake.

struct FakeWriter {
  std::string name;
  std::string id;
  std::string instance;
  VssWriterState after_prepare = VssWriterState::kStable;
  VssWriterState after_snapshot = VssWriterState::kWaitingForBackupComplete;
  VssWriterState after_complete = VssWriterState::kStable;
  uint32_t failure_hr = 0;  // reported with any failed state
};

// What every fake instance of one test shares: the writers, the injected faults, the log.
struct FakeVssWorld {
  std::vector<FakeWriter> writers = {{"System Writer", "{e8132975-6f93-4464-a53e-1050253ae220}",
                                      "{11111111-0000-0000-0000-000000000001}"},
                                     {"SqlServerWriter", "{a65faa63-5ea8-4ebc-9dbd-a0c4db26912a}",
                                      "{11111111-0000-0000-0000-000000000002}"},
                                     {"Registry Writer", "{afbab4a2-367d-4d15-a586-71dbb18f8485}",
                                      "{11111111-0000-0000-0000-000000000003}"}};
  std::vector<std::string> calls;  // every call, in order ("SetBackupState copy", ...)
  // call name -> {which occurrence fails (1-based), HRESULT}
  std::map<std::string, std::pair<int, uint32_t>> faults;
  int set_in_progress = 0;         // StartSnapshotSet answers IN_PROGRESS this many times
  bool hold_writes_hangs = false;  // DoSnapshotSet does not finish within its timeout
  std::chrono::milliseconds snapshot_timeout_seen{0};
  std::set<std::string> live_snapshots;  // created by DoSnapshotSet, gone with DeleteSnapshots
  std::vector<std::string> disabled;     // DisableWriterClasses ids, last call
  int instances = 0;
  bool unavailable = false;                              // the factory fails like Wine (E_NOTIMPL)
  std::function<void(const std::string& call)> on_call;  // observers (script order)
  std::string shadow_device;  // when set, every shadow copy "device" is this (readable) file
  // Per volume (as added to the set): its shadow copy "device", a readable file. Takes
  // precedence over shadow_device.
  std::map<std::string, std::string> shadow_devices;

  platform::VssFactory Factory();
  int Count(const std::string& call) const {
    int n = 0;
    for (const auto& c : calls) n += c == call;
    return n;
  }
  bool Called(const std::string& call) const { return Count(call) > 0; }
};

class FakeVss final : public VssBackupComponents {
 public:
  explicit FakeVss(FakeVssWorld& w) : w_(w), n_(++w.instances) {}

  Status InitializeForBackup() override {
    return Step("InitializeForBackup", Stage::kNew, Stage::kInitialized);
  }
  Status SetBackupState(platform::VssBackupType type) override {
    return Step(std::string("SetBackupState ") + platform::VssBackupTypeName(type),
                Stage::kInitialized, Stage::kStateSet, "SetBackupState");
  }
  Status DisableWriterClasses(const std::vector<std::string>& ids) override {
    Status s = Step("DisableWriterClasses", Stage::kStateSet, Stage::kStateSet);
    if (s.ok()) disabled_ = w_.disabled = ids;
    return s;
  }
  Result<std::vector<platform::VssWriterInfo>> GatherWriterMetadata(
      std::chrono::milliseconds) override {
    VMSNAP_RETURN_IF_ERROR(Step("GatherWriterMetadata", Stage::kStateSet, Stage::kMetadata));
    std::vector<platform::VssWriterInfo> out;
    for (const auto& wr : Enabled()) out.push_back({wr.name, wr.id, wr.instance, {"\\data"}});
    return out;
  }
  Result<std::string> StartSnapshotSet() override {
    VMSNAP_RETURN_IF_ERROR(Step("StartSnapshotSet", Stage::kMetadata, Stage::kMetadata));
    if (w_.set_in_progress > 0) {
      --w_.set_in_progress;
      return platform::StatusFromVssHresult(vss_hr::kSnapshotSetInProgress, "StartSnapshotSet");
    }
    stage_ = Stage::kSetStarted;
    set_id_ = "{5e700000-0000-0000-0000-00000000000" + std::to_string(n_) + "}";
    return set_id_;
  }
  Result<std::string> AddToSnapshotSet(const std::string& volume) override {
    VMSNAP_RETURN_IF_ERROR(Step("AddToSnapshotSet " + volume, Stage::kSetStarted,
                                Stage::kSetStarted, "AddToSnapshotSet"));
    const std::string id =
        "{5a000000-0000-0000-0000-0000000000" + std::to_string(10 + volumes_.size()) + "}";
    volumes_[id] = volume;
    return id;
  }
  Status PrepareForBackup(std::chrono::milliseconds) override {
    return Step("PrepareForBackup", Stage::kSetStarted, Stage::kPrepared);
  }
  Status DoSnapshotSet(std::chrono::milliseconds timeout) override {
    w_.snapshot_timeout_seen = timeout;
    VMSNAP_RETURN_IF_ERROR(Step("DoSnapshotSet", Stage::kPrepared, Stage::kSnapshotted));
    for (const auto& [id, v] : volumes_) w_.live_snapshots.insert(id);
    if (w_.hold_writes_hangs) {  // as WaitAsync reports an IVssAsync still pending
      stage_ = Stage::kPrepared;
      return Status::Error(Code::kTimeout, "DoSnapshotSet did not finish within " +
                                               std::to_string(timeout.count()) +
                                               " ms; it was cancelled");
    }
    return Status::Ok();
  }
  Result<std::vector<platform::VssWriterStatus>> GatherWriterStatus(
      std::chrono::milliseconds) override {
    const Stage s = stage_;
    if (s != Stage::kPrepared && s != Stage::kSnapshotted && s != Stage::kCompleted)
      return Bad("GatherWriterStatus");
    VMSNAP_RETURN_IF_ERROR(Step("GatherWriterStatus", s, s));
    std::vector<platform::VssWriterStatus> out;
    for (const auto& wr : Enabled()) {
      const VssWriterState st = s == Stage::kPrepared      ? wr.after_prepare
                                : s == Stage::kSnapshotted ? wr.after_snapshot
                                                           : wr.after_complete;
      out.push_back({wr.name, wr.id, wr.instance, st,
                     platform::VssWriterStateFailed(st) ? wr.failure_hr : 0});
    }
    return out;
  }
  Result<platform::VssSnapshotProperties> GetSnapshotProperties(const std::string& id) override {
    VMSNAP_RETURN_IF_ERROR(Step("GetSnapshotProperties", Stage::kSnapshotted, Stage::kSnapshotted));
    if (!w_.live_snapshots.count(id))
      return platform::StatusFromVssHresult(vss_hr::kObjectNotFound, "GetSnapshotProperties");
    const std::string& volume = volumes_.at(id);
    auto own = w_.shadow_devices.find(volume);
    return platform::VssSnapshotProperties{
        id, set_id_, volume,
        own != w_.shadow_devices.end() ? own->second
        : !w_.shadow_device.empty()
            ? w_.shadow_device
            : "\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopy" + id.substr(id.size() - 3, 2)};
  }
  Status BackupComplete(std::chrono::milliseconds) override {
    return Step("BackupComplete", Stage::kSnapshotted, Stage::kCompleted);
  }
  Status AbortBackup() override {
    if (stage_ == Stage::kCompleted || stage_ < Stage::kSetStarted) return Bad("AbortBackup");
    return Step("AbortBackup", stage_, Stage::kAborted);
  }
  Result<int> DeleteSnapshots(const std::string& set_id) override {
    VMSNAP_RETURN_IF_ERROR(Step("DeleteSnapshots", stage_, stage_));
    if (set_id != set_id_)
      return platform::StatusFromVssHresult(vss_hr::kObjectNotFound, "DeleteSnapshots");
    int n = 0;
    for (const auto& [id, v] : volumes_) n += static_cast<int>(w_.live_snapshots.erase(id));
    return n;
  }

 private:
  enum class Stage {
    kNew,
    kInitialized,
    kStateSet,
    kMetadata,
    kSetStarted,
    kPrepared,
    kSnapshotted,
    kCompleted,
    kAborted
  };

  Status Bad(const std::string& call) {
    w_.calls.push_back(call + " (bad state)");
    return platform::StatusFromVssHresult(vss_hr::kBadState, call);
  }
  // Records `call`; VSS_E_BAD_STATE unless in `from`; an injected fault; else moves to `to`.
  Status Step(const std::string& call, Stage from, Stage to, const std::string& fault_key = "") {
    if (stage_ != from) return Bad(call);
    w_.calls.push_back(call);
    if (w_.on_call) w_.on_call(call);
    const std::string key = fault_key.empty() ? call : fault_key;
    auto f = w_.faults.find(key);
    if (f != w_.faults.end() && ++seen_[key] == f->second.first)
      return platform::StatusFromVssHresult(f->second.second, key);
    stage_ = to;
    return Status::Ok();
  }
  std::vector<FakeWriter> Enabled() const {
    std::vector<FakeWriter> out;
    for (const auto& wr : w_.writers)
      if (std::find(disabled_.begin(), disabled_.end(), wr.id) == disabled_.end())
        out.push_back(wr);
    return out;
  }

  FakeVssWorld& w_;
  int n_;
  Stage stage_ = Stage::kNew;
  std::string set_id_;
  std::map<std::string, std::string> volumes_;  // snapshot id -> volume
  std::vector<std::string> disabled_;
  std::map<std::string, int> seen_;
};

platform::VssFactory FakeVssWorld::Factory() {
  return [this]() -> Result<std::unique_ptr<VssBackupComponents>> {
    if (unavailable)
      return platform::StatusFromVssHresult(vss_hr::kNotImpl, "CreateVssBackupComponents");
    return std::unique_ptr<VssBackupComponents>(std::make_unique<FakeVss>(*this));
  };
}

platform::VssRequesterOptions FastOptions(
    std::vector<std::chrono::milliseconds>* sleeps = nullptr) {
  platform::VssRequesterOptions o;
  o.sleep = [sleeps](std::chrono::milliseconds d) {
    if (sleeps) sleeps->push_back(d);
  };
  return o;
}

const std::vector<std::string> kTwoVolumes = {"C:\\", "D:\\"};

std::vector<std::string> SequenceUpToSnapshot() {
  return {"InitializeForBackup", "SetBackupState copy",   "GatherWriterMetadata",
          "StartSnapshotSet",    "AddToSnapshotSet C:\\", "AddToSnapshotSet D:\\",
          "PrepareForBackup",    "GatherWriterStatus",    "DoSnapshotSet",
          "GatherWriterStatus",  "GetSnapshotProperties", "GetSnapshotProperties"};
}

const json* FindWriter(const json& evidence, const std::string& name) {
  for (const auto& w : evidence.at("writers"))
    if (w.value("name", "") == name) return &w;
  return nullptr;
}

// A temporary directory (std::filesystem only, so it works under Wine too).
struct TempDir {
  fs::path path;
  TempDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("vmsnap-vss-test-" +
            std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()) + "-" +
            std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// Consistency options on the VSS path with no scripts configured.
ConsistencyOptions VssConsistency(FakeVssWorld& world, const TempDir& dir,
                                  std::vector<std::string> disks = {"\\\\.\\C:"}) {
  ConsistencyOptions o;
  o.disks = std::move(disks);
  o.hooks.hooks_dir = (dir.path / "hooks.d").string();  // does not exist: no native hooks
  o.hooks.azure_config_path = (dir.path / "azure.json").string();
  o.vss = FastOptions();
  o.vss_factory = world.Factory();
  return o;
}

// ---------------------------------------------------------------------------------------------
// Vocabulary.

TEST_CASE("vss: HRESULTs map to named statuses that say whether to retry") {
  Status busy = platform::StatusFromVssHresult(vss_hr::kSnapshotSetInProgress, "StartSnapshotSet");
  CHECK(busy.retryable());
  CHECK(busy.code() == Code::kUnavailable);
  CHECK(busy.cause().find("VSS_E_SNAPSHOT_SET_IN_PROGRESS (0x80042316)") != std::string::npos);
  CHECK(busy.phase() == "vss StartSnapshotSet");
  Status bad = platform::StatusFromVssHresult(vss_hr::kBadState, "DoSnapshotSet");
  CHECK(bad.code() == Code::kInternal);
  CHECK_FALSE(bad.retryable());
  CHECK(platform::StatusFromVssHresult(vss_hr::kHoldWritesTimeout, "DoSnapshotSet").code() ==
        Code::kTimeout);
  CHECK(platform::StatusFromVssHresult(vss_hr::kAccessDenied, "InitializeForBackup").code() ==
        Code::kPermissionDenied);
  Status notimpl = platform::StatusFromVssHresult(vss_hr::kNotImpl, "CreateVssBackupComponents");
  CHECK(notimpl.code() == Code::kUnavailable);
  CHECK_FALSE(notimpl.fix().empty());
  CHECK(platform::VssHresultText(0x80049999) == "HRESULT 0x80049999");
  CHECK(std::string(platform::VssWriterStateName(VssWriterState::kFailedAtPrepareSnapshot)) ==
        "failed-at-prepare-snapshot");
  CHECK(platform::VssWriterStateFailed(VssWriterState::kFailedAtFreeze));
  CHECK_FALSE(platform::VssWriterStateFailed(VssWriterState::kWaitingForBackupComplete));
  CHECK(platform::ParseVssBackupType("FULL").ok());
  CHECK_FALSE(platform::ParseVssBackupType("incremental").ok());
}

TEST_CASE("vss: disk names -> volumes") {
  CHECK(platform::VolumeNameOfDisk("\\\\.\\C:") == "C:\\");
  CHECK(platform::VolumeNameOfDisk("d:") == "D:\\");
  CHECK(platform::VolumeNameOfDisk("\\\\?\\Volume{0a1b}") == "\\\\?\\Volume{0a1b}\\");
  CHECK(platform::VolumeNameOfDisk("\\\\.\\PhysicalDrive0").empty());
  CHECK(platform::VolumeNameOfDisk("/var/lib/disk.img").empty());
  CHECK(platform::IsPhysicalDrivePath("\\\\.\\PHYSICALDRIVE12"));
  CHECK_FALSE(platform::IsPhysicalDrivePath("\\\\.\\PhysicalDrive"));
  CHECK_FALSE(platform::IsPhysicalDrivePath("/dev/sda"));
}

// ---------------------------------------------------------------------------------------------
// The requester sequence.

TEST_CASE("vss: the full sequence, in order, copy backup by default; Complete deletes") {
  FakeVssWorld w;
  json ev;
  auto set = VssSnapshotSet::Create(w.Factory(), kTwoVolumes, FastOptions(), &ev);
  REQUIRE_MESSAGE(set.ok(), set.status().ToString());
  CHECK(w.calls == SequenceUpToSnapshot());
  CHECK(w.live_snapshots.size() == 2);
  CHECK(w.snapshot_timeout_seen <= 60s);
  CHECK((*set)->shadows().size() == 2);
  CHECK((*set)->DeviceFor("D:\\").find("HarddiskVolumeShadowCopy") != std::string::npos);
  CHECK((*set)->DeviceFor("C:\\") != (*set)->DeviceFor("D:\\"));
  CHECK((*set)->failed_writers().empty());
  CHECK((*set)->writer_count() == 3);
  CHECK(ev["backup_type"] == "copy");
  REQUIRE(ev["volumes"].size() == 2);
  CHECK(ev["volumes"][1]["device"] == (*set)->DeviceFor("D:\\"));
  CHECK_FALSE(ev["volumes"][0]["snapshot_id"].get<std::string>().empty());

  REQUIRE((*set)->Complete().ok());
  std::vector<std::string> expected = SequenceUpToSnapshot();
  for (const char* c : {"BackupComplete", "GatherWriterStatus", "DeleteSnapshots"})
    expected.push_back(c);
  CHECK(w.calls == expected);
  CHECK(w.live_snapshots.empty());
  CHECK_FALSE(w.Called("AbortBackup"));
  const json& done = (*set)->evidence();
  CHECK(done["completed"] == true);
  CHECK(done["deleted"] == 2);
  const json* sql = FindWriter(done, "SqlServerWriter");
  REQUIRE(sql);
  CHECK(sql->at("writer_id") == "{a65faa63-5ea8-4ebc-9dbd-a0c4db26912a}");
  CHECK(sql->at("instance_id") == "{11111111-0000-0000-0000-000000000002}");
  REQUIRE(sql->at("statuses").size() == 3);
  CHECK(sql->at("statuses")[0]["after"] == "PrepareForBackup");
  CHECK(sql->at("statuses")[0]["state"] == "stable");
  CHECK(sql->at("statuses")[1]["after"] == "DoSnapshotSet");
  CHECK(sql->at("statuses")[1]["state"] == "waiting-for-backup-complete");
  CHECK(sql->at("statuses")[2]["after"] == "BackupComplete");
  CHECK(sql->at("final_state") == "stable");

  // Idempotent, and the destructor does not abort a completed set.
  CHECK((*set)->Complete().ok());
  set = Status::Internal("released");
  CHECK_FALSE(w.Called("AbortBackup"));
  CHECK(w.Count("DeleteSnapshots") == 1);
}

TEST_CASE("vss: full backup when configured") {
  FakeVssWorld w;
  auto o = FastOptions();
  o.backup_type = platform::VssBackupType::kFull;
  auto set = VssSnapshotSet::Create(w.Factory(), {"C:\\"}, o);
  REQUIRE(set.ok());
  CHECK(w.Called("SetBackupState full"));
  CHECK_FALSE(w.Called("SetBackupState copy"));
  CHECK((*set)->evidence()["backup_type"] == "full");
}

TEST_CASE("vss: a failure after StartSnapshotSet aborts, never completes, deletes what exists") {
  struct Case {
    std::string call;
    int nth;
    uint32_t hr;
    bool snapshots_existed;  // DoSnapshotSet ran: DeleteSnapshots expected
  };
  const std::vector<Case> cases = {
      {"AddToSnapshotSet", 2, vss_hr::kVolumeNotSupported, false},
      {"PrepareForBackup", 1, vss_hr::kWriterNotResponding, false},
      {"GatherWriterStatus", 1, vss_hr::kVssUnexpected, false},
      {"DoSnapshotSet", 1, vss_hr::kProviderVeto, true},
      {"DoSnapshotSet", 1, vss_hr::kHoldWritesTimeout, true},
      {"GatherWriterStatus", 2, vss_hr::kWriterInfrastructure, true},
      {"GetSnapshotProperties", 2, vss_hr::kObjectNotFound, true},
  };
  for (const auto& c : cases) {
    CAPTURE(c.call);
    CAPTURE(c.nth);
    FakeVssWorld w;
    w.faults[c.call] = {c.nth, c.hr};
    json ev;
    auto set = VssSnapshotSet::Create(w.Factory(), kTwoVolumes, FastOptions(), &ev);
    REQUIRE_FALSE(set.ok());
    CHECK(set.status().cause().find(platform::VssHresultText(c.hr)) != std::string::npos);
    CHECK(set.status().phase().find("vss") == 0);
    CHECK(w.Count("AbortBackup") == 1);
    CHECK_FALSE(w.Called("BackupComplete"));
    CHECK(w.Count("DeleteSnapshots") == (c.snapshots_existed ? 1 : 0));
    CHECK(w.live_snapshots.empty());
    // AbortBackup comes after the failed call and before any delete.
    const auto abort = std::find(w.calls.begin(), w.calls.end(), "AbortBackup");
    const auto del = std::find(w.calls.begin(), w.calls.end(), "DeleteSnapshots");
    CHECK(abort < del);
    CHECK(ev["aborted"] == true);
    CHECK(ev["error"].get<std::string>().find(platform::VssHresultText(c.hr)) != std::string::npos);
    if (c.hr == vss_hr::kHoldWritesTimeout) CHECK(set.status().code() == Code::kTimeout);
  }
}

TEST_CASE("vss: a failure before StartSnapshotSet does not abort (nothing started)") {
  for (const char* call :
       {"InitializeForBackup", "SetBackupState", "GatherWriterMetadata", "StartSnapshotSet"}) {
    CAPTURE(call);
    FakeVssWorld w;
    w.faults[call] = {1, vss_hr::kAccessDenied};
    auto set = VssSnapshotSet::Create(w.Factory(), {"C:\\"}, FastOptions());
    REQUIRE_FALSE(set.ok());
    CHECK(set.status().code() == Code::kPermissionDenied);
    CHECK_FALSE(w.Called("AbortBackup"));
    CHECK_FALSE(w.Called("DoSnapshotSet"));
    CHECK_FALSE(w.Called("BackupComplete"));
    for (const auto& c : w.calls) CHECK(c.find("bad state") == std::string::npos);
  }
}

TEST_CASE("vss: hold-writes past the freeze window is a failure with AbortBackup") {
  FakeVssWorld w;
  w.hold_writes_hangs = true;
  auto o = FastOptions();
  o.snapshot_timeout = 10s;
  auto set = VssSnapshotSet::Create(w.Factory(), {"C:\\"}, o);
  REQUIRE_FALSE(set.ok());
  CHECK(set.status().code() == Code::kTimeout);
  CHECK(set.status().cause().find("freeze window (10000 ms)") != std::string::npos);
  CHECK(w.snapshot_timeout_seen == 10s);
  CHECK(w.Called("AbortBackup"));
  CHECK_FALSE(w.Called("BackupComplete"));
  CHECK(w.live_snapshots.empty());

  // A window beyond the writers' 60 s is refused before VSS is touched.
  FakeVssWorld w2;
  o.snapshot_timeout = 61s;
  auto refused = VssSnapshotSet::Create(w2.Factory(), {"C:\\"}, o);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.status().code() == Code::kInvalidArgument);
  CHECK(w2.calls.empty());
}

TEST_CASE("vss: StartSnapshotSet is retried with backoff while another set is in progress") {
  std::vector<std::chrono::milliseconds> sleeps;
  auto o = FastOptions(&sleeps);
  o.start_attempts = 5;
  o.start_backoff = 100ms;
  o.start_backoff_max = 300ms;

  SUBCASE("it clears: the backup goes on") {
    FakeVssWorld w;
    w.set_in_progress = 3;
    json ev;
    auto set = VssSnapshotSet::Create(w.Factory(), {"C:\\"}, o, &ev);
    REQUIRE_MESSAGE(set.ok(), set.status().ToString());
    CHECK(w.Count("StartSnapshotSet") == 4);
    CHECK(ev["start_attempts"] == 4);
    CHECK(sleeps == std::vector<std::chrono::milliseconds>{100ms, 200ms, 300ms});
    CHECK(w.Called("DoSnapshotSet"));
  }
  SUBCASE("it does not: bounded, then a retryable error") {
    FakeVssWorld w;
    w.set_in_progress = 100;
    auto set = VssSnapshotSet::Create(w.Factory(), {"C:\\"}, o);
    REQUIRE_FALSE(set.ok());
    CHECK(set.status().retryable());
    CHECK(set.status().cause().find("after 5 attempts") != std::string::npos);
    CHECK(set.status().cause().find("VSS_E_SNAPSHOT_SET_IN_PROGRESS") != std::string::npos);
    CHECK(w.Count("StartSnapshotSet") == 5);
    CHECK(sleeps.size() == 4);
    CHECK_FALSE(w.Called("AddToSnapshotSet C:\\"));
    CHECK_FALSE(w.Called("AbortBackup"));
  }
}

TEST_CASE("vss: destroyed without Complete -> AbortBackup and delete, never BackupComplete") {
  FakeVssWorld w;
  {
    auto set = VssSnapshotSet::Create(w.Factory(), kTwoVolumes, FastOptions());
    REQUIRE(set.ok());
    CHECK(w.live_snapshots.size() == 2);
  }
  CHECK(w.Count("AbortBackup") == 1);
  CHECK(w.Count("DeleteSnapshots") == 1);
  CHECK_FALSE(w.Called("BackupComplete"));
  CHECK(w.live_snapshots.empty());
}

TEST_CASE("vss: writers failing at each stage are named with their state") {
  SUBCASE("prepare snapshot") {
    FakeVssWorld w;
    w.writers[1].after_prepare = VssWriterState::kFailedAtPrepareSnapshot;
    w.writers[1].after_snapshot = VssWriterState::kFailedAtPrepareSnapshot;
    w.writers[1].failure_hr = vss_hr::kWriterErrorRetryable;
    auto set = VssSnapshotSet::Create(w.Factory(), {"C:\\"}, FastOptions());
    REQUIRE(set.ok());                              // the shadow copy itself succeeded
    REQUIRE((*set)->failed_writers().size() == 1);  // listed once, not per status
    const std::string f = (*set)->failed_writers()[0];
    CHECK(f.find("SqlServerWriter (failed-at-prepare-snapshot") == 0);
    CHECK(f.find("VSS_E_WRITERERROR_RETRYABLE") != std::string::npos);
    const json* sql = FindWriter((*set)->evidence(), "SqlServerWriter");
    REQUIRE(sql);
    CHECK(sql->at("failed") == true);
    CHECK(sql->at("statuses")[0]["failure"] == "VSS_E_WRITERERROR_RETRYABLE (0x800423F3)");
  }
  SUBCASE("freeze (seen after DoSnapshotSet)") {
    FakeVssWorld w;
    w.writers[2].after_snapshot = VssWriterState::kFailedAtFreeze;
    auto set = VssSnapshotSet::Create(w.Factory(), {"C:\\"}, FastOptions());
    REQUIRE(set.ok());
    REQUIRE((*set)->failed_writers().size() == 1);
    CHECK((*set)->failed_writers()[0].find("Registry Writer (failed-at-freeze") == 0);
  }
  SUBCASE("backup complete: recorded in the evidence, not a snapshot failure") {
    FakeVssWorld w;
    w.writers[0].after_complete = VssWriterState::kFailedAtBackupComplete;
    auto set = VssSnapshotSet::Create(w.Factory(), {"C:\\"}, FastOptions());
    REQUIRE(set.ok());
    CHECK((*set)->failed_writers().empty());
    CHECK((*set)->Complete().ok());
    const json* sys = FindWriter((*set)->evidence(), "System Writer");
    REQUIRE(sys);
    CHECK(sys->at("final_state") == "failed-at-backup-complete");
    CHECK(sys->at("failed") == true);
  }
}

TEST_CASE("vss: excluded writers are disabled before GatherWriterMetadata and recorded") {
  FakeVssWorld w;
  auto o = FastOptions();
  o.excluded_writers = {"sqlserverwriter", "{AFBAB4A2-367D-4D15-A586-71DBB18F8485}",
                        "Exchange Writer"};
  json ev;
  auto set = VssSnapshotSet::Create(w.Factory(), {"C:\\"}, o, &ev);
  REQUIRE_MESSAGE(set.ok(), set.status().ToString());
  CHECK(w.instances == 2);  // a probe resolved the names, then the real instance
  const std::vector<std::string> head(w.calls.begin(), w.calls.begin() + 8);
  CHECK(head == std::vector<std::string>{"InitializeForBackup", "SetBackupState copy",
                                         "GatherWriterMetadata", "InitializeForBackup",
                                         "SetBackupState copy", "DisableWriterClasses",
                                         "GatherWriterMetadata", "StartSnapshotSet"});
  CHECK(w.disabled == std::vector<std::string>{"{a65faa63-5ea8-4ebc-9dbd-a0c4db26912a}",
                                               "{afbab4a2-367d-4d15-a586-71dbb18f8485}"});
  CHECK((*set)->excluded_writer_count() == 2);
  CHECK((*set)->writer_count() == 1);
  const json* sql = FindWriter(ev, "SqlServerWriter");
  REQUIRE(sql);
  CHECK(sql->at("excluded") == true);
  CHECK(sql->at("final_state") == "excluded");
  CHECK(sql->at("statuses").empty());  // disabled writers take no part
  REQUIRE(ev["excluded_writers"].size() == 3);
  CHECK(ev["excluded_writers"][2]["configured"] == "Exchange Writer");
  CHECK(ev["excluded_writers"][2]["matched"].empty());
}

// ---------------------------------------------------------------------------------------------
// The consistency engine's VSS path.

TEST_CASE("vss consistency: every writer stable -> application; Cleanup completes the backup") {
  FakeVssWorld w;
  TempDir dir;
  ConsistencyOptions o = VssConsistency(w, dir, {"\\\\.\\C:", "\\\\.\\D:"});
  CHECK(agent::UsesVss(o));  // "auto" with Windows volumes
  json ev;
  auto view = agent::PrepareConsistentView(o, &ev);
  REQUIRE_MESSAGE(view.ok(), view.status().ToString());
  CHECK(view->level() == ConsistencyLevel::kApplication);
  CHECK(ev["level"] == "application");
  REQUIRE(view->disks().size() == 2);
  CHECK(view->disks()[0].disk == "\\\\.\\C:");
  CHECK(view->disks()[0].read_path.find("HarddiskVolumeShadowCopy") != std::string::npos);
  CHECK(view->disks()[0].read_path != view->disks()[1].read_path);
  CHECK(ev["disks"][0]["provider"] == "vss");
  CHECK(ev["snapshot"]["ok"] == true);
  CHECK(ev["vss"]["writers"].size() == 3);
  CHECK(ev["vss"]["backup_type"] == "copy");
  CHECK(w.Count("DoSnapshotSet") == 1);
  CHECK_FALSE(w.Called("BackupComplete"));  // not before the caller read the disks

  REQUIRE(view->Cleanup().ok());
  CHECK(w.Called("BackupComplete"));
  CHECK(w.live_snapshots.empty());
  CHECK_FALSE(w.Called("AbortBackup"));
  const json* sql = FindWriter(view->evidence()["vss"], "SqlServerWriter");
  REQUIRE(sql);
  CHECK(sql->at("statuses").size() == 3);  // after BackupComplete too
  CHECK(view->evidence()["vss"]["completed"] == true);
}

TEST_CASE("vss consistency: a failed writer -> file-system, named with its state") {
  FakeVssWorld w;
  w.writers[1].after_snapshot = VssWriterState::kFailedAtFreeze;
  w.writers[1].failure_hr = vss_hr::kWriterErrorTimeout;
  TempDir dir;
  json ev;
  auto view = agent::PrepareConsistentView(VssConsistency(w, dir), &ev);
  REQUIRE(view.ok());
  CHECK(view->level() == ConsistencyLevel::kFileSystem);
  const std::string reason = ev["reason"];
  CHECK(reason.find("SqlServerWriter (failed-at-freeze") != std::string::npos);
  CHECK(reason.find("VSS_E_WRITERERROR_TIMEOUT") != std::string::npos);
  const json* sql = FindWriter(ev["vss"], "SqlServerWriter");
  REQUIRE(sql);
  CHECK(sql->at("final_state") == "failed-at-freeze");
}

TEST_CASE("vss consistency: an excluded writer -> file-system") {
  FakeVssWorld w;
  TempDir dir;
  ConsistencyOptions o = VssConsistency(w, dir);
  o.vss.excluded_writers = {"SqlServerWriter"};
  json ev;
  auto view = agent::PrepareConsistentView(o, &ev);
  REQUIRE(view.ok());
  CHECK(view->level() == ConsistencyLevel::kFileSystem);
  CHECK(ev["reason"].get<std::string>().find("excluded by configuration: SqlServerWriter") !=
        std::string::npos);

  // Excluding a writer that is not there changes nothing.
  FakeVssWorld w2;
  ConsistencyOptions o2 = VssConsistency(w2, dir);
  o2.vss.excluded_writers = {"Exchange Writer"};
  auto view2 = agent::PrepareConsistentView(o2);
  REQUIRE(view2.ok());
  CHECK(view2->level() == ConsistencyLevel::kApplication);
}

TEST_CASE("vss consistency: VSS unavailable -> failed with a clear error, never a live read") {
  TempDir dir;
  FakeVssWorld w;
  w.unavailable = true;  // what Wine answers (E_NOTIMPL)
  ConsistencyOptions o = VssConsistency(w, dir);
  json ev;
  auto view = agent::PrepareConsistentView(o, &ev);
  REQUIRE_FALSE(view.ok());
  CHECK(view.status().phase() == "consistency");
  CHECK(view.status().cause().find("no VSS shadow copy could be created") != std::string::npos);
  CHECK(view.status().cause().find("E_NOTIMPL") != std::string::npos);
  CHECK(view.status().fix().find("--allow-inconsistent") != std::string::npos);
  CHECK(ev["level"] == "failed");
  CHECK(ev["disks"].empty());  // nothing to read

  SUBCASE("allow-none reads the live disk as none") {
    o.allow_none = true;
    json ev2;
    auto live = agent::PrepareConsistentView(o, &ev2);
    REQUIRE(live.ok());
    CHECK(live->level() == ConsistencyLevel::kNone);
    REQUIRE(live->disks().size() == 1);
    CHECK(live->disks()[0].read_path == "\\\\.\\C:");
    CHECK(ev2["disks"][0]["provider"] == "none");
  }
#ifndef _WIN32
  SUBCASE("the real factory on Linux says VSS is a Windows facility") {
    o.vss_factory = &platform::OpenSystemVss;
    auto real = agent::PrepareConsistentView(o);
    REQUIRE_FALSE(real.ok());
    CHECK(real.status().cause().find("VSS is a Windows facility") != std::string::npos);
  }
#endif
}

TEST_CASE("vss consistency: a snapshot failure fails the backup; a dropped view aborts") {
  TempDir dir;
  {
    FakeVssWorld w;
    w.faults["DoSnapshotSet"] = {1, vss_hr::kInsufficientStorage};
    json ev;
    auto view = agent::PrepareConsistentView(VssConsistency(w, dir), &ev);
    REQUIRE_FALSE(view.ok());
    CHECK(view.status().cause().find("VSS_E_INSUFFICIENT_STORAGE") != std::string::npos);
    CHECK(view.status().fix().find("shadowstorage") != std::string::npos);
    CHECK(w.Called("AbortBackup"));
    CHECK(ev["vss"]["aborted"] == true);
  }
  {
    FakeVssWorld w;
    {
      auto view = agent::PrepareConsistentView(VssConsistency(w, dir));
      REQUIRE(view.ok());
    }  // the backup failed before Cleanup (e.g. the upload broke)
    CHECK(w.Called("AbortBackup"));
    CHECK_FALSE(w.Called("BackupComplete"));
    CHECK(w.live_snapshots.empty());
  }
}

TEST_CASE("vss consistency: which disks the VSS path takes") {
  TempDir dir;
  FakeVssWorld w;
  SUBCASE("an image file with provider vss is refused before VSS is touched") {
    ConsistencyOptions o = VssConsistency(w, dir, {(dir.path / "disk.img").string()});
    CHECK_FALSE(agent::UsesVss(o));  // auto keeps the file provider for image files
    o.snapshot.provider = "vss";
    auto view = agent::PrepareConsistentView(o);
    REQUIRE_FALSE(view.ok());
    CHECK(view.status().code() == Code::kInvalidArgument);
    CHECK(w.instances == 0);
  }
  SUBCASE("a physical drive is refused unless the reader composes volume shadows") {
    ConsistencyOptions o = VssConsistency(w, dir, {"\\\\.\\PhysicalDrive0"});
    CHECK(o.reader_composes_volume_shadows);  // RunBackup composes: on by default
    o.vss_disk_volumes = [](const std::string&) -> Result<std::vector<platform::VssDiskVolume>> {
      return std::vector<platform::VssDiskVolume>{
          {"\\\\?\\Volume{aaaa}\\", {{1048576, 104857600}}},
          {"\\\\?\\Volume{bbbb}\\", {{105906176, 1073741824}}}};
    };
    o.reader_composes_volume_shadows = false;  // a reader that reads read_path only
    auto refused = agent::PrepareConsistentView(o);
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.status().cause().find("physical drive") != std::string::npos);
    CHECK(w.instances == 0);

    o.reader_composes_volume_shadows = true;
    json ev;
    auto view = agent::PrepareConsistentView(o, &ev);
    REQUIRE_MESSAGE(view.ok(), view.status().ToString());
    CHECK(view->level() == ConsistencyLevel::kApplication);
    const auto& d = view->disks().at(0);
    CHECK(d.read_path == "\\\\.\\PhysicalDrive0");
    REQUIRE(d.volume_shadows.size() == 2);
    CHECK(d.volume_shadows[1].volume == "\\\\?\\Volume{bbbb}\\");
    CHECK(d.volume_shadows[1].extents.at(0).disk_offset == 105906176);
    CHECK(d.volume_shadows[0].device_path.find("HarddiskVolumeShadowCopy") != std::string::npos);
    CHECK(w.Called("AddToSnapshotSet \\\\?\\Volume{aaaa}\\"));
    // The evidence says what is point in time: the volumes (with their extents), not the disk.
    const json& disk_ev = ev["disks"][0];
    CHECK(disk_ev["point_in_time"] == false);
    CHECK(disk_ev["volumes"][1]["extents"][0]["disk_offset"] == 105906176);
    CHECK(disk_ev["volumes"][1]["point_in_time"] == true);
    CHECK(disk_ev["note"].get<std::string>().find("the rest from the disk (live)") !=
          std::string::npos);
  }
  SUBCASE("a spanned volume on a physical drive is refused before any snapshot") {
    ConsistencyOptions o = VssConsistency(w, dir, {"\\\\.\\PhysicalDrive1"});
    o.vss_disk_volumes = [](const std::string&) -> Result<std::vector<platform::VssDiskVolume>> {
      return std::vector<platform::VssDiskVolume>{
          {"\\\\?\\Volume{aaaa}\\", {{1048576, 104857600}}},
          {"\\\\?\\Volume{cccc}\\", {{105906176, 1048576}}, 2}};  // striped over 3 disks
    };
    json ev;
    auto refused = agent::PrepareConsistentView(o, &ev);
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.status().code() == Code::kInvalidArgument);
    CHECK(refused.status().phase() == "vss volumes");
    CHECK(refused.status().cause().find("volume \\\\?\\Volume{cccc}\\ has 3 extents") !=
          std::string::npos);
    CHECK(refused.status().fix().find("back up the volume \\\\?\\Volume{cccc}\\ itself") !=
          std::string::npos);
    CHECK(w.instances == 0);  // VSS never opened, no writer froze
    CHECK(ev["level"] == "failed");
  }
}

#ifndef _WIN32
// Root-only: hooks must be owned by root (agent/hooks.hpp).
bool RootOrSkip() {
  if (geteuid() == 0) return true;
  const char* ci = std::getenv("CI");
  if (ci && std::string(ci) == "true") FAIL("this test needs root (CI=true: not skipping)");
  MESSAGE("skipped: needs root (the hooks must be owned by root)");
  return false;
}

void WriteHook(const fs::path& path, const std::string& log, int rc) {
  std::ofstream(path) << "#!/bin/sh\necho \"" << path.filename().string() << " $*\" >> " << log
                      << "\nexit " << rc << "\n";
  fs::permissions(path, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                            fs::perms::others_read | fs::perms::others_exec);
}

std::string ReadText(const fs::path& p) {
  std::ifstream in(p);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST_CASE("vss consistency: pre scripts before the snapshot set, post scripts after") {
  if (!RootOrSkip()) return;
  TempDir dir;
  const fs::path hooks = dir.path / "hooks.d";
  const fs::path log = dir.path / "log";
  fs::create_directories(hooks);
  WriteHook(hooks / "10-db", log.string(), 0);
  FakeVssWorld w;
  std::string log_at_snapshot, log_at_start;
  w.on_call = [&](const std::string& call) {
    if (call == "StartSnapshotSet") log_at_start = ReadText(log);
    if (call == "DoSnapshotSet") log_at_snapshot = ReadText(log);
  };
  ConsistencyOptions o = VssConsistency(w, dir);
  json ev;
  auto view = agent::PrepareConsistentView(o, &ev);
  REQUIRE_MESSAGE(view.ok(), view.status().ToString());
  CHECK(log_at_start == "10-db freeze\n");
  CHECK(log_at_snapshot == "10-db freeze\n");
  CHECK(ReadText(log) == "10-db freeze\n10-db thaw\n");
  CHECK(view->level() == ConsistencyLevel::kApplication);
  REQUIRE(ev["scripts"].size() == 2);
  for (const char* field : {"name", "path", "source", "phase", "attempts", "exit_code", "timed_out",
                            "ok", "duration_ms"})
    CHECK_MESSAGE(ev["scripts"][0].contains(field), field);
  CHECK(ev["scripts"][0]["phase"] == "freeze");
  CHECK(ev["scripts"][1]["phase"] == "thaw");

  SUBCASE("a failing pre script that may continue -> file-system") {
    WriteHook(hooks / "20-app", log.string(), 4);
    FakeVssWorld w2;
    auto v2 = agent::PrepareConsistentView(VssConsistency(w2, dir));
    REQUIRE(v2.ok());
    CHECK(v2->level() == ConsistencyLevel::kFileSystem);
  }
  SUBCASE("a failing pre script whose policy forbids continuing -> failed, VSS never opened") {
    WriteHook(hooks / "20-app", log.string(), 4);
    FakeVssWorld w2;
    ConsistencyOptions o2 = VssConsistency(w2, dir);
    o2.hooks.native_continue_on_failure = false;
    auto v2 = agent::PrepareConsistentView(o2);
    REQUIRE_FALSE(v2.ok());
    CHECK(v2.status().phase() == "pre scripts");
    CHECK(w2.instances == 0);
  }
}

// The backup pipeline on the VSS path, against a real vault on loopback TLS: the "shadow copy"
// is an image file. BackupComplete (after which a full backup's writers may truncate their
// logs) must come only after the vault committed the recovery point; a backup that ends
// without a commit must abort the VSS backup instead.
TEST_CASE("vss backup: BackupComplete only after the vault committed; no commit -> AbortBackup") {
  TempDir dir;
  const std::string image = (dir.path / "shadow.img").string();
  CreateSparseFile(image, 4 << 20);
  WriteRandomBlocks(image, 64 * 1024, {0, 5, 17, 63}, 7);
  Vault vault((dir.path / "vault").string());
  vault.Start();
  ClientOptions client;
  client.url = vault.url();
  client.ca_file = vault.ca();
  client.token = vault.token();
  auto count_points = [&]() -> size_t {
    auto vc = agent::VaultClient::Create(client);
    REQUIRE(vc.ok());
    auto rps = (*vc)->ListRecoveryPoints("winvm");
    REQUIRE_MESSAGE(rps.ok(), rps.status().ToString());
    return rps->size();
  };

  // The pipeline first opens each disk as named (on Windows the volume device itself): here a
  // file literally named "\\.\C:" in the current directory stands in for it.
  struct Cwd {
    fs::path saved = fs::current_path();
    ~Cwd() { fs::current_path(saved); }
  } restore_cwd;
  fs::current_path(dir.path);
  fs::copy_file(image, dir.path / "\\\\.\\C:");

  FakeVssWorld w;
  w.shadow_device = image;
  agent::BackupOptions o;
  o.client = client;
  o.item = "winvm";
  o.disks = {"\\\\.\\C:"};
  o.state_dir = (dir.path / "state").string();
  o.progress = false;
  o.block_size = 64 * 1024;  // the 4 blocks written above
  o.consistency = VssConsistency(w, dir, o.disks);
  o.consistency.runtime_dir = (dir.path / "run").string();
  std::atomic<bool> cancel{false};
  o.cancel = &cancel;

  SUBCASE("committed, then BackupComplete; the report has the writers' final states") {
    size_t points_at_complete = 99;
    w.on_call = [&](const std::string& call) {
      if (call == "BackupComplete") points_at_complete = count_points();
    };
    auto report = agent::RunBackup(o);
    REQUIRE_MESSAGE(report.ok(), report.status().ToString());
    CHECK(report->consistency == "application");
    CHECK(points_at_complete == 1);  // the point existed when the writers were told
    CHECK(w.Called("BackupComplete"));
    CHECK_FALSE(w.Called("AbortBackup"));
    CHECK(w.live_snapshots.empty());
    const json& vss = report->evidence["vss"];
    CHECK(vss["completed"] == true);
    const json* sql = FindWriter(vss, "SqlServerWriter");
    REQUIRE(sql);
    CHECK(sql->at("final_state") == "stable");  // gathered after BackupComplete
    CHECK(report->disks.at(0).blocks_uploaded == 4);
  }
  SUBCASE("cancelled after the snapshot: no point, AbortBackup, never BackupComplete") {
    w.on_call = [&](const std::string& call) {
      if (call == "DoSnapshotSet") cancel = true;
    };
    auto report = agent::RunBackup(o);
    REQUIRE_FALSE(report.ok());
    CHECK(report.status().code() == Code::kCancelled);
    CHECK(w.Called("AbortBackup"));
    CHECK_FALSE(w.Called("BackupComplete"));
    CHECK(w.live_snapshots.empty());
    CHECK(count_points() == 0);
  }
}

// ---------------------------------------------------------------------------------------------
// A whole physical drive on the VSS path, end to end: a real vault on loopback TLS, a real GPT
// disk image (sfdisk on a regular file) in a file literally named "\\.\PhysicalDrive0", and
// per volume a "shadow copy" image whose content differs from the live partition (as if the
// volume changed after the snapshot). The restore must hold the volumes as the shadow copies
// had them and everything else (protective MBR with boot code, GPT, the EFI system partition
// VSS does not snapshot, gaps, the GPT backup) as the live disk had it.

bool SfdiskOrSkip() {
  if (std::system("PATH=\"$PATH:/usr/sbin:/sbin\"; command -v sfdisk >/dev/null 2>&1") == 0)
    return true;
  const char* ci = std::getenv("CI");
  if (ci && std::string(ci) == "true") FAIL("sfdisk is missing (CI=true: not skipping)");
  MESSAGE("skipped: sfdisk is missing (Debian package fdisk)");
  return false;
}

std::string Sh(const std::string& command) {
  RunResult r = Run({"/bin/sh", "-c", "PATH=\"$PATH:/usr/sbin:/sbin\"; " + command});
  REQUIRE_MESSAGE(r.exit_code == 0, command << ": " << r.err);
  return r.out;
}

void PutBytes(const std::string& path, uint64_t offset, const std::string& bytes) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

// `sfdisk --dump` of an image with its file name replaced, to compare two images' tables
// (partition nodes are "NAME3" or "NAMEp3" depending on whether the name ends in a digit).
std::string PartitionDump(const std::string& image) {
  std::string dump = Sh("sfdisk --dump '" + image + "'");
  for (size_t at; (at = dump.find(image)) != std::string::npos;)
    dump.replace(at, image.size(), "DISK");
  return std::regex_replace(dump, std::regex("DISKp?([0-9]+) :"), "DISK-part$1 :");
}

TEST_CASE("vss backup: a physical drive from its volumes' shadow copies and its live layout") {
  if (!SfdiskOrSkip()) return;
  constexpr uint64_t MiB = 1 << 20, kBlock = 64 * 1024, kDiskSize = 24 * MiB;
  TempDir dir;
  struct Cwd {
    fs::path saved = fs::current_path();
    ~Cwd() { fs::current_path(saved); }
  } restore_cwd;
  fs::current_path(dir.path);
  const std::string drive = "\\\\.\\PhysicalDrive0";  // a file of that name in the cwd
  const std::string live = (dir.path / drive).string();

  // The live disk: GPT with an EFI system partition (FAT32 on Windows: not a VSS volume, so
  // read live) and two data partitions (the NTFS volumes).
  CreateSparseFile(live, kDiskSize);
  std::ofstream(dir.path / "layout.sfdisk")
      << "label: gpt\n"
         "size=4MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\n"
         "size=8MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=system\n"
         "size=8MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=data\n";
  Sh("sfdisk -q '" + live + "' < '" + (dir.path / "layout.sfdisk").string() + "'");
  const json table = json::parse(Sh("sfdisk --json '" + live + "'"))["partitiontable"];
  const uint64_t sector = table.value("sectorsize", 512);
  REQUIRE(table["partitions"].size() == 3);
  struct Part {
    uint64_t offset, length;
  };
  std::vector<Part> parts;
  for (const auto& p : table["partitions"])
    parts.push_back({p["start"].get<uint64_t>() * sector, p["size"].get<uint64_t>() * sector});
  REQUIRE(parts[1].offset % kBlock == 0);
  REQUIRE(parts[2].offset + parts[2].length <= kDiskSize - 2 * MiB);  // a gap before the end
  // Boot code in the protective MBR (bytes 0..439; sfdisk keeps the table at 440..511).
  std::string boot(440, '\0');
  for (size_t i = 0; i < boot.size(); ++i) boot[i] = static_cast<char>("VMSNAPBOOT"[i % 10] ^ i);
  PutBytes(live, 0, boot);
  // Live content: the ESP, both partitions (what the volumes hold *now*) and a gap.
  auto blocks_of = [&](const Part& p, std::vector<uint64_t> rel) {
    for (auto& b : rel) b += p.offset / kBlock;
    return rel;
  };
  WriteRandomBlocks(live, kBlock, blocks_of(parts[0], {0, 1, 30}), 11);
  WriteRandomBlocks(live, kBlock, blocks_of(parts[1], {0, 3, 4, 100}), 12);
  WriteRandomBlocks(live, kBlock, blocks_of(parts[2], {0, 7, 127}), 13);
  WriteRandomBlocks(live, kBlock, {(kDiskSize - MiB) / kBlock}, 14);  // vendor data in a gap

  // The shadow copies: the volumes as they were at the snapshot, different from the live disk.
  const std::string shadow_sys = (dir.path / "shadow-system.img").string();
  const std::string shadow_data = (dir.path / "shadow-data.img").string();
  CreateSparseFile(shadow_sys, parts[1].length);
  CreateSparseFile(shadow_data, parts[2].length);
  WriteRandomBlocks(shadow_sys, kBlock, {0, 3, 5, 60}, 21);
  WriteRandomBlocks(shadow_data, kBlock, {0, 9, 127}, 22);
  const std::string vol_sys = "\\\\?\\Volume{5a5a0001-0000-0000-0000-000000000001}\\";
  const std::string vol_data = "\\\\?\\Volume{5a5a0002-0000-0000-0000-000000000002}\\";

  // What a restore must hold: the live disk with the volumes replaced by their shadows.
  auto expected_image = [&] {
    std::string img = ReadWhole(live);
    REQUIRE(img.size() == kDiskSize);
    img.replace(parts[1].offset, parts[1].length, ReadWhole(shadow_sys));
    img.replace(parts[2].offset, parts[2].length, ReadWhole(shadow_data));
    return img;
  };
  REQUIRE(expected_image() != ReadWhole(live));  // the shadows really differ from the live disk

  Vault vault((dir.path / "vault").string());
  vault.Start();
  ClientOptions client;
  client.url = vault.url();
  client.ca_file = vault.ca();
  client.token = vault.token();
  auto count_points = [&]() -> size_t {
    auto vc = agent::VaultClient::Create(client);
    REQUIRE(vc.ok());
    auto rps = (*vc)->ListRecoveryPoints("winvm");
    REQUIRE_MESSAGE(rps.ok(), rps.status().ToString());
    return rps->size();
  };
  auto restore = [&](const std::string& rp, const std::string& to) {
    agent::RestoreOptions ro;
    ro.client = client;
    ro.recovery_point = rp;
    ro.targets = {to};
    ro.progress = false;
    auto r = agent::RunRestore(ro);
    REQUIRE_MESSAGE(r.ok(), r.status().ToString());
    return ReadWhole(to);
  };

  FakeVssWorld w;
  w.shadow_devices = {{vol_sys, shadow_sys}, {vol_data, shadow_data}};
  std::vector<platform::VssDiskVolume> volumes = {
      {vol_sys, {{parts[1].offset, parts[1].length}}, 0},
      {vol_data, {{parts[2].offset, parts[2].length}}, 0}};
  agent::BackupOptions o;
  o.client = client;
  o.item = "winvm";
  o.disks = {drive};
  o.state_dir = (dir.path / "state").string();
  o.progress = false;
  o.block_size = kBlock;
  o.consistency = VssConsistency(w, dir, o.disks);
  o.consistency.runtime_dir = (dir.path / "run").string();
  o.consistency.vss_disk_volumes =
      [&](const std::string& disk) -> Result<std::vector<platform::VssDiskVolume>> {
    if (disk != drive) return Status::NotFound("no such drive " + disk);
    return volumes;
  };

  SUBCASE("full, then an incremental of the changed blocks; both restore as composed") {
    auto full = agent::RunBackup(o);
    REQUIRE_MESSAGE(full.ok(), full.status().ToString());
    CHECK(full->consistency == "application");  // the writers' level, as for a volume
    CHECK(w.Called("AddToSnapshotSet " + vol_sys));
    CHECK(w.Called("AddToSnapshotSet " + vol_data));
    CHECK(w.Called("BackupComplete"));
    CHECK(w.live_snapshots.empty());
    REQUIRE(full->disks.size() == 1);
    CHECK(full->disks[0].mode == "full");
    CHECK(full->disks[0].size_bytes == kDiskSize);
    CHECK(full->disks[0].read_path == drive);

    // The evidence: which ranges are point in time (volumes, from which device), which live.
    json ev = full->evidence["disks"][0];  // a copy: a missing field reads as null
    CHECK(ev["point_in_time"] == false);
    REQUIRE(ev["volumes"].size() == 2);
    CHECK(ev["volumes"][0]["volume"] == vol_sys);
    CHECK(ev["volumes"][0]["device"] == shadow_sys);
    CHECK(ev["volumes"][0]["extents"][0]["disk_offset"] == parts[1].offset);
    CHECK(ev["volumes"][1]["device"] == shadow_data);
    CHECK(ev["live_bytes"] == kDiskSize - parts[1].length - parts[2].length);
    CHECK(ev["shadow_bytes"] == parts[1].length + parts[2].length);
    REQUIRE(ev["live_ranges"].size() == 2);  // table + ESP, then the gap + GPT backup
    CHECK(ev["live_ranges_count"] == 2);
    CHECK(ev["live_ranges"][0] == json{{"begin", 0}, {"end", parts[1].offset}});
    CHECK(ev["live_ranges"][1] ==
          json{{"begin", parts[2].offset + parts[2].length}, {"end", kDiskSize}});
    // The recovery point stored in the vault carries the same evidence.
    {
      auto vc = agent::VaultClient::Create(client);
      REQUIRE(vc.ok());
      auto rp = (*vc)->GetRecoveryPoint(full->recovery_point);
      REQUIRE_MESSAGE(rp.ok(), rp.status().ToString());
      const json& stored = (*rp)["report"]["consistency_evidence"]["disks"][0];
      CHECK(stored["live_ranges"] == ev["live_ranges"]);
      CHECK(stored["volumes"] == ev["volumes"]);
      CHECK(stored["point_in_time"] == false);
    }

    const std::string restored1 = (dir.path / "restored1.img").string();
    const std::string expected1 = expected_image();
    const std::string got1 = restore(full->recovery_point, restored1);
    REQUIRE(got1.size() == kDiskSize);
    // The volumes as the shadow copies had them (point in time), not as the disk has them now.
    CHECK(got1.substr(parts[1].offset, parts[1].length) == ReadWhole(shadow_sys));
    CHECK(got1.substr(parts[2].offset, parts[2].length) == ReadWhole(shadow_data));
    CHECK(got1.substr(parts[1].offset, parts[1].length) !=
          ReadWhole(live).substr(parts[1].offset, parts[1].length));
    // Everything else as the live disk: boot code, protective MBR, GPT, ESP, gaps, backup GPT.
    const std::string now = ReadWhole(live);
    CHECK(got1.substr(0, 440) == boot);
    CHECK(got1.substr(0, parts[1].offset) == now.substr(0, parts[1].offset));
    const uint64_t tail = parts[2].offset + parts[2].length;
    CHECK(got1.substr(tail) == now.substr(tail));
    CHECK(got1.substr(kDiskSize - 33 * sector) == now.substr(kDiskSize - 33 * sector));
    CHECK(got1 == expected1);
    CHECK(PartitionDump(restored1) == PartitionDump(live));
    CHECK(Sh("sfdisk --verify '" + restored1 + "'").find("No errors detected") !=
          std::string::npos);

    // Incremental: one block of the data volume changed in its (new) shadow copy; one block
    // of the ESP changed on the disk; one block of the system partition changed on the disk
    // only (after the snapshot: not part of the point in time, so not read).
    WriteRandomBlocks(shadow_data, kBlock, {40}, 31);
    WriteRandomBlocks(live, kBlock, blocks_of(parts[0], {20}), 32);
    WriteRandomBlocks(live, kBlock, blocks_of(parts[1], {50}), 33);
    FakeVssWorld w2;
    w2.shadow_devices = w.shadow_devices;
    o.consistency.vss_factory = w2.Factory();
    auto incr = agent::RunBackup(o);
    REQUIRE_MESSAGE(incr.ok(), incr.status().ToString());
    CHECK(incr->disks[0].mode == "incremental");
    CHECK(incr->disks[0].parent == full->recovery_point);
    CHECK(incr->disks[0].blocks_changed == 2);
    CHECK(incr->disks[0].blocks_uploaded == 2);
    CHECK(w2.Called("BackupComplete"));
    const std::string got2 = restore(incr->recovery_point, (dir.path / "restored2.img").string());
    CHECK(got2 == expected_image());
    CHECK(got2.substr(parts[2].offset, parts[2].length) == ReadWhole(shadow_data));
    CHECK(count_points() == 2);
  }
  SUBCASE("a spanned volume: a clear error before any snapshot, nothing committed") {
    volumes[1].extents_on_other_disks = 1;  // the data volume continues on another disk
    auto r = agent::RunBackup(o);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == Code::kInvalidArgument);
    CHECK(r.status().phase() == "vss volumes");
    CHECK(r.status().cause().find(vol_data + " has 2 extents") != std::string::npos);
    CHECK(r.status().fix() == "back up the volume " + vol_data + " itself (--disk " + vol_data +
                                  ") instead of the physical drive " + drive);
    CHECK(w.instances == 0);  // no snapshot set, no writer frozen
    CHECK(count_points() == 0);
  }
  SUBCASE("two extents of one volume on the disk: refused the same way") {
    volumes = {{vol_sys, {{parts[1].offset, MiB}, {parts[2].offset, MiB}}, 0}};
    auto r = agent::RunBackup(o);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().cause().find(vol_sys + " has 2 extents (2 on " + drive) != std::string::npos);
    CHECK(r.status().ToString().find("back up the volume " + vol_sys + " itself") !=
          std::string::npos);
    CHECK(count_points() == 0);
  }
}
#endif

}  // namespace
}  // namespace vmsnap::test

#include "vault/catalog.hpp"

#include <algorithm>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "platform/env.hpp"

namespace vmsnap::vault {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string RandomHex(int bytes) {
  thread_local std::mt19937_64 rng(std::random_device{}());
  static const char* kDigits = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < bytes; ++i) {
    auto v = static_cast<unsigned>(rng() & 0xff);
    s.push_back(kDigits[v >> 4]);
    s.push_back(kDigits[v & 15]);
  }
  return s;
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// "20261122T015200123Z-ab12": sorts by creation time.
std::string NewRpId(int64_t ms) {
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%dT%H%M%S", &tm);
  char millis[8];
  std::snprintf(millis, sizeof millis, "%03d", static_cast<int>(ms % 1000));
  return std::string(buf) + millis + "Z-" + RandomHex(2);
}

bool ValidSessionId(const std::string& s) {
  return s.size() == 32 && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

bool ValidRpId(const std::string& s) {
  return !s.empty() && s.size() <= 64 && s[0] != '.' &&
         s.find_first_not_of("0123456789TZabcdef-") == std::string::npos;
}

}  // namespace

Status ValidateItemName(const std::string& item) {
  if (item.empty() || item.size() > 128 || item[0] == '.' ||
      item.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") !=
          std::string::npos)
    return Status::InvalidArgument("item name '" + item + "' is not valid",
                                   "use 1-128 letters, digits, '.', '_' or '-'");
  return Status::Ok();
}

json RecoveryPoint::ToJson() const {
  json disks_json = json::array();
  for (const auto& d : disks)
    disks_json.push_back({{"index", d.index},
                          {"key", d.key},
                          {"size_bytes", d.size_bytes},
                          {"block_size", d.block_size},
                          {"parent", d.parent},
                          {"full", d.parent.empty()},
                          {"manifest_entries", d.manifest_entries},
                          {"stats", d.stats}});
  return {{"id", id},
          {"item", item},
          {"session", session},
          {"consistency", consistency},
          {"created_unix_ms", created_unix_ms},
          {"disks", disks_json},
          {"report", report},
          {"origin", origin}};
}

Result<RecoveryPoint> RecoveryPoint::FromJson(const json& j) {
  try {
    RecoveryPoint rp;
    rp.id = j.at("id");
    rp.item = j.at("item");
    rp.session = j.value("session", "");
    rp.consistency = j.at("consistency");
    rp.created_unix_ms = j.at("created_unix_ms");
    for (const auto& d : j.at("disks")) {
      DiskRecord r;
      r.index = d.at("index");
      r.key = d.at("key");
      r.size_bytes = d.at("size_bytes");
      r.block_size = d.at("block_size");
      r.parent = d.value("parent", "");
      r.manifest_entries = d.value("manifest_entries", 0);
      r.stats = d.value("stats", json::object());
      rp.disks.push_back(std::move(r));
    }
    rp.report = j.value("report", json::object());
    rp.origin = j.value("origin", json::object());
    return rp;
  } catch (const std::exception& e) {
    return Status::Corruption(std::string("recovery point metadata is invalid: ") + e.what());
  }
}

// The resolved map of one disk, merged from its chain of manifest files as it is read: the
// full manifest and the deltas on top of it, oldest first. Per index the newest manifest that
// lists it wins, and a winning zero entry leaves the index out (ApplyDelta's result, one delta
// after the other). A heap orders the manifests' current entries, so each entry costs
// O(log chain length). Memory: each reader's buffer and a batch of kBatch entries per
// manifest. The files must have been checked whole before (OpenResolvedMap does). One thread
// at a time.
class ResolvedMapCursor {
 public:
  // `keep_zero_entries`: a winning zero entry is handed out instead of leaving its index out
  // (merging two deltas into one delta, for RemovePoint).
  explicit ResolvedMapCursor(std::vector<std::unique_ptr<ManifestReader>> chain,
                             bool keep_zero_entries = false)
      : keep_zero_(keep_zero_entries) {
    for (auto& r : chain) levels_.push_back({std::move(r), {}, 0});
  }
  const ManifestHeader& geometry() const { return levels_.front().reader->header(); }
  // An upper bound of the map's entries: all entries of all its manifests.
  uint64_t entries_at_most() const {
    uint64_t n = 0;
    for (const auto& l : levels_) n += l.reader->header().entry_count;
    return n;
  }
  // Where the next Read continues without passing anything: one past the last index read
  // (after the map's end too, so that a page asked from there comes back empty at once).
  uint64_t position() const { return next_; }

  // Appends to `out` the resolved entries with index >= `from` (passing smaller ones), until
  // `out` holds `limit` or the map ends.
  Status Read(uint64_t from, uint64_t limit, std::vector<ManifestEntry>& out) {
    if (!started_) {
      for (size_t i = 0; i < levels_.size(); ++i) VMSNAP_RETURN_IF_ERROR(Push(i));
      started_ = true;
    }
    while (out.size() < limit && !heap_.empty()) {
      const Head top = heap_.front();  // the smallest index; of equal ones, the newest level
      const ManifestEntry winner = Current(top.level);
      // Every level at this index moves on; the newest one's entry is the map's.
      while (!heap_.empty() && heap_.front().index == top.index) {
        const size_t level = heap_.front().level;
        std::pop_heap(heap_.begin(), heap_.end(), Later);
        heap_.pop_back();
        ++levels_[level].at;
        VMSNAP_RETURN_IF_ERROR(Push(level));
      }
      next_ = top.index + 1;
      if (top.index >= from && (winner.id || keep_zero_)) out.push_back(winner);
    }
    return Status::Ok();
  }

 private:
  static constexpr size_t kBatch = 4096;
  struct Level {
    std::unique_ptr<ManifestReader> reader;
    std::vector<ManifestEntry> batch;
    size_t at = 0;
  };
  struct Head {
    uint64_t index;
    size_t level;
  };
  // Heap order (std heaps keep the largest in front): smaller index first, then newer level.
  static bool Later(const Head& a, const Head& b) {
    return a.index != b.index ? a.index > b.index : a.level < b.level;
  }
  const ManifestEntry& Current(size_t level) const {
    return levels_[level].batch[levels_[level].at];
  }
  // Puts `level`'s current entry on the heap, reading its next batch first if needed.
  Status Push(size_t level) {
    Level& l = levels_[level];
    if (l.at == l.batch.size()) {
      VMSNAP_RETURN_IF_ERROR(l.reader->Next(l.batch, kBatch));
      l.at = 0;
      if (l.batch.empty()) return Status::Ok();  // this manifest has ended
    }
    heap_.push_back({l.batch[l.at].index, level});
    std::push_heap(heap_.begin(), heap_.end(), Later);
    return Status::Ok();
  }

  std::vector<Level> levels_;
  std::vector<Head> heap_;
  uint64_t next_ = 0;
  bool started_ = false;
  bool keep_zero_ = false;
};

Catalog::~Catalog() = default;

Catalog::Catalog(std::string data_dir, BlockStore* store, NowFn now)
    : rps_(data_dir + "/rps"),
      staging_(data_dir + "/staging"),
      store_(store),
      now_(std::move(now)) {}

int64_t Catalog::Now() const {
  return now_ ? now_() : NowMs();
}

Status Catalog::Open() {
  std::error_code ec;
  for (const auto& d : {rps_, staging_}) {
    fs::create_directories(d, ec);
    if (ec) return Status::IoError("create " + d + ": " + ec.message());
  }
  for (auto it = fs::directory_iterator(rps_, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (name.rfind(".tmp-", 0) == 0 || name.rfind(".trash-", 0) == 0)
      fs::remove_all(it->path(), ec);
  }
  for (const auto& rp : List("")) last_created_ms_ = std::max(last_created_ms_, rp.created_unix_ms);
  return Status::Ok();
}

Result<std::string> Catalog::CreateSession(const std::string& item, int64_t keepalive_ms) {
  VMSNAP_RETURN_IF_ERROR(ValidateItemName(item));
  std::string id = RandomHex(16);
  std::error_code ec;
  fs::create_directories(SessionDir(id), ec);
  if (ec)
    return Status::IoError("create session directory " + SessionDir(id) + ": " + ec.message(),
                           "check free space and permissions on the vault's disk");
  json meta = {{"item", item}, {"created_unix_ms", Now()}, {"created_real_ms", NowMs()}};
  if (keepalive_ms > 0) meta["keepalive_ms"] = keepalive_ms;
  VMSNAP_RETURN_IF_ERROR(
      platform::Env::Default()->WriteFileAtomic(SessionDir(id) + "/session.json", meta.dump()));
  return id;
}

Status Catalog::KeepSessionAlive(const std::string& session) {
  std::lock_guard lock(mu_);  // not while DeleteSession removes its directory
  VMSNAP_RETURN_IF_ERROR(SessionItem(session).status());
  // A file of its own, replaced whole: session.json is never rewritten.
  return platform::Env::Default()->WriteFileAtomic(SessionDir(session) + "/alive",
                                                   std::to_string(NowMs()));
}

Result<std::string> Catalog::SessionItem(const std::string& session) const {
  if (!ValidSessionId(session))
    return Status::NotFound("backup session " + session + " does not exist",
                            "start the backup again");
  auto text = platform::Env::Default()->ReadFile(SessionDir(session) + "/session.json");
  if (!text.ok())
    return Status::NotFound("backup session " + session + " does not exist",
                            "start the backup again");
  json meta = json::parse(*text, nullptr, false);
  if (!meta.is_object()) return Status::Corruption("session " + session + " metadata is invalid");
  return meta.value("item", "");
}

Status Catalog::PutManifest(const std::string& session, int disk_index, std::string_view data) {
  if (!ValidSessionId(session) || !fs::exists(SessionDir(session)))
    return Status::NotFound("backup session " + session + " does not exist",
                            "start the backup again");
  if (disk_index < 0 || disk_index > 255) return Status::InvalidArgument("bad disk index");
  auto m = DecodeManifest(data);
  if (!m.ok()) return m.take_status();
  return platform::Env::Default()->WriteFileAtomic(
      SessionDir(session) + "/disk-" + std::to_string(disk_index) + ".manifest", data);
}

namespace {
// Reads the manifest file at `path` piece by piece and checks it whole; `each` (if given) sees
// every batch of entries, `copy_to` (if given) every byte. Returns the header.
Result<ManifestHeader> ScanManifestFile(
    const std::string& path, platform::AtomicFileWriter* copy_to,
    const std::function<Status(std::span<const ManifestEntry>)>& each) {
  ManifestReader::Tee tee;
  if (copy_to) tee = [copy_to](std::string_view bytes) { return copy_to->Append(bytes); };
  auto reader = ManifestReader::OpenFile(path, true, std::move(tee));
  if (!reader.ok()) return reader.take_status();
  std::vector<ManifestEntry> batch;
  for (;;) {
    VMSNAP_RETURN_IF_ERROR((*reader)->Next(batch, 4096));
    if (batch.empty()) return (*reader)->header();
    if (each) VMSNAP_RETURN_IF_ERROR(each(batch));
  }
}

Status CheckManifestFile(const std::string& path, platform::AtomicFileWriter* copy_to = nullptr) {
  return ScanManifestFile(path, copy_to, nullptr).status();
}

Status CheckSessionDisk(const std::string& dir, bool valid_id, int disk_index,
                        const std::string& session) {
  if (!valid_id || !fs::exists(dir))
    return Status::NotFound("backup session " + session + " does not exist",
                            "start the backup again");
  if (disk_index < 0 || disk_index > 255) return Status::InvalidArgument("bad disk index");
  return Status::Ok();
}
}  // namespace

Status Catalog::PutManifestPart(const std::string& session, int disk_index, uint64_t offset,
                                std::string_view data) {
  const bool valid = ValidSessionId(session);
  const std::string dir = valid ? SessionDir(session) : "";
  VMSNAP_RETURN_IF_ERROR(CheckSessionDisk(dir, valid, disk_index, session));
  if (offset + data.size() > kMaxManifestBytes)
    return Status::InvalidArgument(
        "manifest larger than the vault's limit of " + std::to_string(kMaxManifestBytes) + " bytes",
        "back up with a larger --block-size (the next backup is then a full one)");
  const std::string part = dir + "/disk-" + std::to_string(disk_index) + ".manifest.partial";
  std::lock_guard lock(parts_mu_);
  std::error_code ec;
  const uint64_t have = fs::exists(part, ec) ? fs::file_size(part, ec) : 0;
  if (ec) return Status::IoError("size of " + part + ": " + ec.message());
  if (offset > have)
    return Status::Error(Code::kConflict,
                         "manifest part at offset " + std::to_string(offset) + " but only " +
                             std::to_string(have) + " bytes of it were received",
                         "send the parts in order, from offset " + std::to_string(have));
  {
    if (have == 0) std::ofstream(part, std::ios::binary).close();
    std::fstream f(part, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(data.data(), static_cast<std::streamsize>(data.size()));
    f.flush();
    if (!f) return Status::IoError("write manifest part to " + part, "check the vault's disk");
  }
  fs::resize_file(part, offset + data.size(), ec);
  if (ec) return Status::IoError("resize " + part + ": " + ec.message(), "check the vault's disk");
  return Status::Ok();
}

Status Catalog::SealManifest(const std::string& session, int disk_index, uint64_t size) {
  const bool valid = ValidSessionId(session);
  const std::string dir = valid ? SessionDir(session) : "";
  VMSNAP_RETURN_IF_ERROR(CheckSessionDisk(dir, valid, disk_index, session));
  const std::string name = dir + "/disk-" + std::to_string(disk_index) + ".manifest";
  const std::string part = name + ".partial";
  std::lock_guard lock(parts_mu_);
  std::error_code ec;
  const uint64_t have = fs::file_size(part, ec);
  if (ec) {
    // A repeated seal whose first answer was lost: the manifest is already in place.
    if (fs::file_size(name, ec) == size && !ec && CheckManifestFile(name).ok()) return Status::Ok();
    return Status::Error(Code::kConflict,
                         "no manifest parts were received for disk " + std::to_string(disk_index),
                         "send the parts, then seal");
  }
  if (have != size)
    return Status::Error(Code::kConflict,
                         "manifest of disk " + std::to_string(disk_index) + " has " +
                             std::to_string(have) + " bytes, the seal says " + std::to_string(size),
                         "resend the parts from offset " + std::to_string(have));
  // One pass: the parts are read piece by piece, checked, and copied to the manifest's new
  // file, which replaces the disk's manifest only once all of it checked out.
  auto writer = platform::Env::Default()->CreateFileAtomic(name);
  if (!writer.ok()) return writer.take_status();
  if (Status st = CheckManifestFile(part, writer->get()); !st.ok()) {
    if (st.code() == Code::kCorruption) fs::remove(part, ec);
    return st;
  }
  VMSNAP_RETURN_IF_ERROR((*writer)->Commit());
  fs::remove(part, ec);
  return Status::Ok();
}

Result<RecoveryPoint> Catalog::Commit(const std::string& session, const json& body) {
  auto* env = platform::Env::Default();
  std::lock_guard lock(mu_);
  if (!ValidSessionId(session) || !fs::exists(SessionDir(session)))
    return Status::NotFound("backup session " + session + " does not exist",
                            "start the backup again");
  const std::string dir = SessionDir(session);
  if (auto done = env->ReadFile(dir + "/committed"); done.ok()) return Get(*done);
  // A crash between publishing and writing "committed" must not publish the session twice.
  for (auto& existing : List(""))
    if (existing.session == session) return existing;
  auto meta_text = env->ReadFile(dir + "/session.json");
  if (!meta_text.ok()) return meta_text.take_status();
  json meta = json::parse(*meta_text, nullptr, false);
  RecoveryPoint rp;
  rp.item = meta.value("item", "");
  rp.session = session;
  rp.created_unix_ms = std::max(Now(), last_created_ms_ + 1);
  rp.id = NewRpId(rp.created_unix_ms);
  if (!body.is_object() || !body.contains("disks") || !body["disks"].is_array() ||
      body["disks"].empty() || !body.value("consistency", json()).is_string())
    return Status::InvalidArgument("commit needs 'consistency' and a non-empty 'disks' list");
  rp.consistency = body["consistency"];
  rp.report = body.value("report", json::object());
  rp.origin = body.value("origin", json::object());
  // The point is assembled in DATA/rps/.tmp-<id>/ and published by renaming that directory;
  // every early return removes it.
  const std::string tmp = rps_ + "/.tmp-" + rp.id;
  std::error_code ec;
  fs::create_directories(tmp, ec);
  if (ec) return Status::IoError("create " + tmp + ": " + ec.message()).InPhase("commit");
  struct Unpublished {
    std::string dir;
    bool published = false;
    ~Unpublished() {
      std::error_code ignored;
      if (!published) fs::remove_all(dir, ignored);
    }
  } unpublished{tmp};
  for (const auto& d : body["disks"]) {
    DiskRecord rec;
    if (!d.is_object() || !d.value("index", json()).is_number_integer() ||
        !d.value("key", json()).is_string())
      return Status::InvalidArgument("each disk needs 'index' and 'key'");
    rec.index = d["index"];
    rec.key = d["key"];
    rec.stats = d.value("stats", json::object());
    const std::string name = "disk-" + std::to_string(rec.index) + ".manifest";
    // One pass over the staged manifest, piece by piece: checked whole, every referenced block
    // looked up, and copied into the point's directory.
    auto writer = env->CreateFileAtomic(tmp + "/" + name);
    if (!writer.ok()) return std::move(writer.take_status()).InPhase("commit");
    uint64_t missing = 0;
    std::string first_missing;
    std::vector<BlockId> ids;  // one piece's, looked up together
    auto m = ScanManifestFile(dir + "/" + name, writer->get(),
                              [&](std::span<const ManifestEntry> entries) {
                                ids.clear();
                                for (const auto& e : entries)
                                  if (e.id) ids.push_back(*e.id);
                                const BlockStore::Absent absent = store_->FindAbsent(ids);
                                if (absent.count && !missing) first_missing = absent.first.Hex();
                                missing += absent.count;
                                return Status::Ok();
                              });
    if (!m.ok()) {
      if (m.status().code() == Code::kNotFound)
        return Status::InvalidArgument("no manifest was uploaded for disk " +
                                       std::to_string(rec.index));
      return m.take_status();
    }
    rec.size_bytes = m->disk_size;
    rec.block_size = m->block_size;
    rec.parent = m->parent;
    rec.manifest_entries = m->entry_count;
    if (!m->is_full()) {
      auto parent = Get(m->parent);
      if (!parent.ok())
        return Status::Error(
            Code::kConflict,
            "parent recovery point " + m->parent + " of disk " + rec.key + " does not exist",
            "rerun the backup; the agent will send a full manifest");
      auto pd = std::find_if(parent->disks.begin(), parent->disks.end(),
                             [&](const DiskRecord& p) { return p.key == rec.key; });
      if (parent->item != rp.item || pd == parent->disks.end() ||
          pd->size_bytes != rec.size_bytes || pd->block_size != rec.block_size)
        return Status::Error(Code::kConflict,
                             "parent recovery point " + m->parent + " has no disk matching " +
                                 rec.key + " with the same geometry",
                             "rerun the backup; the agent will send a full manifest");
    }
    if (missing)
      return Status::Error(Code::kConflict,
                           std::to_string(missing) + " blocks referenced by disk " + rec.key +
                               " are not in the vault (first: " + first_missing + ")",
                           "rerun the backup; it uploads only what the vault is missing");
    if (Status st = (*writer)->Commit(); !st.ok()) return std::move(st).InPhase("commit");
    rp.disks.push_back(std::move(rec));
  }
  // The blocks' index rows become durable before the point that refers to them is published.
  if (Status st = store_->SyncIndex(); !st.ok())
    return std::move(st).InPhase("commit").WithFix("check the vault's disk");
  if (Status st = env->WriteFileAtomic(tmp + "/rp.json", rp.ToJson().dump(2)); !st.ok())
    return std::move(st).InPhase("commit");
  fs::rename(tmp, RpDir(rp.id), ec);
  if (ec) return Status::IoError("publish recovery point: " + ec.message()).InPhase("commit");
  unpublished.published = true;
  VMSNAP_RETURN_IF_ERROR(env->SyncDir(rps_));
  last_created_ms_ = rp.created_unix_ms;
  // Remember the outcome so that a retried commit returns the same recovery point.
  VMSNAP_RETURN_IF_ERROR(env->WriteFileAtomic(dir + "/committed", rp.id));
  return rp;
}

std::vector<RecoveryPoint> Catalog::List(const std::string& item) const {
  std::vector<RecoveryPoint> out;
  std::error_code ec;
  std::vector<std::string> ids;
  for (auto it = fs::directory_iterator(rps_, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (!name.empty() && name[0] != '.') ids.push_back(name);
  }
  std::sort(ids.begin(), ids.end());
  for (const auto& id : ids) {
    auto rp = Get(id);
    if (rp.ok() && (item.empty() || rp->item == item)) out.push_back(std::move(*rp));
  }
  return out;
}

Result<RecoveryPoint> Catalog::Get(const std::string& id) const {
  if (!ValidRpId(id))
    return Status::NotFound("recovery point '" + id + "' does not exist",
                            "list recovery points with 'vmsnap-agent list'");
  auto text = platform::Env::Default()->ReadFile(RpDir(id) + "/rp.json");
  if (!text.ok())
    return Status::NotFound("recovery point '" + id + "' does not exist",
                            "list recovery points with 'vmsnap-agent list'");
  json j = json::parse(*text, nullptr, false);
  if (j.is_discarded()) return Status::Corruption("rp.json of " + id + " is not JSON");
  return RecoveryPoint::FromJson(j);
}

Result<RecoveryPoint> Catalog::Latest(const std::string& item) const {
  auto all = List(item);
  if (all.empty()) return Status::NotFound("item '" + item + "' has no recovery point");
  return std::move(all.back());
}

Result<Manifest> Catalog::LoadManifest(const std::string& rp_id, int disk_index) const {
  auto data = platform::Env::Default()->ReadFile(RpDir(rp_id) + "/disk-" +
                                                 std::to_string(disk_index) + ".manifest");
  if (!data.ok()) return data.take_status();
  return DecodeManifest(*data);
}

Status Catalog::ForEachEntry(
    const std::string& rp_id, int disk_index,
    const std::function<Status(std::span<const ManifestEntry>)>& each) const {
  if (!ValidRpId(rp_id)) return Status::NotFound("recovery point '" + rp_id + "' does not exist");
  return ScanManifestFile(RpDir(rp_id) + "/disk-" + std::to_string(disk_index) + ".manifest",
                          nullptr, each)
      .status();
}

Result<std::unique_ptr<ResolvedMapCursor>> Catalog::OpenResolvedMap(const std::string& rp_id,
                                                                    int disk_index) const {
  std::shared_lock chain_lock(chain_mu_);
  // Walk the parents back to a full manifest. Each file is checked whole first, then opened
  // for the merge: both under the chain lock, so they are the same file (RemovePoint rewrites
  // manifests only under the exclusive lock, and an open file keeps its content after that).
  std::vector<std::unique_ptr<ManifestReader>> chain;
  std::string id = rp_id;
  std::string key;
  for (int depth = 0;; ++depth) {
    if (depth > 100000) return Status::Corruption("recovery point chain has a cycle");
    auto rp = Get(id);
    if (!rp.ok()) return rp.take_status();
    const DiskRecord* disk = nullptr;
    for (const auto& d : rp->disks)
      if ((key.empty() && d.index == disk_index) || (!key.empty() && d.key == key)) disk = &d;
    if (!disk)
      return Status::NotFound("recovery point " + id + " has no disk " +
                              (key.empty() ? std::to_string(disk_index) : key));
    key = disk->key;
    const std::string path = RpDir(id) + "/disk-" + std::to_string(disk->index) + ".manifest";
    VMSNAP_RETURN_IF_ERROR(CheckManifestFile(path));
    auto reader = ManifestReader::OpenFile(path, /*verify_checksum=*/false);
    if (!reader.ok()) return reader.take_status();
    const ManifestHeader& h = (*reader)->header();
    if (!chain.empty() && (h.disk_size != chain.back()->header().disk_size ||
                           h.block_size != chain.back()->header().block_size))
      return Status::InvalidArgument(
          "incremental manifest geometry differs from its parent: disk " + key +
          " of recovery point " + id);
    const bool full = h.is_full();
    id = h.parent;
    chain.push_back(std::move(*reader));
    if (full) break;
  }
  std::reverse(chain.begin(), chain.end());  // the full manifest first
  return std::make_unique<ResolvedMapCursor>(std::move(chain));
}

Result<Manifest> Catalog::ResolvedManifest(const std::string& rp_id, int disk_index) const {
  auto cursor = OpenResolvedMap(rp_id, disk_index);
  if (!cursor.ok()) return cursor.take_status();
  Manifest resolved;
  resolved.disk_size = (*cursor)->geometry().disk_size;
  resolved.block_size = (*cursor)->geometry().block_size;
  VMSNAP_RETURN_IF_ERROR((*cursor)->Read(0, UINT64_MAX, resolved.entries));
  return resolved;
}

Status Catalog::ForEachResolvedEntry(
    const std::string& rp_id, int disk_index,
    const std::function<Status(std::span<const ManifestEntry>)>& each) const {
  auto cursor = OpenResolvedMap(rp_id, disk_index);
  if (!cursor.ok()) return cursor.take_status();
  constexpr uint64_t kBatch = 4096;
  std::vector<ManifestEntry> batch;
  batch.reserve(kBatch);
  for (;;) {
    batch.clear();
    VMSNAP_RETURN_IF_ERROR((*cursor)->Read(0, kBatch, batch));
    if (batch.empty()) return Status::Ok();
    VMSNAP_RETURN_IF_ERROR(each(batch));
  }
}

Result<Manifest> Catalog::ResolvedManifestPage(const std::string& rp_id, int disk_index,
                                               uint64_t from, uint64_t limit) const {
  const std::string key = rp_id + "/" + std::to_string(disk_index);
  std::unique_ptr<ResolvedMapCursor> cursor;
  {
    std::lock_guard lock(page_mu_);  // taken out while in use: a cursor is for one thread
    auto it =
        std::find_if(paged_.begin(), paged_.end(), [&](const auto& p) { return p.first == key; });
    if (it != paged_.end()) {
      if (it->second->position() <= from) cursor = std::move(it->second);
      paged_.erase(it);
    }
  }
  std::error_code ec;
  if (cursor && !fs::exists(RpDir(rp_id), ec)) cursor.reset();  // removed since the last page
  if (!cursor) {
    auto opened = OpenResolvedMap(rp_id, disk_index);
    if (!opened.ok()) return opened.take_status();
    cursor = std::move(*opened);
  }
  Manifest page;
  page.disk_size = cursor->geometry().disk_size;
  page.block_size = cursor->geometry().block_size;
  // Reserved at once (growing by doubling would need up to twice the page): at most what the
  // chain holds and the agent's page size.
  page.entries.reserve(
      static_cast<size_t>(std::min({limit, cursor->entries_at_most(), uint64_t{1} << 20})));
  VMSNAP_RETURN_IF_ERROR(cursor->Read(from, limit, page.entries));
  if (page.entries.size() == limit) {  // a short page is the last one
    std::lock_guard lock(page_mu_);
    std::erase_if(paged_, [&](const auto& p) { return p.first == key; });  // a concurrent page's
    paged_.emplace(paged_.begin(), key, std::move(cursor));
    if (paged_.size() > kPagedMaps) paged_.pop_back();
  }
  return page;
}

namespace {

// Rewrites the manifest at `child_path` (a delta on top of the manifest at `base_path`) so that
// it no longer needs the base: "apply the base, then the child" as one manifest, relative to
// the base's parent — a full manifest if the base is full (zero entries then leave their index
// out), else a delta that keeps zero entries (the base's parent may hold data there). Both
// files are checked whole first, then merged piece by piece twice: once to count the entries
// (the header holds the count), once to encode them into the new file, which replaces the old
// one atomically. Returns the new header.
Result<ManifestHeader> MergeIntoChild(const std::string& base_path, const std::string& child_path,
                                      const std::string& child_id) {
  VMSNAP_RETURN_IF_ERROR(CheckManifestFile(base_path));
  VMSNAP_RETURN_IF_ERROR(CheckManifestFile(child_path));
  ManifestHeader merged;
  auto open = [&]() -> Result<std::unique_ptr<ResolvedMapCursor>> {
    std::vector<std::unique_ptr<ManifestReader>> pair;
    for (const std::string* path : {&base_path, &child_path}) {
      auto r = ManifestReader::OpenFile(*path, /*verify_checksum=*/false);
      if (!r.ok()) return r.take_status();
      pair.push_back(std::move(*r));
    }
    const ManifestHeader& base = pair[0]->header();
    const ManifestHeader& child = pair[1]->header();
    if (base.disk_size != child.disk_size || base.block_size != child.block_size)
      return Status::Corruption("geometry of " + child_id + " differs from its parent");
    merged = base;  // geometry and parent: the base's
    return std::make_unique<ResolvedMapCursor>(std::move(pair), !base.is_full());
  };
  constexpr uint64_t kPiece = 1 << 16;
  std::vector<ManifestEntry> piece;
  uint64_t count = 0;
  {
    auto cursor = open();
    if (!cursor.ok()) return cursor.take_status();
    do {
      piece.clear();
      VMSNAP_RETURN_IF_ERROR((*cursor)->Read(0, kPiece, piece));
      count += piece.size();
    } while (piece.size() == kPiece);
  }
  auto cursor = open();
  if (!cursor.ok()) return cursor.take_status();
  auto writer = platform::Env::Default()->CreateFileAtomic(child_path);
  if (!writer.ok()) return writer.take_status();
  ManifestEncoder enc(merged.disk_size, merged.block_size, merged.parent, count);
  do {
    piece.clear();
    VMSNAP_RETURN_IF_ERROR((*cursor)->Read(0, kPiece, piece));
    for (const auto& e : piece) enc.Add(e);
    VMSNAP_RETURN_IF_ERROR((*writer)->Append(enc.Take()));
  } while (piece.size() == kPiece);
  auto rest = enc.Finish();
  if (!rest.ok()) return rest.take_status();
  VMSNAP_RETURN_IF_ERROR((*writer)->Append(*rest));
  VMSNAP_RETURN_IF_ERROR((*writer)->Commit());
  merged.entry_count = count;
  return merged;
}

}  // namespace

Status Catalog::RemovePoint(const std::string& id) {
  auto* env = platform::Env::Default();
  std::lock_guard lock(mu_);
  std::unique_lock chain_lock(chain_mu_);
  auto victim = Get(id);
  if (!victim.ok()) return victim.take_status();
  for (auto& child : List(victim->item)) {
    bool changed = false;
    for (auto& disk : child.disks) {
      if (disk.parent != id) continue;
      const std::string child_path =
          RpDir(child.id) + "/disk-" + std::to_string(disk.index) + ".manifest";
      {
        auto delta = ManifestReader::OpenFile(child_path);  // the header is enough here
        if (!delta.ok()) return delta.take_status();
        if ((*delta)->header().parent != id)
          continue;  // rp.json and manifest disagree: trust the manifest
      }
      auto pd = std::find_if(victim->disks.begin(), victim->disks.end(),
                             [&](const DiskRecord& d) { return d.key == disk.key; });
      if (pd == victim->disks.end())
        return Status::Corruption("recovery point " + child.id + " names " + id +
                                  " as parent of disk " + disk.key + ", which it does not have");
      auto merged = MergeIntoChild(RpDir(id) + "/disk-" + std::to_string(pd->index) + ".manifest",
                                   child_path, child.id);
      if (!merged.ok()) return merged.take_status();
      disk.parent = merged->parent;
      disk.manifest_entries = merged->entry_count;
      changed = true;
    }
    if (!changed) continue;
    child.origin["merged"].push_back(id);
    VMSNAP_RETURN_IF_ERROR(
        env->WriteFileAtomic(RpDir(child.id) + "/rp.json", child.ToJson().dump(2)));
  }
  // Nothing names `id` any more: hide it atomically, then delete it.
  const std::string trash = rps_ + "/.trash-" + id;
  std::error_code ec;
  fs::rename(RpDir(id), trash, ec);
  if (ec) return Status::IoError("remove recovery point " + id + ": " + ec.message());
  VMSNAP_RETURN_IF_ERROR(env->SyncDir(rps_));
  fs::remove_all(trash, ec);
  return Status::Ok();
}

std::vector<SessionInfo> Catalog::ListSessions() const {
  auto* env = platform::Env::Default();
  std::vector<SessionInfo> out;
  std::error_code ec;
  for (auto it = fs::directory_iterator(staging_, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    SessionInfo s;
    s.id = it->path().filename().string();
    if (!ValidSessionId(s.id)) continue;
    auto text = env->ReadFile(SessionDir(s.id) + "/session.json");
    json meta = text.ok() ? json::parse(*text, nullptr, false) : json();
    if (meta.is_object()) {
      s.item = meta.value("item", "");
      s.created_unix_ms = meta.value("created_unix_ms", int64_t{0});
      s.created_real_ms = meta.value("created_real_ms", int64_t{0});
      s.keepalive_ms = meta.value("keepalive_ms", int64_t{0});
    }
    s.alive_real_ms = s.created_real_ms;
    if (s.keepalive_ms > 0)
      if (auto alive = env->ReadFile(SessionDir(s.id) + "/alive"); alive.ok()) {
        int64_t at = 0;
        std::istringstream(*alive) >> at;
        s.alive_real_ms = std::max(s.alive_real_ms, at);
      }
    s.committed = fs::exists(SessionDir(s.id) + "/committed", ec);
    out.push_back(std::move(s));
  }
  std::sort(out.begin(), out.end(), [](const SessionInfo& a, const SessionInfo& b) {
    return a.created_unix_ms < b.created_unix_ms;
  });
  return out;
}

Status Catalog::DeleteSession(const std::string& session) {
  if (!ValidSessionId(session)) return Status::InvalidArgument("bad session id");
  std::lock_guard lock(mu_);  // not while a commit of it runs
  std::error_code ec;
  fs::remove_all(SessionDir(session), ec);
  if (ec) return Status::IoError("remove session " + session + ": " + ec.message());
  return Status::Ok();
}

}  // namespace vmsnap::vault

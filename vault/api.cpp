#include "vault/api.hpp"

#include "common/bytes.hpp"
#include "common/cli_output.hpp"

#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <charconv>
#include <nlohmann/json.hpp>
#include <regex>

namespace vmsnap::vault {

using nlohmann::json;

namespace {

// A decimal u64 and nothing else.
bool ParseU64(const std::string& text, uint64_t& value) {
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  return ec == std::errc() && end == text.data() + text.size() && !text.empty();
}

HttpResponse Json(const json& j, int status = 200) {
  return HttpResponse{status, "application/json", j.dump()};
}
HttpResponse Binary(std::string body) {
  return HttpResponse{200, "application/octet-stream", std::move(body)};
}

bool TokenMatches(const std::string& header, const std::string& token) {
  const std::string prefix = "Bearer ";
  if (header.size() != prefix.size() + token.size() || header.rfind(prefix, 0) != 0) return false;
  return CRYPTO_memcmp(header.data() + prefix.size(), token.data(), token.size()) == 0;
}

}  // namespace

VaultApi::VaultApi(BlockStore* store, Catalog* catalog, ControlPlane* control, TestClock* clock,
                   std::string admin_token, const DiskSpaceReserve* reserve,
                   EmergencySpace* emergency)
    : store_(store),
      catalog_(catalog),
      control_(control),
      clock_(clock),
      token_(std::move(admin_token)),
      reserve_(reserve),
      emergency_(emergency) {}

namespace {
Status NotYours(const std::string& what) {
  return Status::NotFound(what + " does not exist for this machine",
                          "an agent can reach only its own recovery points");
}
json BodyJson(const HttpRequest& req) {
  json j = json::parse(req.body.empty() ? std::string("{}") : req.body, nullptr, false);
  return j.is_object() ? j : json();
}
}  // namespace

HttpResponse VaultApi::Handle(const HttpRequest& req) {
  counters_.requests++;
  if (req.path == "/v1/health") return Json({{"status", "ok"}, {"service", "vmsnap-vault"}});
  if (req.path == "/v1/enroll" && req.method == "POST" && control_) {
    json body = BodyJson(req);
    if (body.is_null() || !body.value("token", json()).is_string() ||
        !body.value("name", json()).is_string())
      return ErrorResponse(Status::InvalidArgument("enroll needs 'token' and 'name'"));
    auto r = control_->Enroll(body["token"], body["name"], body.value("disks", json::array()));
    if (!r.ok()) return ErrorResponse(std::move(r.take_status()).InPhase("register"));
    return Json(*r, 201);
  }
  Principal who;
  who.admin = TokenMatches(req.authorization, token_);
  if (!who.admin && control_ && req.authorization.rfind("Bearer ", 0) == 0) {
    if (auto agent = control_->AgentForToken(req.authorization.substr(7))) who.agent = *agent;
  }
  if (!who.admin && who.agent.empty()) {
    counters_.unauthorized++;
    spdlog::warn("rejected {} {}: missing or wrong access token", req.method, req.path);
    return ErrorResponse(
        Status::Error(Code::kUnauthenticated, "the access token is missing or wrong (HTTP 401)",
                      "pass the token the vault printed at first start (stored in DATA/token)"));
  }
  auto res = Route(req, who);
  if (!res.ok()) {
    const Status& st = res.status();
    if (st.code() == Code::kInternal || st.code() == Code::kIoError ||
        st.code() == Code::kCorruption)
      spdlog::error("{} {}: {}", req.method, req.path, st.ToString());
    else if (st.code() == Code::kResourceExhausted)  // the operator has to act
      spdlog::warn("{} {}: {}", req.method, req.path, st.ToString());
    else
      spdlog::info("{} {}: {}", req.method, req.path, st.ToString());
    return ErrorResponse(st);
  }
  return std::move(res).value();
}

Result<HttpResponse> VaultApi::Route(const HttpRequest& req, const Principal& who) {
  static const std::regex kSessionDisk(R"(^/v1/sessions/([0-9a-f]{32})/disks/([0-9]{1,3})$)");
  static const std::regex kSessionDiskPart(
      R"(^/v1/sessions/([0-9a-f]{32})/disks/([0-9]{1,3})/(part|seal)$)");
  static const std::regex kSessionCommit(R"(^/v1/sessions/([0-9a-f]{32})/commit$)");
  static const std::regex kSessionKeepalive(R"(^/v1/sessions/([0-9a-f]{32})/keepalive$)");
  static const std::regex kSession(R"(^/v1/sessions/([0-9a-f]{32})$)");
  static const std::regex kRp(R"(^/v1/rps/([^/]+)$)");
  static const std::regex kRpMap(R"(^/v1/rps/([^/]+)/disks/([0-9]{1,3})/map$)");
  static const std::regex kLatest(R"(^/v1/items/([^/]+)/latest$)");
  std::smatch m;
  const std::string& p = req.path;
  const bool get = req.method == "GET", post = req.method == "POST", put = req.method == "PUT";

  // An id list of at most kMaxIdsPerRequest ids (VMI1: 8 bytes of header, 32 per id).
  auto request_ids = [&]() -> Result<std::vector<BlockId>> {
    if (req.body.size() > 8 + 32 * kMaxIdsPerRequest)
      return Status::InvalidArgument(
          "a request naming " + std::to_string((req.body.size() - 8) / 32) +
              " block ids; the vault takes at most " + std::to_string(kMaxIdsPerRequest),
          "ask in parts of at most " + std::to_string(kMaxIdsPerRequest) + " ids");
    return DecodeIdList(req.body);
  };
  if (post && p == "/v1/blocks/missing") {
    auto ids = request_ids();
    if (!ids.ok()) return ids.take_status();
    std::vector<BlockId> missing;
    std::vector<bool> present = store_->HasForUpload(*ids);
    for (size_t i = 0; i < ids->size(); ++i)
      if (!present[i]) missing.push_back((*ids)[i]);
    return Binary(EncodeIdList(missing));
  }
  // Backup data is refused at the disk's reserve (sessions, blocks, manifests; not commits,
  // which need little and complete what was sent).
  auto admit = [&](uint64_t bytes) -> Result<DiskSpaceReserve::Ticket> {
    if (!reserve_) return DiskSpaceReserve::Ticket();
    return reserve_->Admit(bytes);
  };
  if (post && p == "/v1/blocks") {
    auto admitted = admit(req.body.size());  // held until the blocks are written
    if (!admitted.ok()) return admitted.take_status();
    auto blocks = DecodeBatchView(req.body);  // views into the body: no copy of the payloads
    if (!blocks.ok()) return blocks.take_status();
    auto stats = store_->Put(std::span<const BlockRecordView>(*blocks));
    if (!stats.ok()) return stats.take_status();
    counters_.blocks_received += stats->received;
    counters_.blocks_stored += stats->stored;
    counters_.bytes_stored += stats->bytes_stored;
    return Json({{"received", stats->received},
                 {"stored", stats->stored},
                 {"already_present", stats->already_present}});
  }
  if (post && p == "/v1/blocks/fetch") {
    auto ids = request_ids();
    if (!ids.ok()) return ids.take_status();
    // The packs hold VMB1 records: the answer is the batch header and the records as stored.
    ByteWriter header;
    header.bytes("VMB1");
    header.u32(static_cast<uint32_t>(ids->size()));
    std::string body = header.take();
    if (Status st = store_->AppendRecords(*ids, body); !st.ok()) return st;
    counters_.blocks_served += ids->size();
    return Binary(std::move(body));
  }
  if (p.rfind("/v1/admin/", 0) == 0) {
    if (!who.admin)
      return Status::Error(Code::kPermissionDenied, "only the vault administrator may call " + p,
                           "use the admin token (DATA/token) with the vmsnap command");
    auto r = RouteAdmin(req);
    // A disk full to its last block: the emergency space goes back to the filesystem and the
    // request runs once more. Every administrator's request may run again after failing: its
    // metadata transaction was rolled back, or (a cleanup) what it did stays done and it goes on.
    if (!r.ok() && r.status().code() == Code::kResourceExhausted && emergency_) {
      if (const uint64_t released = emergency_->Release(); released > 0) {
        spdlog::warn(
            "{} {}: {}; gave back the {} of emergency space ({}) and running it again: free "
            "space on the vault's disk, then run 'vmsnap cleanup --now' to set it aside again",
            req.method, p, r.status().cause(), HumanBytes(released), emergency_->path());
        r = RouteAdmin(req);
      }
    }
    if (r.ok() && req.method == "POST" && p == "/v1/admin/cleanup" && emergency_)
      emergency_->Ensure();
    return r;
  }
  if (p.rfind("/v1/agent/", 0) == 0) {
    if (who.admin || !control_)
      return Status::Error(Code::kPermissionDenied, p + " is for enrolled agents",
                           "enroll the agent with 'vmsnap-agent enroll'");
    return RouteAgent(req, who.agent);
  }
  auto owns = [&](const std::string& item) { return who.admin || item == who.agent; };
  if (post && p == "/v1/sessions") {
    json body = json::parse(req.body, nullptr, false);
    if (body.is_object() && !who.admin && !body.contains("item")) body["item"] = who.agent;
    if (!body.is_object() || !body.value("item", json()).is_string())
      return Status::InvalidArgument("session request needs an 'item' name");
    if (!owns(body["item"]))
      return Status::Error(Code::kPermissionDenied,
                           "this agent may back up only its own item '" + who.agent + "'",
                           "leave --item unset in the daemon's config");
    // An agent that will call keepalive at least every keepalive_ms (1 s to 1 h) while its
    // backup runs; without it the session holds cleanup back until it times out (24 h).
    int64_t keepalive_ms = 0;
    if (body.contains("keepalive_ms")) {
      const json& k = body["keepalive_ms"];
      if (!k.is_number_integer() || k.get<int64_t>() < 1000 || k.get<int64_t>() > 3600 * 1000)
        return Status::InvalidArgument("keepalive_ms must be a whole number from 1000 to 3600000");
      keepalive_ms = k.get<int64_t>();
    }
    if (auto admitted = admit(0); !admitted.ok()) return admitted.take_status();
    auto sid = catalog_->CreateSession(body["item"], keepalive_ms);
    if (!sid.ok()) return sid.take_status();
    return Json({{"session", *sid}}, 201);
  }
  if (req.method == "DELETE" && std::regex_match(p, m, kSession)) {
    // A failed backup gives up its session, so that cleanup need not wait for its timeout
    // before expiring the item's points. A committed session stays (a retried commit finds
    // it); so do its blocks (they count as missing to no one, and garbage collection frees
    // those no point uses). Never refused for space: it frees some.
    auto sessions = catalog_->ListSessions();
    auto it = std::find_if(sessions.begin(), sessions.end(),
                           [&](const SessionInfo& s) { return s.id == m[1]; });
    if (it == sessions.end()) return NotYours("backup session " + std::string(m[1]));
    if (!owns(it->item)) return NotYours("backup session " + std::string(m[1]));
    if (it->committed) return Json({{"abandoned", false}, {"committed", true}});
    VMSNAP_RETURN_IF_ERROR(catalog_->DeleteSession(m[1]));
    spdlog::info("backup session {} of item {} abandoned by its agent", it->id, it->item);
    return Json({{"abandoned", true}, {"committed", false}});
  }
  if ((put && std::regex_match(p, m, kSessionDisk)) ||
      ((put || post) && std::regex_match(p, m, kSessionDiskPart)) ||
      (post && std::regex_match(p, m, kSessionCommit)) ||
      (post && std::regex_match(p, m, kSessionKeepalive))) {
    auto item = catalog_->SessionItem(m[1]);
    if (!item.ok()) return item.take_status();
    if (!owns(*item)) return NotYours("backup session " + std::string(m[1]));
  }
  if (put && std::regex_match(p, m, kSessionDisk)) {
    auto admitted = admit(req.body.size());
    if (!admitted.ok()) return admitted.take_status();
    VMSNAP_RETURN_IF_ERROR(catalog_->PutManifest(m[1], std::stoi(m[2]), req.body));
    return Json({{"stored", true}});
  }
  if ((put || post) && std::regex_match(p, m, kSessionDiskPart)) {
    const bool part = m[3] == "part";
    if (part != put) return Status::InvalidArgument("use PUT .../part and POST .../seal");
    const char* key = part ? "offset" : "size";
    auto it = req.query.find(key);
    uint64_t value = 0;
    if (it == req.query.end() || !ParseU64(it->second, value))
      return Status::InvalidArgument(std::string("manifest ") + (part ? "part" : "seal") +
                                     " needs ?" + key + "=N");
    if (part) {
      auto admitted = admit(req.body.size());
      if (!admitted.ok()) return admitted.take_status();
      VMSNAP_RETURN_IF_ERROR(catalog_->PutManifestPart(m[1], std::stoi(m[2]), value, req.body));
      return Json({{"stored", true}, {"end", value + req.body.size()}});
    }
    VMSNAP_RETURN_IF_ERROR(catalog_->SealManifest(m[1], std::stoi(m[2]), value));
    return Json({{"stored", true}, {"bytes", value}});
  }
  if (post && std::regex_match(p, m, kSessionKeepalive)) {
    VMSNAP_RETURN_IF_ERROR(catalog_->KeepSessionAlive(m[1]));
    return Json({{"alive", true}});
  }
  if (post && std::regex_match(p, m, kSessionCommit)) {
    json body = json::parse(req.body, nullptr, false);
    if (body.is_discarded()) return Status::InvalidArgument("commit body is not JSON");
    auto rp = catalog_->Commit(m[1], body);
    if (!rp.ok()) return std::move(rp.take_status()).InPhase("commit");
    spdlog::info("committed recovery point {} of item {} ({} disks, {})", rp->id, rp->item,
                 rp->disks.size(), rp->consistency);
    return Json(rp->ToJson(), 201);
  }
  if (get && p == "/v1/rps") {
    auto it = req.query.find("item");
    std::string item = it == req.query.end() ? "" : it->second;
    if (!who.admin) item = who.agent;
    json list = json::array();
    for (const auto& rp : catalog_->List(item)) list.push_back(rp.ToJson());
    return Json({{"recovery_points", list}});
  }
  if (get && (std::regex_match(p, m, kRpMap) || std::regex_match(p, m, kRp)) && !who.admin) {
    auto rp = catalog_->Get(m[1]);
    if (!rp.ok() || !owns(rp->item)) return NotYours("recovery point " + std::string(m[1]));
  }
  if (get && std::regex_match(p, m, kRpMap)) {
    if (req.query.count("from") || req.query.count("limit")) {
      uint64_t from = 0, limit = 0;
      auto f = req.query.find("from"), l = req.query.find("limit");
      if ((f != req.query.end() && !ParseU64(f->second, from)) || l == req.query.end() ||
          !ParseU64(l->second, limit) || limit == 0)
        return Status::InvalidArgument("a map page needs ?limit=N (N > 0) and an optional ?from=I");
      auto page = catalog_->ResolvedManifestPage(m[1], std::stoi(m[2]), from, limit);
      if (!page.ok()) return page.take_status();
      return Binary(EncodeManifest(*page));
    }
    // Unpaged: the whole map in one answer, for maps of up to kMaxUnpagedMapEntries entries
    // (memory is bounded by that, not by the disk's size); a larger map must be paged.
    auto whole =
        catalog_->ResolvedManifestPage(m[1], std::stoi(m[2]), 0, kMaxUnpagedMapEntries + 1);
    if (!whole.ok()) return whole.take_status();
    if (whole->entries.size() > kMaxUnpagedMapEntries)
      return Status::InvalidArgument(
          "the map of disk " + std::string(m[2]) + " of recovery point " + std::string(m[1]) +
              " has more than " + std::to_string(kMaxUnpagedMapEntries) +
              " entries, too many for one answer",
          "ask for it in pages: ?from=0&limit=N, then from the last index + 1 (docs/PROTOCOL.md)");
    return Binary(EncodeManifest(*whole));
  }
  if (get && std::regex_match(p, m, kRp)) {
    auto rp = catalog_->Get(m[1]);
    if (!rp.ok()) return rp.take_status();
    return Json(rp->ToJson());
  }
  if (get && std::regex_match(p, m, kLatest)) {
    if (!owns(m[1])) return NotYours("item " + std::string(m[1]));
    auto rp = catalog_->Latest(m[1]);
    if (!rp.ok()) return rp.take_status();
    return Json(rp->ToJson());
  }
  if (get && p == "/v1/stats") {
    const auto reads = store_->read_counts();
    return Json({{"requests", counters_.requests.load()},
                 {"pack_reads", reads.reads},
                 {"pack_direct_reads", reads.direct},
                 {"pack_read_bytes", reads.bytes},
                 {"blocks_received", counters_.blocks_received.load()},
                 {"blocks_stored", counters_.blocks_stored.load()},
                 {"bytes_stored", counters_.bytes_stored.load()},
                 {"blocks_served", counters_.blocks_served.load()},
                 {"unauthorized", counters_.unauthorized.load()}});
  }
  return Status::NotFound("no API endpoint " + req.method + " " + p);
}

Result<HttpResponse> VaultApi::RouteAdmin(const HttpRequest& req) {
  static const std::regex kPolicy(R"(^/v1/admin/policies/([^/]+)$)");
  static const std::regex kVmAction(
      R"(^/v1/admin/vms/([^/]+)/(protect|backup|restore|unprotect|undelete|verify)$)");
  static const std::regex kRpRetain(R"(^/v1/admin/rps/([^/]+)/retain$)");
  static const std::regex kJob(R"(^/v1/admin/jobs/([0-9]+)$)");
  static const std::regex kJobCancel(R"(^/v1/admin/jobs/([0-9]+)/cancel$)");
  if (!control_) return Status::NotFound("the control plane is not enabled");
  std::smatch m;
  const std::string& p = req.path;
  const bool get = req.method == "GET", post = req.method == "POST";
  json body = BodyJson(req);
  if (body.is_null()) return Status::InvalidArgument("request body is not a JSON object");
  auto reply = [](Result<json> r, int status = 200) -> Result<HttpResponse> {
    if (!r.ok()) return r.take_status();
    return Json(*r, status);
  };
  if (post && p == "/v1/admin/enroll-tokens")
    return reply(control_->CreateEnrollToken(body.value("expires_s", int64_t{3600})), 201);
  if (get && p == "/v1/admin/vms") return reply(control_->ListVms());
  if (post && p == "/v1/admin/policies")
    return reply(control_->CreatePolicy(body.value("name", ""), body.value("schedule", ""),
                                        body.value("time_zone", "UTC"),
                                        body.value("retention", json::object())),
                 201);
  if (get && p == "/v1/admin/policies") return reply(control_->ListPolicies());
  if (std::regex_match(p, m, kPolicy)) {
    if (get) return reply(control_->GetPolicy(m[1]));
    if (req.method == "DELETE") return reply(control_->DeletePolicy(m[1]));
  }
  if (post && std::regex_match(p, m, kVmAction)) {
    if (m[2] == "protect") return reply(control_->Protect(m[1], body.value("policy", "")));
    if (m[2] == "unprotect") {
      const json& mode = body.value("delete_data", json());
      if (!mode.is_boolean())
        return Status::InvalidArgument("unprotect needs 'delete_data' (true or false)",
                                       "use --keep-data or --delete-data");
      return reply(control_->Unprotect(m[1], mode.get<bool>()));
    }
    if (m[2] == "undelete") return reply(control_->Undelete(m[1]));
    if (m[2] == "restore") {
      const json& targets = body.value("targets", json::array());
      if (!targets.is_array() || !body.value("recovery_point", json()).is_string())
        return Status::InvalidArgument("restore needs 'recovery_point' and a 'targets' list");
      return reply(control_->StartRestore(m[1], body["recovery_point"], body.value("disk", -1),
                                          targets.get<std::vector<std::string>>()),
                   201);
    }
    if (m[2] == "verify") {
      auto r = control_->Verify(m[1], body.value("rp", ""));
      if (!r.ok()) return std::move(r.take_status()).InPhase("verify");
      return Json(*r);
    }
    return reply(control_->StartBackup(m[1], body.value("retain_until_ms", int64_t{0})), 201);
  }
  if (get && p == "/v1/admin/jobs") {
    auto vm = req.query.find("vm");
    auto limit = req.query.find("limit");
    int n = 100;
    if (limit != req.query.end()) n = std::atoi(limit->second.c_str());
    return reply(control_->ListJobs(vm == req.query.end() ? "" : vm->second, n));
  }
  if (get && std::regex_match(p, m, kJob)) return reply(control_->GetJob(std::stoll(m[1])));
  if (post && std::regex_match(p, m, kJobCancel))
    return reply(control_->CancelJob(std::stoll(m[1])));
  if (get && p == "/v1/admin/dashboard") return reply(control_->Dashboard());
  if (get && p == "/v1/admin/verifications") {
    auto vm = req.query.find("vm");
    auto limit = req.query.find("limit");
    int n = 100;
    if (limit != req.query.end()) n = std::atoi(limit->second.c_str());
    return reply(control_->Verifications(vm == req.query.end() ? "" : vm->second, n));
  }
  if (post && p == "/v1/admin/cleanup") {
    auto r = control_->Cleanup();
    if (!r.ok()) return std::move(r.take_status()).InPhase("cleanup");
    return Json(*r);
  }
  if (get && p == "/v1/admin/rps") {
    auto vm = req.query.find("vm");
    if (vm == req.query.end() || vm->second.empty())
      return Status::InvalidArgument("GET /v1/admin/rps needs ?vm=NAME");
    return reply(control_->RecoveryPoints(vm->second));
  }
  if (post && std::regex_match(p, m, kRpRetain)) {
    const json& until = body.value("retain_until_ms", json());
    if (!until.is_number_integer())
      return Status::InvalidArgument("retain needs an integer 'retain_until_ms' (0: clear)");
    return reply(control_->RetainPoint(m[1], until.get<int64_t>()));
  }
  if (get && p == "/v1/admin/sessions") return reply(control_->Sessions());
  if (get && p == "/v1/admin/storage") {
    auto vm = req.query.find("vm");
    auto storage = control_->Storage(vm == req.query.end() ? "" : vm->second);
    if (storage.ok() && reserve_) {
      const auto disk = reserve_->Now();
      (*storage)["vault"]["disk"] = {
          {"available_bytes", disk.available_bytes},
          {"reserve_bytes", disk.reserve_bytes},
          {"headroom_bytes", disk.headroom_bytes},
          {"emergency_bytes", emergency_ ? emergency_->held_bytes() : uint64_t{0}}};
    }
    return reply(std::move(storage));
  }
  if (post && p == "/v1/admin/clock") {
    if (!clock_ || !clock_->enabled)
      return Status::Error(Code::kPermissionDenied, "the clock can only be set in test mode",
                           "start the vault with --test-clock (tests only)");
    clock_->now_ms = body.value("now_ms", int64_t{0});
    control_->Tick();
    return Json({{"now_ms", clock_->now_ms.load()}});
  }
  return Status::NotFound("no API endpoint " + req.method + " " + p);
}

Result<HttpResponse> VaultApi::RouteAgent(const HttpRequest& req, const std::string& agent) {
  static const std::regex kJobReport(R"(^/v1/agent/jobs/([0-9]+)/(progress|result)$)");
  std::smatch m;
  json body = BodyJson(req);
  if (body.is_null()) return Status::InvalidArgument("request body is not a JSON object");
  Result<json> r = Status::NotFound("no API endpoint " + req.method + " " + req.path);
  if (req.method == "POST" && req.path == "/v1/agent/poll") {
    r = control_->Poll(agent, body);
  } else if (req.method == "POST" && std::regex_match(req.path, m, kJobReport)) {
    r = m[2] == "progress" ? control_->JobProgress(agent, std::stoll(m[1]), body)
                           : control_->JobResult(agent, std::stoll(m[1]), body);
  }
  if (!r.ok()) return r.take_status();
  return Json(*r);
}

}  // namespace vmsnap::vault

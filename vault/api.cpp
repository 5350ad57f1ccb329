#include "vault/api.hpp"

#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>
#include <regex>

namespace vmsnap::vault {

using nlohmann::json;

namespace {

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

VaultApi::VaultApi(BlockStore* store, Catalog* catalog, std::string token)
    : store_(store), catalog_(catalog), token_(std::move(token)) {}

HttpResponse VaultApi::Handle(const HttpRequest& req) {
  counters_.requests++;
  if (req.path == "/v1/health") return Json({{"status", "ok"}, {"service", "vmsnap-vault"}});
  if (!TokenMatches(req.authorization, token_)) {
    counters_.unauthorized++;
    spdlog::warn("rejected {} {}: missing or wrong access token", req.method, req.path);
    return ErrorResponse(
        Status::Error(Code::kUnauthenticated, "the access token is missing or wrong (HTTP 401)",
                      "pass the token the vault printed at first start (stored in DATA/token)"));
  }
  auto res = Route(req);
  if (!res.ok()) {
    const Status& st = res.status();
    if (st.code() == Code::kInternal || st.code() == Code::kIoError ||
        st.code() == Code::kCorruption)
      spdlog::error("{} {}: {}", req.method, req.path, st.ToString());
    else
      spdlog::info("{} {}: {}", req.method, req.path, st.ToString());
    return ErrorResponse(st);
  }
  return std::move(res).value();
}

Result<HttpResponse> VaultApi::Route(const HttpRequest& req) {
  static const std::regex kSessionDisk(R"(^/v1/sessions/([0-9a-f]{32})/disks/([0-9]{1,3})$)");
  static const std::regex kSessionCommit(R"(^/v1/sessions/([0-9a-f]{32})/commit$)");
  static const std::regex kRp(R"(^/v1/rps/([^/]+)$)");
  static const std::regex kRpMap(R"(^/v1/rps/([^/]+)/disks/([0-9]{1,3})/map$)");
  static const std::regex kLatest(R"(^/v1/items/([^/]+)/latest$)");
  std::smatch m;
  const std::string& p = req.path;
  const bool get = req.method == "GET", post = req.method == "POST", put = req.method == "PUT";

  if (post && p == "/v1/blocks/missing") {
    auto ids = DecodeIdList(req.body);
    if (!ids.ok()) return ids.take_status();
    std::vector<BlockId> missing;
    for (const auto& id : *ids)
      if (!store_->Has(id)) missing.push_back(id);
    return Binary(EncodeIdList(missing));
  }
  if (post && p == "/v1/blocks") {
    auto blocks = DecodeBatch(req.body);
    if (!blocks.ok()) return blocks.take_status();
    auto stats = store_->Put(*blocks);
    if (!stats.ok()) return stats.take_status();
    counters_.blocks_received += stats->received;
    counters_.blocks_stored += stats->stored;
    counters_.bytes_stored += stats->bytes_stored;
    return Json({{"received", stats->received},
                 {"stored", stats->stored},
                 {"already_present", stats->already_present}});
  }
  if (post && p == "/v1/blocks/fetch") {
    auto ids = DecodeIdList(req.body);
    if (!ids.ok()) return ids.take_status();
    std::vector<EncodedBlock> out;
    out.reserve(ids->size());
    for (const auto& id : *ids) {
      auto b = store_->Get(id);
      if (!b.ok()) return b.take_status();
      out.push_back(std::move(*b));
    }
    counters_.blocks_served += out.size();
    return Binary(EncodeBatch(out));
  }
  if (post && p == "/v1/sessions") {
    json body = json::parse(req.body, nullptr, false);
    if (!body.is_object() || !body.value("item", json()).is_string())
      return Status::InvalidArgument("session request needs an 'item' name");
    auto sid = catalog_->CreateSession(body["item"]);
    if (!sid.ok()) return sid.take_status();
    return Json({{"session", *sid}}, 201);
  }
  if (put && std::regex_match(p, m, kSessionDisk)) {
    VMSNAP_RETURN_IF_ERROR(catalog_->PutManifest(m[1], std::stoi(m[2]), req.body));
    return Json({{"stored", true}});
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
    json list = json::array();
    for (const auto& rp : catalog_->List(it == req.query.end() ? "" : it->second))
      list.push_back(rp.ToJson());
    return Json({{"recovery_points", list}});
  }
  if (get && std::regex_match(p, m, kRpMap)) {
    auto manifest = catalog_->ResolvedManifest(m[1], std::stoi(m[2]));
    if (!manifest.ok()) return manifest.take_status();
    return Binary(EncodeManifest(*manifest));
  }
  if (get && std::regex_match(p, m, kRp)) {
    auto rp = catalog_->Get(m[1]);
    if (!rp.ok()) return rp.take_status();
    return Json(rp->ToJson());
  }
  if (get && std::regex_match(p, m, kLatest)) {
    auto rp = catalog_->Latest(m[1]);
    if (!rp.ok()) return rp.take_status();
    return Json(rp->ToJson());
  }
  if (get && p == "/v1/stats") {
    return Json({{"requests", counters_.requests.load()},
                 {"blocks_received", counters_.blocks_received.load()},
                 {"blocks_stored", counters_.blocks_stored.load()},
                 {"bytes_stored", counters_.bytes_stored.load()},
                 {"blocks_served", counters_.blocks_served.load()},
                 {"unauthorized", counters_.unauthorized.load()}});
  }
  return Status::NotFound("no API endpoint " + req.method + " " + p);
}

}  // namespace vmsnap::vault

#include "agent/vault_client.hpp"

namespace vmsnap::agent {

using nlohmann::json;

namespace {
const std::string kBinary = "application/octet-stream";

std::string UrlEncode(const std::string& s) {
  static const char* kDigits = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kDigits[c >> 4]);
      out.push_back(kDigits[c & 15]);
    }
  }
  return out;
}

Result<json> ParseJson(const HttpResponse& r) {
  json j = json::parse(r.body, nullptr, false);
  if (j.is_discarded()) return Status::Unavailable("the vault sent a response that is not JSON");
  return j;
}
}  // namespace

Result<std::unique_ptr<VaultClient>> VaultClient::Create(const ClientOptions& options) {
  auto http = HttpsClient::Create(options);
  if (!http.ok()) return http.take_status();
  return std::unique_ptr<VaultClient>(new VaultClient(std::move(*http)));
}

Result<json> VaultClient::CallJson(const std::string& method, const std::string& target,
                                   const json& body) {
  auto r = http_->Call(method, target, body.is_null() ? std::string() : body.dump());
  if (!r.ok()) return r.take_status();
  return ParseJson(*r);
}

Result<std::optional<json>> VaultClient::LatestRecoveryPoint(const std::string& item) {
  auto r = CallJson("GET", "/v1/items/" + UrlEncode(item) + "/latest", json());
  if (!r.ok()) {
    if (r.status().code() == Code::kNotFound) return std::optional<json>();
    return r.take_status();
  }
  return std::optional<json>(std::move(*r));
}

Result<json> VaultClient::GetRecoveryPoint(const std::string& id) {
  return CallJson("GET", "/v1/rps/" + UrlEncode(id), json());
}

Result<json> VaultClient::ListRecoveryPoints(const std::string& item) {
  auto r = CallJson("GET", item.empty() ? "/v1/rps" : "/v1/rps?item=" + UrlEncode(item), json());
  if (!r.ok()) return r.take_status();
  return (*r)["recovery_points"];
}

Status VaultClient::ResolvedManifestPages(const std::string& rp_id, int disk_index,
                                          uint64_t page_entries,
                                          const std::function<Status(const Manifest&)>& on_page) {
  const std::string target =
      "/v1/rps/" + UrlEncode(rp_id) + "/disks/" + std::to_string(disk_index) + "/map";
  page_entries = std::max<uint64_t>(1, page_entries);
  for (uint64_t from = 0;;) {
    auto r = http_->Call(
        "GET", target + "?from=" + std::to_string(from) + "&limit=" + std::to_string(page_entries));
    if (!r.ok()) return r.take_status();
    auto page = DecodeManifest(r->body);
    if (!page.ok()) return page.take_status();
    // A vault without paging answers with the whole map: it is then the only page.
    const bool whole = page->entries.size() > page_entries;
    if (!whole && !page->entries.empty() && page->entries.front().index < from)
      return Status::Corruption("the vault sent a map page that starts before index " +
                                std::to_string(from));
    VMSNAP_RETURN_IF_ERROR(on_page(*page));
    if (whole || page->entries.size() < page_entries) return Status::Ok();
    from = page->entries.back().index + 1;
  }
}

Result<std::string> VaultClient::CreateSession(const std::string& item,
                                               std::chrono::milliseconds keepalive) {
  json body{{"item", item}};
  if (keepalive.count() > 0) body["keepalive_ms"] = keepalive.count();
  auto r = CallJson("POST", "/v1/sessions", body);
  if (!r.ok()) return r.take_status();
  return r->value("session", "");
}

Status VaultClient::KeepSessionAlive(const std::string& session) {
  auto r = http_->Call("POST", "/v1/sessions/" + session + "/keepalive");
  return r.ok() ? Status::Ok() : r.take_status();
}

Status VaultClient::AbandonSession(const std::string& session) {
  auto r = http_->Call("DELETE", "/v1/sessions/" + session);
  return r.ok() ? Status::Ok() : r.take_status();
}

Result<std::vector<BlockId>> VaultClient::Missing(const std::vector<BlockId>& ids) {
  auto r = http_->Call("POST", "/v1/blocks/missing", EncodeIdList(ids), kBinary);
  if (!r.ok()) return r.take_status();
  return DecodeIdList(r->body);
}

Status VaultClient::Upload(const std::vector<EncodedBlock>& blocks) {
  auto r = http_->Call("POST", "/v1/blocks", EncodeBatch(blocks), kBinary);
  return r.ok() ? Status::Ok() : r.take_status();
}

Status VaultClient::PutManifest(const std::string& session, int disk_index, std::string encoded) {
  auto r = http_->Call("PUT", "/v1/sessions/" + session + "/disks/" + std::to_string(disk_index),
                       std::move(encoded), kBinary);
  return r.ok() ? Status::Ok() : r.take_status();
}

Status VaultClient::PutManifestPart(const std::string& session, int disk_index, uint64_t offset,
                                    std::string part) {
  auto r = http_->Call("PUT",
                       "/v1/sessions/" + session + "/disks/" + std::to_string(disk_index) +
                           "/part?offset=" + std::to_string(offset),
                       std::move(part), kBinary);
  return r.ok() ? Status::Ok() : r.take_status();
}

Status VaultClient::SealManifest(const std::string& session, int disk_index, uint64_t size) {
  auto r = http_->Call("POST",
                       "/v1/sessions/" + session + "/disks/" + std::to_string(disk_index) +
                           "/seal?size=" + std::to_string(size),
                       std::string(), kBinary);
  return r.ok() ? Status::Ok() : r.take_status();
}

Result<json> VaultClient::Commit(const std::string& session, const json& body) {
  return CallJson("POST", "/v1/sessions/" + session + "/commit", body);
}

Result<std::vector<BlockRecordView>> VaultClient::Fetch(const std::vector<BlockId>& ids,
                                                        std::string& body) {
  http_->RecycleBody(std::move(body));  // the previous batch's answer, no longer referenced
  auto r = http_->Call("POST", "/v1/blocks/fetch", EncodeIdList(ids), kBinary);
  if (!r.ok()) return r.take_status();
  body = std::move(r->body);
  return DecodeBatchView(body);
}

}  // namespace vmsnap::agent

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

Result<Manifest> VaultClient::ResolvedManifest(const std::string& rp_id, int disk_index) {
  auto r = http_->Call(
      "GET", "/v1/rps/" + UrlEncode(rp_id) + "/disks/" + std::to_string(disk_index) + "/map");
  if (!r.ok()) return r.take_status();
  return DecodeManifest(r->body);
}

Result<std::string> VaultClient::CreateSession(const std::string& item) {
  auto r = CallJson("POST", "/v1/sessions", json{{"item", item}});
  if (!r.ok()) return r.take_status();
  return r->value("session", "");
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

Status VaultClient::PutManifest(const std::string& session, int disk_index,
                                const Manifest& manifest) {
  auto r = http_->Call("PUT", "/v1/sessions/" + session + "/disks/" + std::to_string(disk_index),
                       EncodeManifest(manifest), kBinary);
  return r.ok() ? Status::Ok() : r.take_status();
}

Result<json> VaultClient::Commit(const std::string& session, const json& body) {
  return CallJson("POST", "/v1/sessions/" + session + "/commit", body);
}

Result<std::vector<BlockRecordView>> VaultClient::Fetch(const std::vector<BlockId>& ids,
                                                        std::string& body) {
  auto r = http_->Call("POST", "/v1/blocks/fetch", EncodeIdList(ids), kBinary);
  if (!r.ok()) return r.take_status();
  body = std::move(r->body);
  return DecodeBatchView(body);
}

}  // namespace vmsnap::agent

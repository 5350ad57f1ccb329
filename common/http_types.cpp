#include "common/http_types.hpp"

#include <nlohmann/json.hpp>

namespace vmsnap {
namespace {

int HttpStatusFor(Code code) {
  switch (code) {
    case Code::kInvalidArgument:
      return 400;
    case Code::kUnauthenticated:
      return 401;
    case Code::kPermissionDenied:
      return 403;
    case Code::kNotFound:
      return 404;
    case Code::kAlreadyExists:
    case Code::kConflict:
      return 409;
    case Code::kCorruption:
      return 422;
    case Code::kUnavailable:
      return 503;
    case Code::kTimeout:
      return 504;
    case Code::kCancelled:
      return 499;
    case Code::kResourceExhausted:
      return 507;  // Insufficient Storage
    default:
      return 500;
  }
}

Code CodeFromName(const std::string& name, int http_status) {
  for (int c = 0; c <= static_cast<int>(Code::kInternal); ++c)
    if (name == CodeName(static_cast<Code>(c))) return static_cast<Code>(c);
  if (http_status == 401) return Code::kUnauthenticated;
  if (http_status == 403) return Code::kPermissionDenied;
  if (http_status == 404) return Code::kNotFound;
  if (http_status == 409) return Code::kConflict;
  if (http_status == 507) return Code::kResourceExhausted;
  if (http_status >= 500) return Code::kUnavailable;
  return Code::kInvalidArgument;
}

int Unhex(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string UrlDecode(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && Unhex(s[i + 1]) >= 0 && Unhex(s[i + 2]) >= 0) {
      out.push_back(static_cast<char>(Unhex(s[i + 1]) * 16 + Unhex(s[i + 2])));
      i += 2;
    } else if (s[i] == '+') {
      out.push_back(' ');
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

}  // namespace

HttpResponse ErrorResponse(const Status& status) {
  nlohmann::json j = {{"error", status.cause()}, {"code", CodeName(status.code())}};
  if (!status.phase().empty()) j["phase"] = status.phase();
  if (!status.fix().empty()) j["fix"] = status.fix();
  return HttpResponse{HttpStatusFor(status.code()), "application/json", j.dump()};
}

Status StatusFromResponse(const HttpResponse& response) {
  auto j = nlohmann::json::parse(response.body, nullptr, /*allow_exceptions=*/false);
  std::string cause, code_name, fix;
  if (j.is_object()) {
    cause = j.value("error", "");
    code_name = j.value("code", "");
    fix = j.value("fix", "");
  }
  if (cause.empty()) cause = "the vault answered HTTP " + std::to_string(response.status);
  Code code = CodeFromName(code_name, response.status);
  if (code == Code::kUnauthenticated && fix.empty())
    fix = "pass the access token the vault printed at first start (stored in DATA/token)";
  return Status::Error(code, "vault: " + cause, fix);
}

void ParseTarget(const std::string& target, std::string& path,
                 std::map<std::string, std::string>& query) {
  auto q = target.find('?');
  path = UrlDecode(target.substr(0, q));
  query.clear();
  if (q == std::string::npos) return;
  std::string rest = target.substr(q + 1);
  size_t pos = 0;
  while (pos <= rest.size()) {
    size_t amp = rest.find('&', pos);
    if (amp == std::string::npos) amp = rest.size();
    std::string kv = rest.substr(pos, amp - pos);
    if (!kv.empty()) {
      auto eq = kv.find('=');
      if (eq == std::string::npos)
        query[UrlDecode(kv)] = "";
      else
        query[UrlDecode(kv.substr(0, eq))] = UrlDecode(kv.substr(eq + 1));
    }
    pos = amp + 1;
  }
}

}  // namespace vmsnap

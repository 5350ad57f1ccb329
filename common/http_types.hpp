// Transport-neutral HTTP request/response values shared by the HTTPS client and server, and
// the mapping between Status and HTTP error responses (docs/PROTOCOL.md, "Errors").
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include "common/status.hpp"

namespace vmsnap {

struct HttpRequest {
  std::string method;  // "GET", "POST", "PUT", "DELETE"
  std::string target;  // path plus query string as sent
  std::string path;    // path without the query string
  std::map<std::string, std::string> query;
  std::string authorization;  // the Authorization header, verbatim
  std::string content_type;
  std::string body;
};

// The largest response body a vault sends and a client reads (ClientOptions'
// response_body_limit): a fetch's answer is built in memory on both ends.
inline constexpr uint64_t kMaxResponseBodyBytes = 256ull << 20;

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
};

// Server side: a failed Status as an HTTP error with a JSON body
// {"error": cause, "code": CODE, "phase": ..., "fix": ...}.
HttpResponse ErrorResponse(const Status& status);
// Client side: an HTTP error response back into a Status (code, cause and fix preserved).
Status StatusFromResponse(const HttpResponse& response);

// Splits "path?a=1&b=2" into path and decoded query parameters.
void ParseTarget(const std::string& target, std::string& path,
                 std::map<std::string, std::string>& query);

}  // namespace vmsnap

// A keep-alive HTTPS client for the vault's API.
//
// Security: always verifies the server certificate against the CA file it was given
// (verify_peer), sends SNI for host names, and checks the certificate's host name or IP
// address. There is no option to skip verification.
//
// Reliability: a failed connection is rebuilt; transient failures (connection refused or
// reset, timeouts, HTTP 5xx) are retried with exponential backoff up to `max_attempts`.
// Non-transient errors (401, 404, 4xx, certificate verification) return at once.
//
// Threads: one HttpsClient is one connection; use one per thread. Not thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "common/http_types.hpp"
#include "common/status.hpp"

namespace vmsnap {

struct VaultUrl {
  std::string host;
  std::string port;
  static Result<VaultUrl> Parse(const std::string& url);  // "https://host[:port]"
};

struct ClientOptions {
  std::string url;      // https://host:port
  std::string ca_file;  // PEM file of the CA that signed the vault's certificate
  std::string token;    // bearer token
  int max_attempts = 6;
  std::chrono::milliseconds initial_backoff{250};
  std::chrono::milliseconds max_backoff{8000};
  std::chrono::seconds io_timeout{120};
  uint64_t response_body_limit = kMaxResponseBodyBytes;
};

// Enrollment's trust bootstrap: connects once to `url`, takes the certificate chain the server
// presents, and returns (PEM) the CA certificate in it whose SHA-256 fingerprint equals
// `fingerprint` (hex, colons and case ignored) — only if the server's own certificate verifies
// against that CA alone and covers the URL's host. No secret is sent on this connection; later
// connections verify normally against the returned CA. kPermissionDenied on any mismatch.
Result<std::string> FetchPinnedCa(const std::string& url, const std::string& fingerprint,
                                  std::chrono::seconds timeout = std::chrono::seconds(30));

class HttpsClient {
 public:
  // Validates the URL and loads the CA file; no network traffic yet.
  static Result<std::unique_ptr<HttpsClient>> Create(const ClientOptions& options);
  ~HttpsClient();

  // Sends one request (with retries) and returns the response if its status is 2xx;
  // otherwise the Status the vault sent back (see StatusFromResponse).
  Result<HttpResponse> Call(const std::string& method, const std::string& target,
                            std::string body = {},
                            const std::string& content_type = "application/json");

  // Hands back the body of an earlier response for the next response to be read into: its
  // capacity is reused (contents discarded). Large answers read into fresh memory cost a page
  // fault per 4 KiB on first touch, a measurable part of a restore (docs/PERFORMANCE.md).
  void RecycleBody(std::string&& body);

  uint64_t bytes_sent() const;
  uint64_t bytes_received() const;

 private:
  class Impl;
  explicit HttpsClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace vmsnap

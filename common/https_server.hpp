// A small HTTPS server for the vault (Boost.Beast over OpenSSL, keep-alive, TLS 1.2+).
//
// Every request is read whole with an explicit body limit (requests above it get 413) and
// passed to the handler on one of the server's `threads` handler threads, where it may block;
// handlers must be thread-safe. Connections' I/O runs on separate threads (one per core, at
// most 4), never on a handler thread. Each read and write has a timeout; idle keep-alive
// connections are closed after it.
// Stop() stops accepting, lets requests in flight finish (up to the grace period), then
// closes everything. The destructor calls Stop().
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/http_types.hpp"
#include "common/status.hpp"

namespace vmsnap {

using HttpHandler = std::function<HttpResponse(const HttpRequest&)>;

struct ServerOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 8443;   // 0: pick a free port (see HttpsServer::port())
  std::string cert_file;  // PEM certificate chain
  std::string key_file;   // PEM private key
  uint64_t body_limit = 64ull << 20;
  int threads = 4;  // handler threads: requests handled at once
  std::chrono::seconds timeout{60};
};

class HttpsServer {
 public:
  // Binds, listens and starts the threads. kUnavailable if the address is in use.
  static Result<std::unique_ptr<HttpsServer>> Start(const ServerOptions& options,
                                                    HttpHandler handler);
  ~HttpsServer();
  uint16_t port() const;
  void Stop(std::chrono::milliseconds grace = std::chrono::milliseconds(5000));

 private:
  class Impl;
  explicit HttpsServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace vmsnap

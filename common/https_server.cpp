#include "common/https_server.hpp"

#include "common/beast_read_buffer.hpp"

#include <algorithm>
#include <atomic>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <optional>
#include <thread>
#include <vector>

namespace vmsnap {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;

// Threads: each connection lives on one of a few single-threaded io_contexts (TLS, HTTP
// parsing, timeouts: one asynchronous operation per TLS record, none of which wakes another
// thread), and each request's handler runs on a pool of `threads` threads, where it may block
// (long polls, durable writes) without holding up any connection's I/O. A request costs two
// hand-overs between threads (to the pool and back), not one per record.
//
// Handlers and sessions refer to the Impl by raw pointer: it outlives them (Stop() joins every
// thread before the Impl and its io_contexts are destroyed), and no reference cycle keeps it
// alive.
class HttpsServer::Impl {
 public:
  Impl(ServerOptions o, HttpHandler h) : opts_(std::move(o)), handler_(std::move(h)) {}

  Status Init() {
    boost::system::error_code ec;
    ctx_.set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                     ssl::context::no_sslv3 | ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1);
    ctx_.use_certificate_chain_file(opts_.cert_file, ec);
    if (ec)
      return Status::InvalidArgument("load certificate " + opts_.cert_file + ": " + ec.message());
    ctx_.use_private_key_file(opts_.key_file, ssl::context::pem, ec);
    if (ec) return Status::InvalidArgument("load key " + opts_.key_file + ": " + ec.message());
    auto address = asio::ip::make_address(opts_.host, ec);
    if (ec)
      return Status::InvalidArgument("listen address '" + opts_.host + "' is not an IP address",
                                     "use e.g. --listen 127.0.0.1:8443");
    tcp::endpoint ep(address, opts_.port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec)
      return Status::Unavailable(
          "listen on " + opts_.host + ":" + std::to_string(opts_.port) + ": " + ec.message(),
          "pick a free port with --listen or stop the other process");
    port_ = acceptor_.local_endpoint().port();
    return Status::Ok();
  }

  void Run() {
    Accept();
    for (auto& ioc : iocs_) {
      // Keeps run() going while this io_context has no connection yet (Stop() ends it).
      idle_guards_.push_back(asio::make_work_guard(*ioc));
      io_threads_.emplace_back([ioc = ioc.get()] { ioc->run(); });
    }
  }

  void Stop(std::chrono::milliseconds grace) {
    if (stopped_.exchange(true)) return;
    asio::post(acceptor_.get_executor(), [this] {
      boost::system::error_code ec;
      acceptor_.close(ec);
    });
    auto deadline = std::chrono::steady_clock::now() + grace;
    while (in_flight_.load() > 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    // No new requests reach the pool once the io_contexts have stopped; handlers still running
    // finish (their responses are dropped with the stopped io_contexts' queues); the pool is
    // destroyed before the io_contexts its queued requests' sessions belong to.
    for (auto& ioc : iocs_) ioc->stop();
    for (auto& t : io_threads_)
      if (t.joinable()) t.join();
    io_threads_.clear();
    pool_->stop();
    pool_->join();
    pool_.reset();
  }

  uint16_t port() const { return port_; }

  // One TLS connection; handles keep-alive requests one after the other.
  class Session : public std::enable_shared_from_this<Session> {
   public:
    Session(tcp::socket socket, Impl* server)
        : stream_(std::move(socket), server->ctx_), server_(server) {}

    // Called on the accepting thread; everything else runs on this connection's I/O thread.
    void Start() {
      asio::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->Handshake(); });
    }

   private:
    void Handshake() {
      beast::get_lowest_layer(stream_).expires_after(server_->opts_.timeout);
      stream_.async_handshake(ssl::stream_base::server,
                              [self = shared_from_this()](beast::error_code ec) {
                                if (!ec) self->Read();
                              });
    }

    void Read() {
      parser_.emplace();
      parser_->body_limit(server_->opts_.body_limit);
      ReserveReadBuffer(buffer_);
      beast::get_lowest_layer(stream_).expires_after(server_->opts_.timeout);
      http::async_read(
          stream_, buffer_, *parser_,
          [self = shared_from_this()](beast::error_code ec, size_t) { self->OnRead(ec); });
    }

    void OnRead(beast::error_code ec) {
      if (ec == http::error::body_limit) {
        HttpResponse too_large = ErrorResponse(
            Status::InvalidArgument("request body larger than the vault's limit of " +
                                    std::to_string(server_->opts_.body_limit) + " bytes"));
        too_large.status = 413;
        Respond(std::move(too_large), false);
        return;
      }
      if (ec) return Close();
      auto& req = parser_->get();
      HttpRequest r;
      r.method = std::string(req.method_string());
      r.target = std::string(req.target());
      ParseTarget(r.target, r.path, r.query);
      r.authorization = std::string(req[http::field::authorization]);
      r.content_type = std::string(req[http::field::content_type]);
      r.body = std::move(req.body());
      bool keep = req.keep_alive();
      server_->in_flight_++;
      asio::post(*server_->pool_, [self = shared_from_this(), r = std::move(r), keep] {
        HttpResponse res;
        try {
          res = self->server_->handler_(r);
        } catch (const std::exception& e) {
          res = ErrorResponse(Status::Internal(std::string("unhandled error: ") + e.what()));
        }
        self->server_->in_flight_--;
        asio::post(self->stream_.get_executor(), [self, res = std::move(res), keep]() mutable {
          self->Respond(std::move(res), keep && !self->server_->stopped_.load());
        });
      });
    }

    void Respond(HttpResponse r, bool keep) {
      auto res = std::make_shared<http::response<http::string_body>>();
      res->result(static_cast<unsigned>(r.status));
      res->version(11);
      res->set(http::field::server, "vmsnap-vault");
      res->set(http::field::content_type, r.content_type);
      res->keep_alive(keep);
      res->body() = std::move(r.body);
      res->prepare_payload();
      beast::get_lowest_layer(stream_).expires_after(server_->opts_.timeout);
      http::async_write(stream_, *res,
                        [self = shared_from_this(), res, keep](beast::error_code ec, size_t) {
                          if (ec || !keep) return self->Close();
                          self->Read();
                        });
    }

    void Close() {
      beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(2));
      stream_.async_shutdown([self = shared_from_this()](beast::error_code) {
        beast::error_code ec;
        beast::get_lowest_layer(self->stream_).socket().close(ec);
      });
    }

    beast::ssl_stream<BufferedTcpStream> stream_;
    Impl* server_;
    beast::flat_buffer buffer_;
    std::optional<http::request_parser<http::string_body>> parser_;
  };

 private:
  void Accept() {
    asio::io_context& session_ioc = *iocs_[next_ioc_++ % iocs_.size()];
    acceptor_.async_accept(session_ioc, [this](beast::error_code ec, tcp::socket s) {
      if (ec) {
        if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
      } else {
        // Responses go out at once: with Nagle's algorithm, the last TLS record of a response
        // larger than one record waited for the client's delayed ACK (40 ms per request).
        beast::error_code nodelay_ec;
        s.set_option(tcp::no_delay(true), nodelay_ec);
        std::make_shared<Session>(std::move(s), this)->Start();
      }
      Accept();
    });
  }

  static std::vector<std::unique_ptr<asio::io_context>> MakeIoContexts() {
    const unsigned n = std::clamp(std::thread::hardware_concurrency(), 1u, 4u);
    std::vector<std::unique_ptr<asio::io_context>> out;
    for (unsigned i = 0; i < n; ++i) out.push_back(std::make_unique<asio::io_context>(1));
    return out;
  }

  ServerOptions opts_;
  HttpHandler handler_;
  // Declared before the pool, so destroyed after it (see Stop()).
  std::vector<std::unique_ptr<asio::io_context>> iocs_ = MakeIoContexts();
  std::optional<asio::thread_pool> pool_{std::in_place, std::max(1, opts_.threads)};
  ssl::context ctx_{ssl::context::tls_server};
  tcp::acceptor acceptor_{*iocs_[0]};
  size_t next_ioc_ = 0;  // used by the accepting io_context's thread only
  std::vector<asio::executor_work_guard<asio::io_context::executor_type>> idle_guards_;
  std::vector<std::thread> io_threads_;
  std::atomic<int> in_flight_{0};
  std::atomic<bool> stopped_{false};
  uint16_t port_ = 0;
};

Result<std::unique_ptr<HttpsServer>> HttpsServer::Start(const ServerOptions& options,
                                                        HttpHandler handler) {
  auto impl = std::make_unique<Impl>(options, std::move(handler));
  VMSNAP_RETURN_IF_ERROR(impl->Init());
  impl->Run();
  return std::unique_ptr<HttpsServer>(new HttpsServer(std::move(impl)));
}

HttpsServer::HttpsServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpsServer::~HttpsServer() {
  Stop();
}
uint16_t HttpsServer::port() const {
  return impl_->port();
}
void HttpsServer::Stop(std::chrono::milliseconds grace) {
  impl_->Stop(grace);
}

}  // namespace vmsnap

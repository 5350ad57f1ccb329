#include "common/https_server.hpp"

#include <atomic>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/strand.hpp>
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

// Handlers and sessions refer to the Impl by raw pointer: it outlives them (Stop() joins the
// threads before the Impl and its io_context are destroyed), and no reference cycle keeps it
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
    for (int i = 0; i < std::max(1, opts_.threads); ++i)
      threads_.emplace_back([this] { ioc_.run(); });
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
    ioc_.stop();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    threads_.clear();
  }

  uint16_t port() const { return port_; }

  // One TLS connection; handles keep-alive requests one after the other.
  class Session : public std::enable_shared_from_this<Session> {
   public:
    Session(tcp::socket socket, Impl* server)
        : stream_(std::move(socket), server->ctx_), server_(server) {}

    void Start() {
      beast::get_lowest_layer(stream_).expires_after(server_->opts_.timeout);
      stream_.async_handshake(ssl::stream_base::server,
                              [self = shared_from_this()](beast::error_code ec) {
                                if (!ec) self->Read();
                              });
    }

   private:
    void Read() {
      parser_.emplace();
      parser_->body_limit(server_->opts_.body_limit);
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
      HttpResponse res;
      try {
        res = server_->handler_(r);
      } catch (const std::exception& e) {
        res = ErrorResponse(Status::Internal(std::string("unhandled error: ") + e.what()));
      }
      server_->in_flight_--;
      Respond(std::move(res), keep && !server_->stopped_.load());
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

    beast::ssl_stream<beast::tcp_stream> stream_;
    Impl* server_;
    beast::flat_buffer buffer_;
    std::optional<http::request_parser<http::string_body>> parser_;
  };

 private:
  void Accept() {
    acceptor_.async_accept(asio::make_strand(ioc_), [this](beast::error_code ec, tcp::socket s) {
      if (ec) {
        if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
      } else {
        std::make_shared<Session>(std::move(s), this)->Start();
      }
      Accept();
    });
  }

  ServerOptions opts_;
  HttpHandler handler_;
  asio::io_context ioc_;
  ssl::context ctx_{ssl::context::tls_server};
  tcp::acceptor acceptor_{ioc_};
  std::vector<std::thread> threads_;
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

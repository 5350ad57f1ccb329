#include "common/https_client.hpp"

#include "common/beast_read_buffer.hpp"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <optional>
#include <thread>

namespace vmsnap {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;

Result<VaultUrl> VaultUrl::Parse(const std::string& url) {
  const std::string scheme = "https://";
  if (url.rfind(scheme, 0) != 0)
    return Status::InvalidArgument("vault URL '" + url + "' does not start with https://",
                                   "use https://HOST:PORT (the vault only speaks TLS)");
  std::string rest = url.substr(scheme.size());
  while (!rest.empty() && rest.back() == '/') rest.pop_back();
  if (rest.find('/') != std::string::npos)
    return Status::InvalidArgument("vault URL '" + url + "' must not contain a path",
                                   "use https://HOST:PORT");
  VaultUrl u;
  if (!rest.empty() && rest[0] == '[') {  // [v6]:port
    auto close = rest.find(']');
    if (close == std::string::npos) return Status::InvalidArgument("bad IPv6 address in URL");
    u.host = rest.substr(1, close - 1);
    rest = rest.substr(close + 1);
    u.port = rest.rfind(':', 0) == 0 ? rest.substr(1) : "443";
  } else {
    auto colon = rest.rfind(':');
    u.host = rest.substr(0, colon);
    u.port = colon == std::string::npos ? "443" : rest.substr(colon + 1);
  }
  if (u.host.empty() || u.port.empty() ||
      u.port.find_first_not_of("0123456789") != std::string::npos)
    return Status::InvalidArgument("vault URL '" + url + "' is malformed",
                                   "use https://HOST:PORT, e.g. https://127.0.0.1:8443");
  return u;
}

class HttpsClient::Impl {
 public:
  Impl(ClientOptions o, VaultUrl u) : opts_(std::move(o)), url_(std::move(u)) {}

  Status Init() {
    boost::system::error_code ec;
    ctx_.set_verify_mode(ssl::verify_peer);
    ctx_.load_verify_file(opts_.ca_file, ec);
    if (ec)
      return Status::InvalidArgument(
          "cannot load CA file '" + opts_.ca_file + "': " + ec.message(),
          "pass the CA certificate the vault printed at first start (DATA/tls/ca.pem)");
    SSL_CTX_set_min_proto_version(ctx_.native_handle(), TLS1_2_VERSION);
    return Status::Ok();
  }

  Result<HttpResponse> Call(const std::string& method, const std::string& target,
                            const std::string& body, const std::string& content_type) {
    auto backoff = opts_.initial_backoff;
    Status last;
    for (int attempt = 1; attempt <= std::max(1, opts_.max_attempts); ++attempt) {
      auto r = Once(method, target, body, content_type);
      if (r.ok()) {
        if (r->status >= 200 && r->status < 300) return r;
        last = StatusFromResponse(*r);
        // The vault said no, or is out of space: retrying within seconds cannot help.
        if (r->status < 500 || last.code() == Code::kResourceExhausted) return last;
      } else {
        last = r.take_status();
        Disconnect();
        if (!last.retryable()) return last;
      }
      if (attempt < opts_.max_attempts) {
        std::this_thread::sleep_for(backoff);
        backoff = std::min(backoff * 2, opts_.max_backoff);
      }
    }
    if (last.code() == Code::kUnavailable || last.code() == Code::kTimeout)
      return Status::Error(last.code(),
                           "vault at https://" + url_.host + ":" + url_.port +
                               " unreachable after " + std::to_string(opts_.max_attempts) +
                               " attempts: " + last.cause(),
                           "check that vmsnap-vault is running, the URL and port, and that this "
                           "machine has a route and DNS to the vault");
    return last;
  }

  uint64_t sent = 0, received = 0;
  std::string spare_body_;  // from RecycleBody: memory for the next response's body

 private:
  void Disconnect() {
    stream_.reset();
    connected_ = false;
  }

  // Runs the io_context until the pending operation completes.
  void RunPending() {
    ioc_.restart();
    ioc_.run();
  }

  Status Connect() {
    stream_.emplace(ioc_, ctx_);
    SSL* ssl = stream_->native_handle();
    boost::system::error_code ec;
    asio::ip::make_address(url_.host, ec);
    if (ec) {  // a host name: SNI and host name check
      SSL_set_tlsext_host_name(ssl, url_.host.c_str());
      SSL_set1_host(ssl, url_.host.c_str());
    } else {  // an IP literal: check the certificate's IP SAN
      X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), url_.host.c_str());
    }
    tcp::resolver resolver(ioc_);
    auto endpoints = resolver.resolve(url_.host, url_.port, ec);
    if (ec)
      return Status::Unavailable("cannot resolve vault host '" + url_.host + "': " + ec.message(),
                                 "check DNS on this machine or use the vault's IP address");
    auto& tcp_stream = beast::get_lowest_layer(*stream_);
    tcp_stream.expires_after(opts_.io_timeout);
    tcp_stream.async_connect(endpoints, [&](auto e, auto) { ec = e; });
    RunPending();
    if (ec)
      return Status::Unavailable("connect to " + url_.host + ":" + url_.port + ": " + ec.message());
    tcp_stream.socket().set_option(tcp::no_delay(true), ec);
    tcp_stream.expires_after(opts_.io_timeout);
    stream_->async_handshake(ssl::stream_base::client, [&](auto e) { ec = e; });
    RunPending();
    if (ec) {
      long verify = SSL_get_verify_result(ssl);
      if (verify != X509_V_OK)
        return Status::Error(
            Code::kPermissionDenied,
            std::string("refusing to talk to the vault: its certificate failed verification (") +
                X509_verify_cert_error_string(verify) + ")",
            "pass --ca with the CA file of this vault (DATA/tls/ca.pem, fingerprint printed at "
            "vault start) and a host name or IP that the certificate covers");
      return Status::Unavailable("TLS handshake with " + url_.host + ": " + ec.message());
    }
    connected_ = true;
    return Status::Ok();
  }

  Result<HttpResponse> Once(const std::string& method, const std::string& target,
                            const std::string& body, const std::string& content_type) {
    if (!connected_) VMSNAP_RETURN_IF_ERROR(Connect());
    // The body is sent from the caller's string (kept for retries), not copied into the
    // request: upload batches are several MiB each.
    http::request<http::span_body<const char>> req{http::string_to_verb(method), target, 11};
    req.set(http::field::host, url_.host.find(':') != std::string::npos
                                   ? "[" + url_.host + "]:" + url_.port
                                   : url_.host + ":" + url_.port);
    req.set(http::field::user_agent, "vmsnap/0.1");
    req.set(http::field::authorization, "Bearer " + opts_.token);
    req.set(http::field::content_type, content_type);
    req.keep_alive(true);
    req.body() = beast::span<const char>(body.data(), body.size());
    req.prepare_payload();
    boost::system::error_code ec;
    auto& tcp_stream = beast::get_lowest_layer(*stream_);
    tcp_stream.expires_after(opts_.io_timeout);
    size_t wrote = 0;
    http::async_write(*stream_, req, [&](auto e, size_t n) {
      ec = e;
      wrote = n;
    });
    RunPending();
    if (ec) return Status::Unavailable("send to vault: " + ec.message());
    sent += wrote;
    http::response_parser<http::string_body> parser;
    parser.body_limit(opts_.response_body_limit);
    // A recycled string (RecycleBody) keeps its capacity: a large answer lands in memory already
    // touched instead of in fresh pages.
    parser.get().body() = std::move(spare_body_);
    parser.get().body().clear();
    spare_body_ = std::string();
    ReserveReadBuffer(buffer_);
    size_t got = 0;
    tcp_stream.expires_after(opts_.io_timeout);
    http::async_read(*stream_, buffer_, parser, [&](auto e, size_t n) {
      ec = e;
      got = n;
    });
    RunPending();
    if (ec) {
      if (ec == beast::error::timeout)
        return Status::Error(Code::kTimeout, "the vault did not answer within " +
                                                 std::to_string(opts_.io_timeout.count()) + " s");
      return Status::Unavailable("receive from vault: " + ec.message());
    }
    received += got;
    auto res = parser.release();
    if (!res.keep_alive()) Disconnect();
    return HttpResponse{static_cast<int>(res.result_int()),
                        std::string(res[http::field::content_type]), std::move(res.body())};
  }

  ClientOptions opts_;
  VaultUrl url_;
  asio::io_context ioc_;
  ssl::context ctx_{ssl::context::tls_client};
  std::optional<beast::ssl_stream<BufferedTcpStream>> stream_;
  beast::flat_buffer buffer_;
  bool connected_ = false;
};

Result<std::unique_ptr<HttpsClient>> HttpsClient::Create(const ClientOptions& options) {
  auto url = VaultUrl::Parse(options.url);
  if (!url.ok()) return url.take_status();
  if (options.token.empty())
    return Status::InvalidArgument("no access token given",
                                   "pass --token with the token the vault printed (DATA/token)");
  auto impl = std::make_unique<Impl>(options, *url);
  VMSNAP_RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<HttpsClient>(new HttpsClient(std::move(impl)));
}

HttpsClient::HttpsClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpsClient::~HttpsClient() = default;

Result<HttpResponse> HttpsClient::Call(const std::string& method, const std::string& target,
                                       std::string body, const std::string& content_type) {
  return impl_->Call(method, target, body, content_type);
}

void HttpsClient::RecycleBody(std::string&& body) {
  impl_->spare_body_ = std::move(body);
}

uint64_t HttpsClient::bytes_sent() const {
  return impl_->sent;
}
uint64_t HttpsClient::bytes_received() const {
  return impl_->received;
}

}  // namespace vmsnap

namespace vmsnap {

namespace {
std::string NormalizeFingerprint(const std::string& fp) {
  std::string out;
  for (char c : fp)
    if (std::isxdigit(static_cast<unsigned char>(c)))
      out.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  return out;
}

std::string CertFingerprint(X509* cert) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  X509_digest(cert, EVP_sha256(), md, &n);
  static const char* kDigits = "0123456789ABCDEF";
  std::string out;
  for (unsigned i = 0; i < n; ++i) {
    out.push_back(kDigits[md[i] >> 4]);
    out.push_back(kDigits[md[i] & 15]);
  }
  return out;
}
}  // namespace

Result<std::string> FetchPinnedCa(const std::string& url, const std::string& fingerprint,
                                  std::chrono::seconds timeout) {
  auto u = VaultUrl::Parse(url);
  if (!u.ok()) return u.take_status();
  const std::string want = NormalizeFingerprint(fingerprint);
  if (want.size() != 64)
    return Status::InvalidArgument(
        "CA fingerprint '" + fingerprint + "' is not a SHA-256 fingerprint",
        "copy the 'CA SHA-256 fingerprint' line the vault printed");
  asio::io_context ioc;
  ssl::context ctx{ssl::context::tls_client};
  // Verification is done below, by hand, against the pinned CA only.
  ctx.set_verify_mode(ssl::verify_none);
  beast::ssl_stream<beast::tcp_stream> stream(ioc, ctx);
  boost::system::error_code ec;
  asio::ip::make_address(u->host, ec);
  if (ec) SSL_set_tlsext_host_name(stream.native_handle(), u->host.c_str());
  tcp::resolver resolver(ioc);
  auto endpoints = resolver.resolve(u->host, u->port, ec);
  if (ec)
    return Status::Unavailable("cannot resolve vault host '" + u->host + "': " + ec.message());
  beast::get_lowest_layer(stream).expires_after(timeout);
  beast::get_lowest_layer(stream).async_connect(endpoints, [&](auto e, auto) { ec = e; });
  ioc.run();
  if (ec)
    return Status::Unavailable("connect to " + u->host + ":" + u->port + ": " + ec.message(),
                               "check the vault URL and that the vault is running");
  ioc.restart();
  stream.async_handshake(ssl::stream_base::client, [&](auto e) { ec = e; });
  ioc.run();
  if (ec) return Status::Unavailable("TLS handshake with " + u->host + ": " + ec.message());
  STACK_OF(X509)* chain = SSL_get_peer_cert_chain(stream.native_handle());
  X509* leaf = SSL_get1_peer_certificate(stream.native_handle());
  std::unique_ptr<X509, decltype(&X509_free)> leaf_owner(leaf, &X509_free);
  X509* ca = nullptr;
  for (int i = 0; chain && i < sk_X509_num(chain); ++i)
    if (CertFingerprint(sk_X509_value(chain, i)) == want) ca = sk_X509_value(chain, i);
  const std::string fix =
      "check the fingerprint against the vault's start-up output or DATA/vault.json";
  if (!ca || !leaf)
    return Status::Error(Code::kPermissionDenied,
                         "the vault presented no CA certificate with fingerprint " + fingerprint,
                         fix);
  std::unique_ptr<X509_STORE, decltype(&X509_STORE_free)> store(X509_STORE_new(), &X509_STORE_free);
  X509_STORE_add_cert(store.get(), ca);
  std::unique_ptr<X509_STORE_CTX, decltype(&X509_STORE_CTX_free)> vctx(X509_STORE_CTX_new(),
                                                                       &X509_STORE_CTX_free);
  X509_STORE_CTX_init(vctx.get(), store.get(), leaf, nullptr);
  X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(vctx.get());
  if (asio::ip::make_address(u->host, ec); ec)
    X509_VERIFY_PARAM_set1_host(param, u->host.c_str(), 0);
  else
    X509_VERIFY_PARAM_set1_ip_asc(param, u->host.c_str());
  if (X509_verify_cert(vctx.get()) != 1)
    return Status::Error(
        Code::kPermissionDenied,
        std::string("the vault's certificate does not verify against the pinned CA: ") +
            X509_verify_cert_error_string(X509_STORE_CTX_get_error(vctx.get())),
        fix);
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), &BIO_free);
  PEM_write_bio_X509(bio.get(), ca);
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  std::string pem(data, static_cast<size_t>(n));
  beast::get_lowest_layer(stream).socket().close(ec);
  return pem;
}

}  // namespace vmsnap

// The HTTPS server's threading contract (common/https_server.hpp), over real TLS on loopback:
// connections are spread over several I/O threads, handlers run on their own threads and may
// block without holding up another connection, large bodies arrive whole both ways, and
// answers are sent without Nagle's delay.
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "common/https_client.hpp"
#include "common/https_server.hpp"
#include "support/test_support.hpp"
#include "vault/tls_setup.hpp"

using namespace vmsnap;
using namespace vmsnap::test;
using namespace std::chrono_literals;

namespace {

// Each request's answer: "<bytes of the request body>:<checksum of its bytes>", and a body of
// as many bytes as the query asks for (?reply=N), each byte a function of its offset.
std::string Checksum(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return std::to_string(h);
}
std::string Pattern(size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 7 + i / 4096) & 0xff);
  return s;
}

std::unique_ptr<HttpsClient> Client(uint16_t port, const std::string& ca) {
  ClientOptions o;
  o.url = "https://127.0.0.1:" + std::to_string(port);
  o.ca_file = ca;
  o.token = "t";
  o.max_attempts = 1;  // a connection nobody serves must fail the test, not be retried
  o.io_timeout = 20s;
  auto c = HttpsClient::Create(o);
  REQUIRE(c.ok());
  return std::move(*c);
}

// Lets a blocked handler go however a test case ends (a failed REQUIRE included), so neither
// the server's Stop() nor a pending call's future waits for it forever. Declare it after both.
struct Releaser {
  std::promise<void>& p;
  bool done = false;
  void operator()() {
    if (!done) p.set_value();
    done = true;
  }
  ~Releaser() { (*this)(); }
};

}  // namespace

TEST_CASE(
    "https server: a blocked handler holds up no other connection, every connection is "
    "served, large bodies arrive whole") {
  TempDir dir;
  auto tls = vault::EnsureTls(dir.path(), {"127.0.0.1"});
  REQUIRE(tls.ok());
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<int> blocked_entered{0};

  ServerOptions so;
  so.port = 0;
  so.cert_file = tls->server_cert_file;
  so.key_file = tls->server_key_file;
  so.threads = 2;  // one handler thread is taken by the blocked request below
  so.timeout = 20s;
  auto server = HttpsServer::Start(so, [&](const HttpRequest& r) {
    if (r.path == "/block") {
      blocked_entered++;
      released.wait();
      return HttpResponse{200, "text/plain", "released"};
    }
    std::string body = std::to_string(r.body.size()) + ":" + Checksum(r.body);
    if (auto it = r.query.find("reply"); it != r.query.end())
      body += "\n" + Pattern(std::stoul(it->second));
    return HttpResponse{200, "text/plain", body};
  });
  REQUIRE(server.ok());
  const uint16_t port = (*server)->port();

  auto blocked = std::async(std::launch::async,
                            [&] { return Client(port, tls->ca_cert_file)->Call("GET", "/block"); });
  Releaser releaser{release};
  for (int i = 0; i < 500 && blocked_entered.load() == 0; ++i) std::this_thread::sleep_for(10ms);
  REQUIRE(blocked_entered.load() == 1);

  // Eight connections (more than there are I/O threads, so every I/O thread gets some), each
  // with a 3 MiB request and a 5 MiB answer, while the blocked request holds a handler thread.
  const std::string upload = Pattern(3 << 20);
  const std::string expect_head = std::to_string(upload.size()) + ":" + Checksum(upload) + "\n";
  const std::string expect_tail = Pattern(5 << 20);
  std::vector<std::future<Result<HttpResponse>>> calls;
  for (int i = 0; i < 8; ++i)
    calls.push_back(std::async(std::launch::async, [&] {
      auto c = Client(port, tls->ca_cert_file);
      auto first = c->Call("POST", "/echo?reply=" + std::to_string(5 << 20), upload, "text/plain");
      if (!first.ok()) return first;
      return c->Call("POST", "/echo?reply=" + std::to_string(5 << 20), upload, "text/plain");
    }));
  for (auto& f : calls) {
    auto r = f.get();
    REQUIRE_MESSAGE(r.ok(), r.status().ToString());
    REQUIRE(r->body.size() == expect_head.size() + expect_tail.size());
    CHECK(r->body.compare(0, expect_head.size(), expect_head) == 0);
    CHECK(r->body.compare(expect_head.size(), std::string::npos, expect_tail) == 0);
  }
  CHECK(blocked.wait_for(0s) == std::future_status::timeout);  // still held

  releaser();
  auto b = blocked.get();
  REQUIRE_MESSAGE(b.ok(), b.status().ToString());
  CHECK(b->body == "released");
  (*server)->Stop();
}

TEST_CASE("https server: Stop() while a handler still runs returns once it is done") {
  TempDir dir;
  auto tls = vault::EnsureTls(dir.path(), {"127.0.0.1"});
  REQUIRE(tls.ok());
  std::atomic<bool> entered{false}, finished{false};
  ServerOptions so;
  so.port = 0;
  so.cert_file = tls->server_cert_file;
  so.key_file = tls->server_key_file;
  auto server = HttpsServer::Start(so, [&](const HttpRequest&) {
    entered = true;
    std::this_thread::sleep_for(300ms);
    finished = true;
    return HttpResponse{200, "text/plain", "late"};
  });
  REQUIRE(server.ok());
  auto call = std::async(std::launch::async, [&] {
    return Client((*server)->port(), tls->ca_cert_file)->Call("GET", "/slow");
  });
  for (int i = 0; i < 500 && !entered.load(); ++i) std::this_thread::sleep_for(10ms);
  REQUIRE(entered.load());
  (*server)->Stop(std::chrono::milliseconds(0));  // no grace: stops at once, joins the handler
  CHECK(finished.load());
  server->reset();  // closes the connection
  auto r = call.get();
  CHECK_FALSE(r.ok());  // its answer was dropped with the stopped server, the client was told
}

// Nagle's algorithm on the vault's side held the last TLS record of an answer larger than one
// record until the client's delayed ACK came (40 ms per request; docs/PERFORMANCE.md, session
// 17). Checked on the accepted sockets themselves: this process's TCP sockets whose local port
// is the server's and that do not listen.
TEST_CASE("https server: accepted connections send without Nagle's delay (TCP_NODELAY)") {
  TempDir dir;
  auto tls = vault::EnsureTls(dir.path(), {"127.0.0.1"});
  REQUIRE(tls.ok());
  ServerOptions so;
  so.port = 0;
  so.cert_file = tls->server_cert_file;
  so.key_file = tls->server_key_file;
  auto server = HttpsServer::Start(so, [](const HttpRequest&) {
    return HttpResponse{200, "text/plain", Pattern(64 << 10)};
  });
  REQUIRE(server.ok());
  const uint16_t port = (*server)->port();
  auto client = Client(port, tls->ca_cert_file);  // keep-alive: its connection stays open
  auto r = client->Call("GET", "/large");
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  CHECK(r->body == Pattern(64 << 10));

  int accepted = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    int fd = 0;
    try {
      fd = std::stoi(entry.path().filename().string());
    } catch (const std::exception&) {
      continue;
    }
    sockaddr_in local{};
    socklen_t len = sizeof(local);
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) != 0 ||
        local.sin_family != AF_INET || ntohs(local.sin_port) != port)
      continue;
    int listening = 0, nodelay = 0;
    socklen_t optlen = sizeof(int);
    REQUIRE(::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &optlen) == 0);
    if (listening) continue;
    optlen = sizeof(int);
    REQUIRE(::getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &nodelay, &optlen) == 0);
    CHECK_MESSAGE(nodelay != 0, "accepted socket fd " << fd << " has Nagle's algorithm on");
    accepted++;
  }
  CHECK(accepted == 1);  // the client's one connection
  (*server)->Stop();
}

// Both ends read the socket through a buffer in large pieces (common/beast_read_buffer.hpp),
// and a restore's fetchers hand each answer's string back for the next one (RecycleBody). The
// answers must still arrive whole, one after the other on one connection, into the recycled
// memory; and a vault that stops answering must still time the client out, since only the
// socket reads that fill the buffer carry the timer.
TEST_CASE("https client: recycled answer memory, whole answers in sequence, timeout kept") {
  TempDir dir;
  auto tls = vault::EnsureTls(dir.path(), {"127.0.0.1"});
  REQUIRE(tls.ok());
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  ServerOptions so;
  so.port = 0;
  so.cert_file = tls->server_cert_file;
  so.key_file = tls->server_key_file;
  auto server = HttpsServer::Start(so, [&](const HttpRequest& r) {
    if (r.path == "/stall") {
      released.wait();
      return HttpResponse{200, "text/plain", "late"};
    }
    return HttpResponse{200, "text/plain", Pattern(std::stoul(r.query.at("n")))};
  });
  REQUIRE(server.ok());
  Releaser releaser{release};
  auto client = Client((*server)->port(), tls->ca_cert_file);

  std::string spare;
  spare.reserve(6 << 20);
  spare = "old contents";
  const char* memory = spare.data();
  client->RecycleBody(std::move(spare));
  auto big = client->Call("GET", "/pattern?n=" + std::to_string(5 << 20));
  REQUIRE_MESSAGE(big.ok(), big.status().ToString());
  CHECK(big->body == Pattern(5 << 20));
  CHECK(static_cast<const void*>(big->body.data()) == static_cast<const void*>(memory));

  // Small and large answers back to back: none may take bytes of the next one.
  for (size_t n : {size_t{1}, size_t{70000}, size_t{0}, size_t{3 << 20}, size_t{17}}) {
    client->RecycleBody(std::move(big->body));
    big = client->Call("GET", "/pattern?n=" + std::to_string(n));
    REQUIRE_MESSAGE(big.ok(), big.status().ToString());
    CHECK(big->body == Pattern(n));
  }

  ClientOptions o;
  o.url = "https://127.0.0.1:" + std::to_string((*server)->port());
  o.ca_file = tls->ca_cert_file;
  o.token = "t";
  o.max_attempts = 1;
  o.io_timeout = 1s;
  auto impatient = HttpsClient::Create(o);
  REQUIRE(impatient.ok());
  auto stalled =
      std::async(std::launch::async, [&] { return (*impatient)->Call("GET", "/stall"); });
  // Without the timeout the call would wait for the release: it gets 30 s before that comes.
  const bool timed_out_alone = stalled.wait_for(30s) == std::future_status::ready;
  releaser();
  auto r = stalled.get();
  CHECK(timed_out_alone);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == Code::kTimeout);
  (*server)->Stop();
}

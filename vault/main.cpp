// vmsnap-vault: the vault server (block store, recovery points) over HTTPS.
#include <openssl/rand.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/cli_output.hpp"
#include "common/https_server.hpp"
#include "common/log.hpp"
#include "platform/env.hpp"
#include "vault/api.hpp"
#include "vault/control_plane.hpp"
#include "vault/db.hpp"
#include "vault/tls_setup.hpp"

namespace fs = std::filesystem;
using namespace vmsnap;

namespace {

Result<std::string> EnsureToken(const std::string& data_dir) {
  auto* env = platform::Env::Default();
  const std::string path = data_dir + "/token";
  auto existing = env->ReadFile(path);
  if (existing.ok()) {
    std::string t = *existing;
    while (!t.empty() && (t.back() == '\n' || t.back() == '\r')) t.pop_back();
    if (!t.empty()) return t;
  }
  unsigned char raw[24];
  if (RAND_bytes(raw, sizeof raw) != 1) return Status::Internal("no randomness for the token");
  static const char* kDigits = "0123456789abcdef";
  std::string token = "vst_";
  for (unsigned char c : raw) {
    token.push_back(kDigits[c >> 4]);
    token.push_back(kDigits[c & 15]);
  }
  VMSNAP_RETURN_IF_ERROR(env->WriteFileAtomic(path, token + "\n", 0600));
  return token;
}

Status SplitListen(const std::string& listen, std::string& host, uint16_t& port) {
  auto colon = listen.rfind(':');
  if (colon == std::string::npos)
    return Status::InvalidArgument("--listen '" + listen + "' has no port",
                                   "use HOST:PORT, e.g. 127.0.0.1:8443");
  host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  try {
    int p = std::stoi(listen.substr(colon + 1));
    if (p < 0 || p > 65535) throw std::out_of_range("port");
    port = static_cast<uint16_t>(p);
  } catch (const std::exception&) {
    return Status::InvalidArgument("--listen '" + listen + "' has a bad port",
                                   "use HOST:PORT with a port from 0 to 65535");
  }
  return Status::Ok();
}

struct ServeOptions {
  std::string data_dir;
  std::string listen = "127.0.0.1:8443";
  int threads = 16;
  bool test_clock = false;
  int agent_timeout_s = 600;
  int poll_wait_s = 20;
  int cleanup_interval_s = 3600;
  int64_t verify_interval_s = 7 * 86400;
  int soft_delete_days = 14;
  uint64_t min_free_space = vault::DiskSpaceReserve::kDefault;
};

int64_t RealNowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int Serve(const ServeOptions& so) {
  const std::string& data_dir = so.data_dir;
  const std::string& listen = so.listen;
  const int threads = so.threads;
  auto fail = [](Status st, const char* phase) {
    st.InPhase(phase);
    spdlog::error("{}", st.ToString());
    std::cerr << "vmsnap-vault: " << st.ToString() << "\n";
    return st.ExitCode();
  };
  std::string host;
  uint16_t port = 0;
  if (Status st = SplitListen(listen, host, port); !st.ok()) return fail(st, "start");
  std::error_code ec;
  fs::create_directories(data_dir, ec);
  if (ec)
    return fail(Status::IoError("create data directory " + data_dir + ": " + ec.message(),
                                "pass a writable --data directory"),
                "start");
  ::chmod(data_dir.c_str(), 0700);
  auto tls = vault::EnsureTls(data_dir, {host, platform::Env::Default()->HostName()});
  if (!tls.ok()) return fail(tls.take_status(), "create TLS certificates");
  auto token = EnsureToken(data_dir);
  if (!token.ok()) return fail(token.take_status(), "create access token");

  vault::BlockStore store(data_dir + "/blocks");
  if (Status st = store.Open(); !st.ok()) return fail(st, "open block store");
  vault::TestClock clock;
  clock.enabled = so.test_clock;
  clock.now_ms = RealNowMs();
  auto vault_now = [&clock]() { return clock.enabled ? clock.now_ms.load() : RealNowMs(); };
  vault::Catalog catalog(data_dir, &store, vault_now);
  if (Status st = catalog.Open(); !st.ok()) return fail(st, "open catalog");
  auto db = vault::Db::Open(data_dir + "/control.db");
  if (!db.ok()) return fail(db.take_status(), "open control plane");
  if (so.test_clock) spdlog::warn("test clock enabled: the admin API may set the time");
  vault::ControlPlaneOptions cpo;
  cpo.agent_timeout_ms = int64_t{so.agent_timeout_s} * 1000;
  cpo.poll_wait_ms = int64_t{so.poll_wait_s} * 1000;
  cpo.cleanup_interval_ms = int64_t{so.cleanup_interval_s} * 1000;
  cpo.verify_interval_ms = so.verify_interval_s * 1000;
  cpo.soft_delete_ms = int64_t{so.soft_delete_days} * 86400 * 1000;
  vault::ControlPlane control(std::move(*db), &catalog, vault_now, cpo);
  if (Status st = control.Init(); !st.ok()) return fail(st, "open control plane");
  vault::Lifecycle lifecycle(&catalog, &store);
  control.SetLifecycle(&lifecycle);
  vault::DiskSpaceReserve reserve(data_dir, so.min_free_space);
  vault::EmergencySpace emergency(data_dir, &reserve);
  emergency.Ensure();
  vault::VaultApi api(&store, &catalog, &control, &clock, *token, &reserve, &emergency);

  // Signals are taken synchronously by this thread; block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  ServerOptions opts;
  opts.host = host;
  opts.port = port;
  opts.cert_file = tls->server_cert_file;
  opts.key_file = tls->server_key_file;
  opts.body_limit = vault::kMaxRequestBody;
  opts.threads = threads;
  auto server = HttpsServer::Start(opts, [&api](const HttpRequest& r) { return api.Handle(r); });
  if (!server.ok()) return fail(server.take_status(), "listen");

  std::string url_host = host.find(':') != std::string::npos ? "[" + host + "]" : host;
  if (host == "0.0.0.0") url_host = "127.0.0.1";
  if (host == "::") url_host = "[::1]";
  std::string url = "https://" + url_host + ":" + std::to_string((*server)->port());
  nlohmann::json info = {{"url", url},
                         {"ca_file", fs::absolute(tls->ca_cert_file).string()},
                         {"ca_fingerprint_sha256", tls->ca_fingerprint_sha256},
                         {"token_file", fs::absolute(data_dir + "/token").string()},
                         {"pid", ::getpid()}};
  // Written once listening: tests and the admin CLI read the connection settings from it. On
  // a full disk the old file's space is what the new one needs; a vault that cannot write it
  // still serves (restores, cleanup) at the address it prints.
  const std::string info_file = data_dir + "/vault.json";
  Status wrote = platform::Env::Default()->WriteFileAtomic(info_file, info.dump(2) + "\n", 0600);
  if (!wrote.ok()) {
    fs::remove(info_file, ec);
    wrote = platform::Env::Default()->WriteFileAtomic(info_file, info.dump(2) + "\n", 0600);
  }
  if (!wrote.ok())
    spdlog::error(
        "{}; serving anyway at {} (the vmsnap command and tests, which read {}, will "
        "not find it there: free space on the vault's disk)",
        wrote.ToString(), url, info_file);
  std::cout << "vmsnap-vault listening on " << url << "\n"
            << "CA certificate: " << info["ca_file"].get<std::string>()
            << (tls->created ? " (created)" : "") << "\n"
            << "CA SHA-256 fingerprint: " << tls->ca_fingerprint_sha256 << "\n"
            << "access token: " << *token << " (stored in " << info["token_file"].get<std::string>()
            << ", mode 0600)\n"
            << std::flush;
  spdlog::info("serving {} with data in {} (backup data refused below {} free)", url, data_dir,
               HumanBytes(reserve.ReserveBytes()));

  // The scheduler: fires due backups once a second.
  std::atomic<bool> stopping{false};
  std::thread scheduler([&] {
    while (!stopping) {
      control.Tick();
      for (int i = 0; i < 10 && !stopping; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  // Scheduled verify reads every block: its own thread, so it never delays scheduled backups.
  std::thread verifier([&] {
    while (!stopping) {
      control.VerifyTick();
      for (int i = 0; i < 10 && !stopping; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  int sig = 0;
  sigwait(&signals, &sig);
  stopping = true;
  scheduler.join();
  verifier.join();
  spdlog::info("received {}, shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  (*server)->Stop(std::chrono::milliseconds(10000));
  spdlog::info("stopped cleanly");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  platform::TuneAllocatorForLargeBuffers();
  CLI::App app{"vmsnap-vault: stores recovery points of vmsnap agents"};
  app.require_subcommand(1);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error");
  auto* serve = app.add_subcommand("serve", "Run the vault until SIGTERM");
  ServeOptions so;
  serve->add_option("--data", so.data_dir, "Data directory (created if missing)")->required();
  serve->add_option("--listen", so.listen, "Address and port to listen on")->capture_default_str();
  serve
      ->add_option(
          "--threads", so.threads,
          "Request handler threads (long-polling agents hold one each; connection I/O has its own)")
      ->capture_default_str()
      ->check(CLI::Range(2, 256));
  serve
      ->add_option("--agent-timeout", so.agent_timeout_s,
                   "Seconds without contact before an agent counts as not reachable")
      ->capture_default_str()
      ->check(CLI::Range(5, 86400 * 7));
  serve->add_option("--poll-wait", so.poll_wait_s, "Seconds an idle agent's poll is held")
      ->capture_default_str()
      ->check(CLI::Range(1, 60));
  serve
      ->add_option("--cleanup-interval", so.cleanup_interval_s,
                   "Seconds between scheduled cleanups (expiry, merge, garbage collection)")
      ->capture_default_str()
      ->check(CLI::Range(60, 86400 * 7));
  serve
      ->add_option("--soft-delete-days", so.soft_delete_days,
                   "Days 'unprotect --delete-data' keeps a VM's data before purging it")
      ->capture_default_str()
      ->check(CLI::Range(0, 3650));
  serve
      ->add_option("--min-free-space", so.min_free_space,
                   "Free space kept on the data directory's disk: backup data is refused below "
                   "it (e.g. 2G, 500M; 0: none; default 1 % of the filesystem, at most 1 GiB)")
      ->transform(CLI::AsSizeValue(false));
  serve
      ->add_option("--verify-interval", so.verify_interval_s,
                   "Seconds between scheduled verifies of every VM's blocks (0: never)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{86400} * 365));
  serve->add_flag("--test-clock", so.test_clock,
                  "Let the admin API set the clock (for tests; never in production)");
  CLI11_PARSE(app, argc, argv);
  InitLogging("vmsnap-vault", log_level);
  if (*serve) return Serve(so);
  return 2;
}

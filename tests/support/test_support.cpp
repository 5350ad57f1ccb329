#include "tests/support/test_support.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sqlite3.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "common/block_codec.hpp"

extern char** environ;

namespace vmsnap::test {

namespace fs = std::filesystem;

TempDir::TempDir() {
  std::string tmpl = "/tmp/vmsnap-test-XXXXXX";
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

nlohmann::json RunResult::json() const {
  return nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
}

std::string ReadWhole(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

namespace {
pid_t Spawn(const std::vector<std::string>& argv, const std::string& out, const std::string& err) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error("posix_spawn " + argv[0] + " failed");
  return pid;
}

int WaitPid(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}
}  // namespace

RunResult Run(const std::vector<std::string>& argv) {
  TempDir t;
  pid_t pid = Spawn(argv, t / "out", t / "err");
  RunResult r;
  r.exit_code = WaitPid(pid);
  r.out = ReadWhole(t / "out");
  r.err = ReadWhole(t / "err");
  return r;
}

Child::Child(const std::vector<std::string>& argv, const std::string& out_file,
             const std::string& err_file)
    : pid_(Spawn(argv, out_file, err_file)) {}

Child::~Child() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    WaitPid(pid_);
  }
}

void Child::Signal(int sig) {
  if (pid_ > 0) ::kill(pid_, sig);
}

int Child::Wait() {
  if (pid_ <= 0) return -1;
  int rc = WaitPid(pid_);
  pid_ = -1;
  return rc;
}

std::string AgentBinary() {
  return VMSNAP_AGENT_BINARY;
}
std::string VaultBinary() {
  return VMSNAP_VAULT_BINARY;
}

RunResult Agent(const std::vector<std::string>& args) {
  std::vector<std::string> argv{AgentBinary()};
  argv.insert(argv.end(), args.begin(), args.end());
  return Run(argv);
}

Vault::Vault(std::string data_dir) : data_(std::move(data_dir)) {}
Vault::~Vault() {
  if (child_ && child_->running()) Stop();
}

void Vault::Start() {
  std::error_code ec;
  fs::create_directories(data_, ec);  // (an old vault.json stays: its pid tells it apart)
  std::vector<std::string> argv{VaultBinary(), "serve",    "--data",
                                data_,         "--listen", "127.0.0.1:" + std::to_string(port_)};
  argv.insert(argv.end(), extra_args_.begin(), extra_args_.end());
  child_ = std::make_unique<Child>(argv, data_ + "/../vault.out", data_ + "/../vault.err");
  for (int i = 0; i < 300; ++i) {
    auto info = nlohmann::json::parse(ReadWhole(data_ + "/vault.json"), nullptr, false);
    if (info.is_object() && info.value("pid", 0) == child_->pid()) {
      url_ = info["url"];
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  throw std::runtime_error("vault did not start: " + ReadWhole(data_ + "/../vault.err"));
}

void Vault::Kill(int sig) {
  child_->Signal(sig);
  child_->Wait();
}

int Vault::Stop() {
  child_->Signal(SIGTERM);
  return child_->Wait();
}

std::string Vault::token() const {
  std::string t = ReadWhole(data_ + "/token");
  while (!t.empty() && t.back() == '\n') t.pop_back();
  return t;
}

std::vector<std::string> Vault::conn() const {
  return {"--vault", url_, "--ca", ca(), "--token", token(), "--retries", "2"};
}

std::vector<Vault::StoredRecord> Vault::StoredRecords() const {
  std::vector<StoredRecord> out;
  if (!fs::exists(data_ + "/blocks/index.db")) return out;
  // A copy, taken while the vault is idle between the test's steps.
  TempDir copy;
  CopyBlockIndex(data_ + "/blocks", copy.path());
  const std::string path = copy / "index.db";
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE, nullptr) != SQLITE_OK) {
    sqlite3_close(db);
    throw std::runtime_error("cannot open " + path);
  }
  sqlite3_busy_timeout(db, 5000);
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_prepare_v2(db, "SELECT pack, offset, payload FROM blocks", -1, &stmt, nullptr) ==
      SQLITE_OK) {
    while (sqlite3_step(stmt) == SQLITE_ROW) {
      char name[32];
      std::snprintf(name, sizeof name, "%08lld.pack",
                    static_cast<long long>(sqlite3_column_int64(stmt, 0)));
      out.push_back({data_ + "/blocks/packs/" + name,
                     static_cast<uint64_t>(sqlite3_column_int64(stmt, 1)) + 41,
                     static_cast<uint64_t>(sqlite3_column_int64(stmt, 2))});
    }
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return out;
}

size_t Vault::StoredBlockCount() const {
  return StoredRecords().size();
}

void CopyBlockIndex(const std::string& blocks_dir, const std::string& to) {
  for (const char* f : {"index.db", "index.db-wal"})
    if (fs::exists(blocks_dir + "/" + f)) fs::copy_file(blocks_dir + "/" + f, to + "/" + f);
}

uint16_t FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
    throw std::runtime_error("no free port");
  ::close(fd);
  return ntohs(addr.sin_port);
}

void CreateSparseFile(const std::string& path, uint64_t size) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0)
    throw std::runtime_error("create " + path);
  ::close(fd);
}

void WriteRandomBlocks(const std::string& path, uint64_t block_size,
                       const std::vector<uint64_t>& indexes, uint64_t seed) {
  int fd = ::open(path.c_str(), O_WRONLY);
  if (fd < 0) throw std::runtime_error("open " + path);
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> buf(block_size / 8);
  for (uint64_t idx : indexes) {
    for (auto& w : buf) w = rng();
    if (::pwrite(fd, buf.data(), block_size, static_cast<off_t>(idx * block_size)) !=
        static_cast<ssize_t>(block_size))
      throw std::runtime_error("write " + path);
  }
  ::close(fd);
}

std::string FileSha256(const std::string& path) {
  return Sha256Hex(ReadWhole(path));
}

bool IsRoot() {
  return ::geteuid() == 0;
}
bool InCi() {
  const char* ci = std::getenv("CI");
  return ci && std::string(ci) == "true";
}

}  // namespace vmsnap::test

// Helpers for the integration suites: temporary directories, child processes, a real
// vmsnap-vault on loopback TLS, and disk images with known content. Every resource is RAII:
// a failing assertion still removes directories and ends the processes the test started
// (by pid, never by name).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace vmsnap::test {

// A fresh directory under /tmp, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct RunResult {
  int exit_code = -1;  // 128+N when killed by signal N
  std::string out;
  std::string err;
  nlohmann::json json() const;  // stdout parsed as JSON (null if it is not)
};

// Runs a program to completion and captures its output.
RunResult Run(const std::vector<std::string>& argv);

// A child process running in the background. Killed (SIGKILL) and reaped on destruction if
// still running.
class Child {
 public:
  Child(const std::vector<std::string>& argv, const std::string& out_file,
        const std::string& err_file);
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  pid_t pid() const { return pid_; }
  void Signal(int sig);
  int Wait();  // exit code, or 128+signal
  bool running() const { return pid_ > 0; }

 private:
  pid_t pid_ = -1;
};

// A real vmsnap-vault serving DIR on 127.0.0.1 (free port).
class Vault {
 public:
  explicit Vault(std::string data_dir);
  ~Vault();
  void Start();  // waits until it listens
  // Extra `serve` arguments for the next Start() (e.g. --test-clock); port 0 picks a free one.
  void Configure(std::vector<std::string> extra_args, uint16_t port = 0) {
    extra_args_ = std::move(extra_args);
    port_ = port;
  }
  void Kill(int sig);  // e.g. SIGKILL
  int Stop();          // SIGTERM, returns the exit code
  const std::string& url() const { return url_; }
  std::string ca() const { return data_ + "/tls/ca.pem"; }
  std::string token() const;
  const std::string& data() const { return data_; }
  pid_t pid() const { return child_ ? child_->pid() : -1; }
  // Connection flags for vmsnap-agent.
  std::vector<std::string> conn() const;
  // Blocks in the store's index (DATA/blocks/index.db, read from a copy: the running vault
  // holds it exclusively).
  size_t StoredBlockCount() const;
  // Where each stored block's record is: pack file and the offset of its payload.
  struct StoredRecord {
    std::string pack_path;
    uint64_t payload_offset = 0;
    uint64_t payload_bytes = 0;
  };
  std::vector<StoredRecord> StoredRecords() const;

 private:
  std::string data_;
  std::string url_;
  std::unique_ptr<Child> child_;
  std::vector<std::string> extra_args_;
  uint16_t port_ = 0;
};

// Copies a block store's index (BLOCKS_DIR/index.db and its log) into the directory `to`, to be
// read there: a running vault process holds the index itself exclusively (vault/db.cpp).
void CopyBlockIndex(const std::string& blocks_dir, const std::string& to);

// A TCP port on 127.0.0.1 that was free a moment ago.
uint16_t FreePort();

std::string AgentBinary();
std::string VaultBinary();

// Runs vmsnap-agent with args; appends nothing.
RunResult Agent(const std::vector<std::string>& args);

// Disk images.
void CreateSparseFile(const std::string& path, uint64_t size);
// Writes `blocks` blocks of seeded pseudo-random data at block indexes.
void WriteRandomBlocks(const std::string& path, uint64_t block_size,
                       const std::vector<uint64_t>& indexes, uint64_t seed);
std::string FileSha256(const std::string& path);
std::string ReadWhole(const std::string& path);

bool IsRoot();
bool InCi();

}  // namespace vmsnap::test

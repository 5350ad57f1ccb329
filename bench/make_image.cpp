// vmsnap-bench-image: writes the benchmark's disk images and their churn.
//
//   vmsnap-bench-image create PATH SIZE_MIB SEED
//       A sparse image: about half never written (holes), a quarter compressible (text-like
//       and binary-like records), a quarter random, laid out in 1 MiB extents in a seeded
//       random order so that every kind appears everywhere on the disk.
//   vmsnap-bench-image sample PATH SIZE_MIB SEED
//       Only the data: the same text/binary/random mix with no holes (for the machine's
//       SHA-256 and zstd limits measured on the benchmark's own data).
//   vmsnap-bench-image churn PATH PERCENT SEED
//       Overwrites PERCENT % of the image's size with random 16 KiB writes at random 16 KiB
//       aligned offsets (the 2 % incremental). Prints the bytes written.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr uint64_t kExtent = 1 << 20;

const char* kWords[] = {"backup", "snapshot", "volume",  "restore", "policy", "vault",
                        "block",  "freeze",   "thaw",    "journal", "commit", "select",
                        "from",   "where",    "insert",  "update",  "error",  "warning",
                        "info",   "debug",    "request", "GET",     "POST",   "200",
                        "404",    "user",     "session", "kernel",  "disk",   "the"};

void FillText(std::vector<char>& buf, std::mt19937_64& rng) {
  size_t i = 0;
  while (i < buf.size()) {
    char line[160];
    int n = std::snprintf(line, sizeof line, "2026-11-%02d %02d:%02d:%02d %s %s %s id=%llu\n",
                          static_cast<int>(rng() % 28 + 1), static_cast<int>(rng() % 24),
                          static_cast<int>(rng() % 60), static_cast<int>(rng() % 60),
                          kWords[rng() % 30], kWords[rng() % 30], kWords[rng() % 30],
                          static_cast<unsigned long long>(rng() % 100000));
    for (int k = 0; k < n && i < buf.size(); ++k) buf[i++] = line[k];
  }
}

void FillBinaryLike(std::vector<char>& buf, std::mt19937_64& rng) {
  // Records with small integers and repeated fields, like database pages.
  for (size_t i = 0; i < buf.size(); i += 64) {
    uint64_t rec[8] = {rng() % 1000, 0, rng() % 16, 42, 0, rng() % 100000, 7, 0};
    std::memcpy(buf.data() + i, rec, std::min<size_t>(64, buf.size() - i));
  }
}

void FillRandom(std::vector<char>& buf, std::mt19937_64& rng) {
  for (size_t i = 0; i + 8 <= buf.size(); i += 8) {
    uint64_t v = rng();
    std::memcpy(buf.data() + i, &v, 8);
  }
}

int Create(const char* path, uint64_t size_mib, uint64_t seed, bool dense) {
  int fd = ::open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size_mib * kExtent)) != 0) {
    std::perror(path);
    return 1;
  }
  std::mt19937_64 rng(seed);
  std::vector<int> kinds(size_mib);
  for (uint64_t i = 0; i < size_mib; ++i) {
    uint64_t k = dense ? 4 + i % 4 : i % 8;  // 0-3 hole, 4 text, 5 binary-like, 6-7 random
    kinds[i] = k < 4 ? 0 : (k == 4 ? 1 : (k == 5 ? 2 : 3));
  }
  std::shuffle(kinds.begin(), kinds.end(), rng);
  std::vector<char> buf(kExtent);
  for (uint64_t i = 0; i < size_mib; ++i) {
    if (kinds[i] == 0) continue;  // never written
    if (kinds[i] == 1) FillText(buf, rng);
    if (kinds[i] == 2) FillBinaryLike(buf, rng);
    if (kinds[i] == 3) FillRandom(buf, rng);
    if (::pwrite(fd, buf.data(), kExtent, static_cast<off_t>(i * kExtent)) !=
        static_cast<ssize_t>(kExtent)) {
      std::perror("write");
      return 1;
    }
  }
  ::fsync(fd);
  ::close(fd);
  return 0;
}

int Churn(const char* path, double percent, uint64_t seed) {
  int fd = ::open(path, O_WRONLY);
  if (fd < 0) {
    std::perror(path);
    return 1;
  }
  off_t size = ::lseek(fd, 0, SEEK_END);
  const uint64_t chunk = 16 * 1024;
  uint64_t writes = static_cast<uint64_t>(size * percent / 100.0) / chunk;
  std::mt19937_64 rng(seed);
  std::vector<char> buf(chunk);
  for (uint64_t w = 0; w < writes; ++w) {
    FillRandom(buf, rng);
    uint64_t off = (rng() % (static_cast<uint64_t>(size) / chunk)) * chunk;
    if (::pwrite(fd, buf.data(), chunk, static_cast<off_t>(off)) != static_cast<ssize_t>(chunk)) {
      std::perror("write");
      return 1;
    }
  }
  ::fsync(fd);
  ::close(fd);
  std::printf("%llu\n", static_cast<unsigned long long>(writes * chunk));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "create")
    return Create(argv[2], std::strtoull(argv[3], nullptr, 10), std::strtoull(argv[4], nullptr, 10),
                  false);
  if (argc == 5 && std::string(argv[1]) == "sample")
    return Create(argv[2], std::strtoull(argv[3], nullptr, 10), std::strtoull(argv[4], nullptr, 10),
                  true);
  if (argc == 5 && std::string(argv[1]) == "churn")
    return Churn(argv[2], std::strtod(argv[3], nullptr), std::strtoull(argv[4], nullptr, 10));
  std::fprintf(
      stderr,
      "usage: vmsnap-bench-image create|sample PATH SIZE_MIB SEED | churn PATH PERCENT SEED\n");
  return 2;
}

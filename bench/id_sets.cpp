// vmsnap-bench-idsets: time and peak memory of the vault's "blocks seen" sets at a vault's
// scale, without a vault of that size (docs/PERFORMANCE.md, "The points listing and verify").
//
//   vmsnap-bench-idsets [--ids N] [--points P] [--batch B] [--json]
//
// N distinct block ids (SHA-256-like: uniformly spread) are walked in batches of B, as verify
// walks a VM's maps: P passes, the first with every id new, the later ones with every id
// already seen (the same blocks in a later point). Each set runs in its own child process, so
// that its peak resident memory (from wait4) is its own:
//   hash: std::unordered_set<BlockId> (what the vault used before session 19);
//   runs: RunKeySet<IdPrefix128> (vault/id_sets.hpp), FindAbsent + Insert per batch, as the
//         points listing asks.
// A baseline child that only makes the ids is measured too, and subtracted.
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <unordered_set>
#include <vector>

#include "vault/id_sets.hpp"

namespace {

using vmsnap::BlockId;
using vmsnap::BlockIdHash;
namespace vault = vmsnap::vault;

// A SHA-256-like id for number i (splitmix64 of i, four words).
BlockId MakeId(uint64_t i) {
  BlockId id;
  for (uint64_t word = 0; word < 4; ++word) {
    uint64_t z = i * 4 + word + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    std::memcpy(id.bytes.data() + 8 * word, &z, sizeof z);
  }
  return id;
}

struct Params {
  uint64_t ids = 4'000'000;
  int points = 2;
  uint64_t batch = 4096;
};

// Walks the ids in batches; `visit(batch)` returns how many of the batch were new.
template <typename Visit>
uint64_t Walk(const Params& p, Visit visit) {
  std::vector<BlockId> batch;
  uint64_t fresh = 0;
  for (int point = 0; point < p.points; ++point)
    for (uint64_t first = 0; first < p.ids; first += p.batch) {
      batch.clear();
      for (uint64_t i = first; i < std::min(p.ids, first + p.batch); ++i)
        batch.push_back(MakeId(i));
      fresh += visit(batch);
    }
  return fresh;
}

// Runs `work` in a child; returns {seconds, peak RSS in bytes, exit code}.
struct ChildResult {
  double seconds = 0;
  uint64_t peak_bytes = 0;
  int exit_code = -1;
};
template <typename Work>
ChildResult InChild(Work work) {
  const auto start = std::chrono::steady_clock::now();
  const pid_t pid = fork();
  if (pid < 0) return {};
  if (pid == 0) _exit(work() ? 0 : 1);
  int status = 0;
  rusage usage{};
  if (wait4(pid, &status, 0, &usage) != pid) return {};
  ChildResult r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.peak_bytes = static_cast<uint64_t>(usage.ru_maxrss) * 1024;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Time and peak memory of the vault's sets of blocks seen"};
  Params p;
  bool as_json = false;
  app.add_option("--ids", p.ids, "Distinct block ids")
      ->capture_default_str()
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 34));
  app.add_option("--points", p.points, "Passes over the ids (points sharing every block)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_option("--batch", p.batch, "Ids per batch (the vault reads maps 4096 entries at a time)")
      ->capture_default_str()
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 24));
  app.add_flag("--json", as_json, "Print one JSON object on stdout");
  CLI11_PARSE(app, argc, argv);

  // Each child checks its own answer: exactly `ids` new ids over all passes.
  const ChildResult baseline = InChild(
      [&] { return Walk(p, [](const std::vector<BlockId>&) { return uint64_t{0}; }) == 0; });
  const ChildResult hash = InChild([&] {
    std::unordered_set<BlockId, BlockIdHash> seen;
    return Walk(p, [&](const std::vector<BlockId>& b) {
             uint64_t n = 0;
             for (const auto& id : b) n += seen.insert(id).second ? 1 : 0;
             return n;
           }) == p.ids;
  });
  const ChildResult runs = InChild([&] {
    vault::RunKeySet<vault::IdPrefix128> seen;
    std::vector<vault::IdPrefix128> keys;
    std::vector<size_t> absent;
    return Walk(p, [&](const std::vector<BlockId>& b) {
             keys.clear();
             for (const auto& id : b) keys.push_back(vault::IdPrefix16(id));
             absent.clear();
             seen.FindAbsent(keys, absent);
             if (!absent.empty()) seen.Insert(keys);
             return absent.size();
           }) == p.ids;
  });
  for (const auto* r : {&baseline, &hash, &runs})
    if (r->exit_code != 0) {
      std::fprintf(stderr,
                   "vmsnap-bench-idsets: a child failed (exit %d): wrong count or out of memory\n",
                   r->exit_code);
      return 1;
    }
  const uint64_t lookups = p.ids * static_cast<uint64_t>(p.points);
  auto row = [&](const char* name, const ChildResult& r) {
    const double seconds = std::max(0.0, r.seconds - baseline.seconds);
    const double bytes = r.peak_bytes > baseline.peak_bytes
                             ? static_cast<double>(r.peak_bytes - baseline.peak_bytes)
                             : 0.0;
    return nlohmann::json{{"set", name},
                          {"seconds", seconds},
                          {"ns_per_lookup", 1e9 * seconds / static_cast<double>(lookups)},
                          {"peak_bytes", bytes},
                          {"peak_bytes_per_id", bytes / static_cast<double>(p.ids)}};
  };
  nlohmann::json out{{"ids", p.ids},
                     {"points", p.points},
                     {"batch", p.batch},
                     {"sets", {row("hash", hash), row("runs", runs)}}};
  if (as_json) {
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  std::printf("%llu ids, %d passes, batches of %llu (the id making itself subtracted)\n",
              static_cast<unsigned long long>(p.ids), p.points,
              static_cast<unsigned long long>(p.batch));
  std::printf("%-6s %10s %14s %14s %12s\n", "set", "seconds", "ns per lookup", "peak MB",
              "B per id");
  for (const auto& s : out["sets"])
    std::printf("%-6s %10.2f %14.0f %14.1f %12.1f\n", s["set"].get<std::string>().c_str(),
                s["seconds"].get<double>(), s["ns_per_lookup"].get<double>(),
                s["peak_bytes"].get<double>() / 1e6, s["peak_bytes_per_id"].get<double>());
  return 0;
}

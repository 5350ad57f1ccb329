#include <doctest/doctest.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <thread>

#include "agent/local_state.hpp"
#include "agent/scratch.hpp"
#include "common/aligned_buffer.hpp"
#include "common/http_types.hpp"
#include "common/https_client.hpp"
#include "common/status.hpp"
#include "platform/env.hpp"
#include "tests/support/test_support.hpp"

using namespace vmsnap;

TEST_CASE("status carries phase, cause, fix and an exit code") {
  Status st = Status::InvalidArgument("block size 3 is wrong", "use 64K").InPhase("prepare");
  CHECK(st.ToString() == "prepare: block size 3 is wrong (INVALID_ARGUMENT). Fix: use 64K");
  CHECK(st.ExitCode() == 2);
  CHECK_FALSE(st.retryable());
  CHECK(Status::Unavailable("down").retryable());
  CHECK(Status::Unavailable("down").ExitCode() == 3);
  CHECK(Status::Corruption("x").ExitCode() == 5);
  CHECK(Status().ok());
  CHECK(Status().ExitCode() == 0);
  // The innermost phase wins.
  Status inner = Status::IoError("disk gone").InPhase("read disk");
  inner.InPhase("backup");
  CHECK(inner.phase() == "read disk");
  // From errno: a full filesystem (or quota) asks for space, anything else is an I/O error.
  Status full = Status::FromErrno(ENOSPC, "write /t/disk.img");
  CHECK(full.code() == Code::kResourceExhausted);
  CHECK(full.cause() == "write /t/disk.img: " + std::string(std::strerror(ENOSPC)));
  CHECK_FALSE(full.retryable());
#ifdef EDQUOT
  CHECK(Status::FromErrno(EDQUOT, "write /t/disk.img").code() == Code::kResourceExhausted);
#endif
  CHECK(Status::FromErrno(EIO, "read /dev/vdb").code() == Code::kIoError);
}

TEST_CASE("aligned buffer pool: buffers come back for reuse, within its bounds") {
  AlignedBufferPool pool(/*max_kept=*/2, /*max_bytes=*/1 << 20);
  CHECK(pool.Take().capacity() == 0);  // nothing kept yet
  const char* first = nullptr;
  {
    AlignedBufferPool::Lease lease(pool);
    lease->Reserve(64 << 10);
    first = lease->data();
    CHECK(reinterpret_cast<uintptr_t>(first) % AlignedBuffer::kAlignment == 0);
  }
  {
    AlignedBufferPool::Lease again(pool);  // the same memory, no new allocation
    CHECK(again->data() == first);
    CHECK(again->capacity() == (64u << 10));
  }
  // Too large to keep: freed when given back.
  AlignedBuffer big(2 << 20);
  pool.Give(std::move(big));
  AlignedBuffer a = pool.Take();
  CHECK(a.data() == first);
  CHECK(pool.Take().capacity() == 0);
  // At most max_kept are kept.
  pool.Give(std::move(a));
  pool.Give(AlignedBuffer(4096));
  pool.Give(AlignedBuffer(8192));
  CHECK(pool.Take().capacity() > 0);
  CHECK(pool.Take().capacity() > 0);
  CHECK(pool.Take().capacity() == 0);
}

TEST_CASE("HTTP error responses carry the status back to the client") {
  Status st = Status::NotFound("recovery point x does not exist", "list them").InPhase("find");
  HttpResponse r = ErrorResponse(st);
  CHECK(r.status == 404);
  Status back = StatusFromResponse(r);
  CHECK(back.code() == Code::kNotFound);
  CHECK(back.cause().find("recovery point x does not exist") != std::string::npos);
  CHECK(back.fix() == "list them");
  CHECK(StatusFromResponse(HttpResponse{503, "text/plain", "busy"}).retryable());
  CHECK(StatusFromResponse(HttpResponse{401, "text/plain", ""}).code() == Code::kUnauthenticated);
}

TEST_CASE("request targets are split and decoded") {
  std::string path;
  std::map<std::string, std::string> q;
  ParseTarget("/v1/rps?item=my%20vm&x=1&flag", path, q);
  CHECK(path == "/v1/rps");
  CHECK(q["item"] == "my vm");
  CHECK(q["x"] == "1");
  CHECK(q.count("flag") == 1);
}

TEST_CASE("vault URLs must be https with a host and numeric port") {
  auto u = VaultUrl::Parse("https://127.0.0.1:8443");
  REQUIRE(u.ok());
  CHECK(u->host == "127.0.0.1");
  CHECK(u->port == "8443");
  auto v6 = VaultUrl::Parse("https://[::1]:9000/");
  REQUIRE(v6.ok());
  CHECK(v6->host == "::1");
  CHECK(VaultUrl::Parse("https://vault.example").value().port == "443");
  CHECK(VaultUrl::Parse("http://127.0.0.1:8443").status().code() == Code::kInvalidArgument);
  CHECK_FALSE(VaultUrl::Parse("https://host:port").ok());
  CHECK_FALSE(VaultUrl::Parse("https://host:1/path").ok());
}

TEST_CASE("agent state round trip; damage makes it unusable, not wrong") {
  test::TempDir dir;
  agent::DiskState s{{"https://127.0.0.1:1", "vm", "/dev/vdb", "rp1", 3 * 65536, 65536, 3},
                     {{1, 2}, {0, 0}, {3, 4}}};
  std::string path =
      agent::DiskStatePath(dir.path(), s.info.vault_url, s.info.item, s.info.disk_key);
  CHECK(path != agent::DiskStatePath(dir.path(), s.info.vault_url, s.info.item, "/dev/vdc"));
  REQUIRE(agent::SaveDiskState(path, s).ok());
  auto back = agent::LoadDiskState(path);
  REQUIRE(back.ok());
  CHECK(back->info.recovery_point == "rp1");
  CHECK(back->info.blocks == 3);
  CHECK(back->hashes == s.hashes);
  std::string data = test::ReadWhole(path);
  data[data.size() / 2] ^= 1;
  REQUIRE(platform::Env::Default()->WriteFileAtomic(path, data).ok());
  CHECK(agent::LoadDiskState(path).status().code() == Code::kCorruption);
  data[data.size() / 2] ^= 1;
  data.pop_back();
  REQUIRE(platform::Env::Default()->WriteFileAtomic(path, data).ok());
  CHECK(agent::LoadDiskState(path).status().code() == Code::kCorruption);
}

TEST_CASE("agent state of a large disk is streamed in ranges, and read back by range") {
  test::TempDir dir;
  // 200 000 blocks: more than three of SaveDiskState's 64 Ki-block ranges.
  const uint64_t blocks = 200000;
  auto hash_of = [](uint64_t i) { return FastHash{i * 7 + 1, ~i}; };
  agent::DiskStateInfo info{"https://127.0.0.1:1", "vm", "/dev/vdb", "rp9",
                            blocks * 4096,         4096, blocks};
  const std::string path = dir.path() + "/big.state";
  std::vector<std::pair<uint64_t, size_t>> asked;
  REQUIRE(agent::SaveDiskState(path, info, [&](uint64_t first, std::span<FastHash> out) {
            asked.emplace_back(first, out.size());
            for (size_t k = 0; k < out.size(); ++k) out[k] = hash_of(first + k);
            return Status::Ok();
          }).ok());
  REQUIRE(asked.size() == 4);
  CHECK(asked[0] == std::pair<uint64_t, size_t>{0, 65536});
  CHECK(asked[3] == std::pair<uint64_t, size_t>{196608, 3392});
  auto reader = agent::DiskStateReader::Open(path);
  REQUIRE(reader.ok());
  CHECK((*reader)->info().recovery_point == "rp9");
  CHECK((*reader)->info().blocks == blocks);
  std::vector<FastHash> some(1000);
  REQUIRE((*reader)->ReadHashes(65000, some).ok());
  for (size_t k = 0; k < some.size(); ++k) CHECK(some[k] == hash_of(65000 + k));
  CHECK((*reader)->ReadHashes(blocks - 10, some).code() == Code::kInternal);
  // A source that fails leaves no state file behind (and no temporary file).
  const std::string other = dir.path() + "/failed.state";
  Status st = agent::SaveDiskState(other, info, [](uint64_t first, std::span<FastHash>) {
    return first > 0 ? Status::IoError("scratch read failed") : Status::Ok();
  });
  CHECK(st.code() == Code::kIoError);
  size_t files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) ++files;
  CHECK(files == 1);
}

TEST_CASE("env: scratch files have no name, read back what was written and zero elsewhere") {
  test::TempDir dir;
  auto* env = platform::Env::Default();
  auto scratch = env->CreateScratchFile(dir.path());
  REQUIRE(scratch.ok());
  // Several threads write disjoint ranges, far apart (a sparse file).
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t)
    writers.emplace_back([&, t] {
      std::string piece(1000, static_cast<char>('a' + t));
      REQUIRE((*scratch)->WriteAt(uint64_t(t) << 30, std::as_bytes(std::span(piece))).ok());
    });
  for (auto& w : writers) w.join();
  for (int t = 0; t < 4; ++t) {
    std::string back(1000, '\0');
    REQUIRE((*scratch)->ReadAt(uint64_t(t) << 30, std::as_writable_bytes(std::span(back))).ok());
    CHECK(back == std::string(1000, static_cast<char>('a' + t)));
  }
  std::string hole(100, 'x'), beyond(100, 'x');
  REQUIRE((*scratch)->ReadAt(5000, std::as_writable_bytes(std::span(hole))).ok());
  REQUIRE((*scratch)->ReadAt(5ull << 30, std::as_writable_bytes(std::span(beyond))).ok());
  CHECK(hole == std::string(100, '\0'));
  CHECK(beyond == std::string(100, '\0'));
  // Linux: nothing in the directory carries its name, even while it is open. Windows: its
  // name goes with its handle.
#ifndef _WIN32
  CHECK(std::filesystem::is_empty(dir.path()));
#endif
  scratch->reset();
  CHECK(std::filesystem::is_empty(dir.path()));
  auto missing = env->CreateScratchFile(dir / "no-such-dir");
  CHECK_FALSE(missing.ok());
  CHECK(missing.status().fix().find("writable") != std::string::npos);
}

TEST_CASE("block map slots keep each entry's id and check; slots never written have no entry") {
  test::TempDir dir;
  auto scratch = platform::Env::Default()->CreateScratchFile(dir.path());
  REQUIRE(scratch.ok());
  auto id = [](char c) {
    std::string s(64, c);
    return Sha256Block(std::as_bytes(std::span(s)));
  };
  const std::vector<ManifestEntry> written{
      {5, id('a'), FastHash{0x0102030405060708ull, 0xf0e0d0c0b0a09080ull}},
      {6, id('b'), std::nullopt},  // from an older agent's manifest
      {7, std::nullopt, std::nullopt}};
  std::string buf;
  REQUIRE(agent::WriteEntriesAtTheirIndex(**scratch, written, 100, buf).ok());
  std::vector<ManifestEntry> back;
  REQUIRE(agent::ReadEntrySlots(**scratch, 4, 5, back, buf).ok());
  REQUIRE(back.size() == 5);
  CHECK_FALSE(back[0].id.has_value());  // slot 4: never written
  CHECK(back[1] == written[0]);
  CHECK(back[2] == written[1]);
  CHECK(back[3] == written[2]);
  CHECK_FALSE(back[4].id.has_value());
  CHECK_FALSE(back[4].check.has_value());
  // A reused output vector keeps nothing of what the slot read before held (its check).
  REQUIRE(agent::ReadEntrySlots(**scratch, 5, 1, back, buf).ok());
  REQUIRE(back.size() == 1);
  CHECK(back[0].check.has_value());
  REQUIRE(agent::ReadEntrySlots(**scratch, 6, 1, back, buf).ok());
  REQUIRE(back.size() == 1);
  CHECK(back[0] == written[1]);
  // The bytes: each slot a manifest entry (docs/FORMAT.md) padded with zeros to 57 bytes.
  std::string raw(2 * agent::kEntrySlot, 'x');
  REQUIRE((*scratch)->ReadAt(5 * agent::kEntrySlot, std::as_writable_bytes(std::span(raw))).ok());
  auto le64 = [](uint64_t v) {
    std::string out;
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
    return out;
  };
  auto id_bytes = [](const BlockId& b) { return std::string(b.bytes.begin(), b.bytes.end()); };
  CHECK(raw.substr(0, 57) == le64(5) + '\x02' + id_bytes(*written[0].id) +
                                 le64(0x0102030405060708ull) + le64(0xf0e0d0c0b0a09080ull));
  CHECK(raw.substr(57) == le64(6) + '\x01' + id_bytes(*written[1].id) + std::string(16, '\0'));
}

TEST_CASE("env: a file written in pieces appears whole at commit, or not at all") {
  test::TempDir dir;
  auto* env = platform::Env::Default();
  const std::string path = dir / "state";
  REQUIRE(env->WriteFileAtomic(path, "old").ok());
  {
    auto w = env->CreateFileAtomic(path, 0600);
    REQUIRE(w.ok());
    REQUIRE((*w)->Append("new ").ok());
    CHECK(test::ReadWhole(path) == "old");  // not yet
  }                                         // dropped without Commit
  CHECK(test::ReadWhole(path) == "old");
  size_t files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) ++files;
  CHECK(files == 1);  // its temporary file is gone
  auto w = env->CreateFileAtomic(path, 0600);
  REQUIRE(w.ok());
  REQUIRE((*w)->Append("new ").ok());
  REQUIRE((*w)->Append("content").ok());
  REQUIRE((*w)->Commit().ok());
  CHECK(test::ReadWhole(path) == "new content");
#ifndef _WIN32  // Windows: a protected DACL instead of mode bits
  CHECK((std::filesystem::status(path).permissions() & std::filesystem::perms::others_read) ==
        std::filesystem::perms::none);
#endif
}

TEST_CASE("env: the storage of a path: its filesystem, whether it is a file, what it holds") {
  test::TempDir dir;
  auto* env = platform::Env::Default();
  const std::string file = dir / "data.img";
  test::CreateSparseFile(file, 1 << 20);
  test::WriteRandomBlocks(file, 64 << 10, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
                          2);
  auto of_file = env->StorageOf(file);
  REQUIRE(of_file.ok());
  CHECK(of_file->regular_file);
  CHECK(of_file->allocated_bytes >= (1u << 20));
  auto of_dir = env->StorageOf(dir.path());
  REQUIRE(of_dir.ok());
  CHECK_FALSE(of_dir->regular_file);
  CHECK(of_dir->filesystem == of_file->filesystem);
  CHECK(env->StorageOf(dir / "missing").status().code() == Code::kNotFound);
}

TEST_CASE("env: sparse files report holes; restore targets are size-checked") {
  test::TempDir dir;
  auto* env = platform::Env::Default();
  std::string img = dir / "sparse.img";
  test::CreateSparseFile(img, 64 << 20);
  test::WriteRandomBlocks(img, 1 << 20, {10}, 1);
  auto r = env->OpenDiskForRead(img);
  REQUIRE(r.ok());
  CHECK((*r)->size() == (64u << 20));
  auto data = (*r)->NextData(0);
  REQUIRE(data.ok());
  REQUIRE(data->has_value());
  CHECK((*data)->begin <= (10u << 20));
  CHECK((*data)->end >= (11u << 20));
  CHECK((*data)->end - (*data)->begin < (8u << 20));
  auto none = (*r)->NextData(12u << 20);
  REQUIRE(none.ok());
  CHECK_FALSE(none->has_value());
  // What the file holds: its data, not its size.
  auto storage = env->StorageOf(img);
  REQUIRE(storage.ok());
  CHECK(storage->allocated_bytes >= (1u << 20));
  CHECK(storage->allocated_bytes < (8u << 20));

  CHECK(env->OpenDiskForRead(dir / "missing").status().code() == Code::kNotFound);
  CHECK(env->OpenDiskForRead(dir.path()).status().code() == Code::kInvalidArgument);

  std::string small = dir / "small.img";
  test::CreateSparseFile(small, 1 << 20);
  auto w = env->OpenDiskForWrite(small, 2 << 20);
  CHECK(w.status().code() == Code::kInvalidArgument);
  CHECK(w.status().cause().find("too small") != std::string::npos);
  auto fresh = env->OpenDiskForWrite(dir / "new.img", 2 << 20);
  REQUIRE(fresh.ok());
  CHECK((*fresh)->starts_zeroed());
  CHECK((*fresh)->size() == (2u << 20));
}

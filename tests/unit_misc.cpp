#include <doctest/doctest.h>

#include "agent/local_state.hpp"
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
  agent::DiskState s{"https://127.0.0.1:1",   "vm", "/dev/vdb", "rp1", 3 * 65536, 65536,
                     {{1, 2}, {0, 0}, {3, 4}}};
  std::string path = agent::DiskStatePath(dir.path(), s.vault_url, s.item, s.disk_key);
  CHECK(path != agent::DiskStatePath(dir.path(), s.vault_url, s.item, "/dev/vdc"));
  REQUIRE(agent::SaveDiskState(path, s).ok());
  auto back = agent::LoadDiskState(path);
  REQUIRE(back.ok());
  CHECK(back->recovery_point == "rp1");
  CHECK(back->hashes == s.hashes);
  std::string data = test::ReadWhole(path);
  data[data.size() / 2] ^= 1;
  REQUIRE(platform::Env::Default()->WriteFileAtomic(path, data).ok());
  CHECK(agent::LoadDiskState(path).status().code() == Code::kCorruption);
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

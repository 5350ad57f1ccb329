// The composing reader of a physical disk (agent/composed_disk_reader.hpp) over real files
// opened with the platform's Env: a "disk" file and one "shadow copy" file per volume, with
// different content, so every byte read shows where it came from. Portable (Env, std::fstream,
// tests/support's TempDir and image helpers): also part of windows_tests.exe under Wine.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "agent/composed_disk_reader.hpp"
#include "platform/env.hpp"
#include "platform/vss.hpp"
#include "tests/support/test_support.hpp"

namespace vmsnap::test {
namespace {

using agent::ComposedDiskReader;
using agent::ShadowedVolume;
using Bytes = std::vector<std::byte>;
constexpr uint64_t K = 1024;

// Distinct content per source: byte i of a file with tag t.
Bytes Pattern(uint64_t size, uint8_t tag) {
  Bytes b(size);
  for (uint64_t i = 0; i < size; ++i)
    b[i] = static_cast<std::byte>((i * 131 + (i >> 9) * 7 + tag * 37) & 0xff);
  return b;
}

void WriteFile(const std::string& path, const Bytes& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  REQUIRE(out.good());
}

void WriteAt(const std::string& path, uint64_t offset, const std::string& text) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(text.data(), static_cast<std::streamsize>(text.size()));
  REQUIRE(f.good());
}

std::unique_ptr<platform::DiskReader> Open(const std::string& path) {
  auto r = platform::Env::Default()->OpenDiskForRead(path);
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return std::move(*r);
}

// A 256 KiB disk with two volumes: A at [64K, 128K), B at [160K, 224K). Live gaps at
// [0, 64K) (partition table), [128K, 160K) and [224K, 256K) (GPT backup at the end).
struct Fixture {
  TempDir dir;
  std::string disk_path = dir / "disk.img";
  std::string a_path = dir / "shadow-a.img";
  std::string b_path = dir / "shadow-b.img";
  Bytes disk = Pattern(256 * K, 1);
  Bytes a = Pattern(64 * K, 2);
  Bytes b = Pattern(64 * K, 3);
  Bytes expected;  // the composition
  Fixture() {
    WriteFile(disk_path, disk);
    WriteFile(a_path, a);
    WriteFile(b_path, b);
    expected = disk;
    std::copy(a.begin(), a.end(), expected.begin() + 64 * K);
    std::copy(b.begin(), b.end(), expected.begin() + 160 * K);
  }
  std::vector<ShadowedVolume> Volumes() {
    std::vector<ShadowedVolume> v;
    // Given out of disk order: the reader sorts them.
    v.push_back({{"\\\\?\\Volume{bbbb}\\", {{160 * K, 64 * K}}, 0}, b_path, Open(b_path)});
    v.push_back({{"\\\\?\\Volume{aaaa}\\", {{64 * K, 64 * K}}, 0}, a_path, Open(a_path)});
    return v;
  }
  std::unique_ptr<ComposedDiskReader> Reader() {
    auto r = ComposedDiskReader::Create(Open(disk_path), Volumes());
    REQUIRE_MESSAGE(r.ok(), r.status().ToString());
    return std::move(*r);
  }
};

Bytes Read(platform::DiskReader& r, uint64_t offset, uint64_t len) {
  Bytes buf(len, std::byte{0xEE});
  Status st = r.ReadAt(offset, buf);
  REQUIRE_MESSAGE(st.ok(), st.ToString());
  return buf;
}

Bytes Slice(const Bytes& b, uint64_t offset, uint64_t len) {
  return Bytes(b.begin() + static_cast<std::ptrdiff_t>(offset),
               b.begin() + static_cast<std::ptrdiff_t>(offset + len));
}

TEST_CASE("composed disk reader: volumes from their shadow copies, the rest from the disk") {
  Fixture f;
  auto r = f.Reader();
  CHECK(r->size() == 256 * K);
  CHECK(r->path() == f.disk_path);
  CHECK_FALSE(r->is_block_device());
  REQUIRE(r->volumes().size() == 2);
  CHECK(r->volumes()[0].layout.volume == "\\\\?\\Volume{aaaa}\\");

  // The layout: three live gaps and two volumes, in disk order, covering the disk.
  const auto& p = r->pieces();
  REQUIRE(p.size() == 5);
  CHECK((p[0].begin == 0 && p[0].end == 64 * K && p[0].volume == -1));
  CHECK((p[1].begin == 64 * K && p[1].end == 128 * K && p[1].volume == 0));
  CHECK((p[2].begin == 128 * K && p[2].end == 160 * K && p[2].volume == -1));
  CHECK((p[3].begin == 160 * K && p[3].end == 224 * K && p[3].volume == 1));
  CHECK((p[4].begin == 224 * K && p[4].end == 256 * K && p[4].volume == -1));
  CHECK(r->live_bytes() == 128 * K);
  const auto live = r->LiveRanges();
  REQUIRE(live.size() == 3);
  CHECK((live[2].begin == 224 * K && live[2].end == 256 * K));

  SUBCASE("the whole disk") {
    CHECK(Read(*r, 0, 256 * K) == f.expected);
  }
  SUBCASE("fully inside a volume: the volume-relative offset of its shadow copy") {
    CHECK(Read(*r, 70 * K + 3, 5000) == Slice(f.a, 6 * K + 3, 5000));
    CHECK(Read(*r, 160 * K, 64 * K) == f.b);
  }
  SUBCASE("fully outside: the disk itself") {
    CHECK(Read(*r, 0, 512) == Slice(f.disk, 0, 512));
    CHECK(Read(*r, 130 * K, 30 * K) == Slice(f.disk, 130 * K, 30 * K));
  }
  SUBCASE("spanning volume boundaries") {
    CHECK(Read(*r, 60 * K, 8 * K) == Slice(f.expected, 60 * K, 8 * K));
    // From the partition table through A, a gap and B into the backup header.
    CHECK(Read(*r, 32 * K + 1, 200 * K) == Slice(f.expected, 32 * K + 1, 200 * K));
    CHECK(Read(*r, 127 * K, 34 * K) == Slice(f.expected, 127 * K, 34 * K));
  }
  SUBCASE("at the end of the disk; past it reads as zeros") {
    Bytes tail = Read(*r, 250 * K, 10 * K);
    CHECK(Slice(tail, 0, 6 * K) == Slice(f.disk, 250 * K, 6 * K));
    CHECK(Slice(tail, 6 * K, 4 * K) == Bytes(4 * K, std::byte{0}));
    CHECK(Read(*r, 300 * K, 1000) == Bytes(1000, std::byte{0}));
  }
  SUBCASE("identity is the disk's") {
    auto id = r->Identity();
    auto disk_id = Open(f.disk_path)->Identity();
    REQUIRE(id.ok());
    REQUIRE(disk_id.ok());
    CHECK(*id == *disk_id);
  }
  SUBCASE("next data covers the whole disk (no holes here), within bounds") {
    uint64_t covered = 0;
    for (uint64_t off = 0;;) {
      auto d = r->NextData(off);
      REQUIRE(d.ok());
      if (!*d) break;
      REQUIRE((*d)->begin >= off);
      REQUIRE((*d)->end > (*d)->begin);
      REQUIRE((*d)->end <= r->size());
      covered += (*d)->end - (*d)->begin;
      off = (*d)->end;
    }
    CHECK(covered == 256 * K);
    auto none = r->NextData(256 * K);
    REQUIRE(none.ok());
    CHECK_FALSE(none->has_value());
  }
}

TEST_CASE("composed disk reader: reads from several threads at once") {
  Fixture f;
  auto r = f.Reader();
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<uint64_t>(t) + 1);
      Bytes buf;
      for (int i = 0; i < 200; ++i) {
        const uint64_t off = rng() % (256 * K), len = 1 + rng() % (80 * K);
        buf.assign(len, std::byte{0xEE});
        if (!r->ReadAt(off, buf).ok()) {
          ++mismatches[t];
          continue;
        }
        const uint64_t n = std::min(len, 256 * K - off);
        if (!std::equal(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(n),
                        f.expected.begin() + static_cast<std::ptrdiff_t>(off)))
          ++mismatches[t];
      }
    });
  for (auto& th : threads) th.join();
  CHECK(mismatches == std::vector<int>(4, 0));
}

TEST_CASE("composed disk reader: layouts it cannot compose are refused with the fix") {
  Fixture f;
  auto create = [&](platform::VssDiskVolume layout, std::unique_ptr<platform::DiskReader> shadow) {
    std::vector<ShadowedVolume> v;
    v.push_back({std::move(layout), f.a_path, std::move(shadow)});
    return ComposedDiskReader::Create(Open(f.disk_path), std::move(v));
  };
  const std::string vol = "\\\\?\\Volume{aaaa}\\";

  SUBCASE("a volume with two extents on the disk (spanned dynamic volume)") {
    auto r = create({vol, {{64 * K, 32 * K}, {160 * K, 32 * K}}, 0}, Open(f.a_path));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == Code::kInvalidArgument);
    CHECK(r.status().phase() == "vss volumes");
    CHECK(r.status().cause().find("volume " + vol + " has 2 extents") != std::string::npos);
    CHECK(r.status().cause().find("spanned, striped or mirrored") != std::string::npos);
    CHECK(r.status().fix().find("back up the volume " + vol + " itself") != std::string::npos);
  }
  SUBCASE("a volume with an extent here and one on another disk") {
    auto r = create({vol, {{64 * K, 64 * K}}, 1}, Open(f.a_path));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().cause().find("1 on other disks") != std::string::npos);
    CHECK(r.status().fix().find("--disk " + vol) != std::string::npos);
  }
  SUBCASE("an extent past the end of the disk") {
    auto r = create({vol, {{240 * K, 64 * K}}, 0}, Open(f.a_path));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == Code::kInvalidArgument);
    CHECK(r.status().cause().find("past the end of " + f.disk_path) != std::string::npos);
  }
  SUBCASE("an offset that overflows") {
    auto r = create({vol, {{UINT64_MAX - 10, 64 * K}}, 0}, Open(f.a_path));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == Code::kInvalidArgument);
  }
  SUBCASE("an empty extent") {
    auto r = create({vol, {{64 * K, 0}}, 0}, Open(f.a_path));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().cause().find("empty extent") != std::string::npos);
  }
  SUBCASE("no extent at all") {
    auto r = create({vol, {}, 0}, Open(f.a_path));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().cause().find("has 0 extents") != std::string::npos);
  }
  SUBCASE("overlapping volumes") {
    std::vector<ShadowedVolume> v;
    v.push_back({{vol, {{64 * K, 64 * K}}, 0}, f.a_path, Open(f.a_path)});
    v.push_back({{"\\\\?\\Volume{bbbb}\\", {{120 * K, 64 * K}}, 0}, f.b_path, Open(f.b_path)});
    auto r = ComposedDiskReader::Create(Open(f.disk_path), std::move(v));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().cause().find("overlap") != std::string::npos);
    CHECK(r.status().cause().find("Volume{bbbb}") != std::string::npos);
  }
  SUBCASE("a shadow copy smaller than its volume") {
    auto r = create({vol, {{0, 128 * K}}, 0}, Open(f.a_path));  // a holds 64 KiB
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == Code::kConflict);
    CHECK(r.status().cause().find("fewer than the volume's 131072 bytes") != std::string::npos);
  }
  SUBCASE("no reader for a shadow copy") {
    auto r = create({vol, {{64 * K, 64 * K}}, 0}, nullptr);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == Code::kInternal);
  }
  SUBCASE("no volumes: everything from the disk") {
    auto r = ComposedDiskReader::Create(Open(f.disk_path), {});
    REQUIRE(r.ok());
    CHECK((*r)->live_bytes() == 256 * K);
    CHECK(Read(**r, 0, 256 * K) == f.disk);
  }
}

TEST_CASE("composed disk reader: a BitLocker partition is refused, not composed") {
  Fixture f;
  WriteAt(f.disk_path, 64 * K + 3, "-FVE-FS-");  // the encrypted partition on the disk
  WriteAt(f.a_path, 3, "NTFS    ");              // the unlocked volume's shadow copy
  std::vector<ShadowedVolume> v;
  v.push_back({{"\\\\?\\Volume{aaaa}\\", {{64 * K, 64 * K}}, 0}, f.a_path, Open(f.a_path)});
  auto r = ComposedDiskReader::Create(Open(f.disk_path), std::move(v));
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == Code::kInvalidArgument);
  CHECK(r.status().cause().find("BitLocker") != std::string::npos);
  CHECK(r.status().fix().find("back up the volume \\\\?\\Volume{aaaa}\\ itself") !=
        std::string::npos);

  // The same signature in the shadow copy (an encrypted view of both) composes.
  WriteAt(f.a_path, 3, "-FVE-FS-");
  std::vector<ShadowedVolume> v2;
  v2.push_back({{"\\\\?\\Volume{aaaa}\\", {{64 * K, 64 * K}}, 0}, f.a_path, Open(f.a_path)});
  CHECK(ComposedDiskReader::Create(Open(f.disk_path), std::move(v2)).ok());
}

// A real file reader whose reads fail, as a shadow copy device does once VSS deleted the
// shadow copy (its storage full). Only the failure is injected; the rest is the real reader.
class LostShadow final : public platform::DiskReader {
 public:
  explicit LostShadow(std::unique_ptr<platform::DiskReader> real) : real_(std::move(real)) {}
  const std::string& path() const override { return real_->path(); }
  uint64_t size() const override { return real_->size(); }
  bool is_block_device() const override { return true; }
  Status ReadAt(uint64_t offset, std::span<std::byte>) override {
    return Status::IoError("read " + path() + " at offset " + std::to_string(offset) +
                           ": The device is not ready. (error 21)");
  }
  Result<std::optional<platform::ByteRange>> NextData(uint64_t offset) override {
    return real_->NextData(offset);
  }
  Result<platform::FileIdentity> Identity() override { return real_->Identity(); }

 private:
  std::unique_ptr<platform::DiskReader> real_;
};

TEST_CASE("composed disk reader: a failed shadow read names the volume and its device") {
  Fixture f;
  std::vector<ShadowedVolume> v;
  v.push_back({{"\\\\?\\Volume{aaaa}\\", {{64 * K, 64 * K}}, 0},
               "\\\\?\\GLOBALROOT\\Device\\X1",
               std::make_unique<LostShadow>(Open(f.a_path))});
  auto r = ComposedDiskReader::Create(Open(f.disk_path), std::move(v));
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  CHECK(Read(**r, 0, 64 * K) == Slice(f.disk, 0, 64 * K));  // the disk's ranges still read
  Bytes buf(16 * K);
  Status st = (*r)->ReadAt(60 * K, buf);
  REQUIRE_FALSE(st.ok());
  CHECK(st.code() == Code::kIoError);
  CHECK(st.cause().find("volume \\\\?\\Volume{aaaa}\\ of " + f.disk_path +
                        " from its shadow copy \\\\?\\GLOBALROOT\\Device\\X1") == 0);
  CHECK(st.cause().find("at offset 0: The device is not ready") != std::string::npos);
  CHECK(st.fix().find("vssadmin resize shadowstorage") != std::string::npos);
}

TEST_CASE("composed disk reader: holes of sparse images are skipped, per source") {
  TempDir dir;
  const std::string disk = dir / "disk.img", shadow = dir / "shadow.img";
  CreateSparseFile(disk, 1024 * K);
  CreateSparseFile(shadow, 256 * K);
  WriteRandomBlocks(disk, 4 * K, {0, 75, 225}, 1);  // 0, 300K (inside the volume), 900K
  WriteRandomBlocks(shadow, 4 * K, {16}, 2);        // volume offset 64K = disk 320K
  std::vector<ShadowedVolume> v;
  v.push_back({{"\\\\?\\Volume{aaaa}\\", {{256 * K, 256 * K}}, 0}, shadow, Open(shadow)});
  auto r = ComposedDiskReader::Create(Open(disk), std::move(v));
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (uint64_t off = 0;;) {
    auto d = (*r)->NextData(off);
    REQUIRE(d.ok());
    if (!*d) break;
    ranges.emplace_back((*d)->begin, (*d)->end);
    off = (*d)->end;
  }
  // The live data at 300K is inside the volume: the shadow's holes hide it.
  CHECK(ranges == std::vector<std::pair<uint64_t, uint64_t>>{
                      {0, 4 * K}, {320 * K, 324 * K}, {900 * K, 904 * K}});
}

}  // namespace
}  // namespace vmsnap::test

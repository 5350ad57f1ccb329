#include <doctest/doctest.h>

#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <span>
#include <string>
#include <thread>

#include "common/block_codec.hpp"
#include "common/manifest.hpp"

using namespace vmsnap;

namespace {
std::vector<std::byte> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng() & 0xff);
  return v;
}
std::vector<std::byte> TextBytes(size_t n) {
  std::vector<std::byte> v(n);
  const char* s = "the quick brown fox jumps over the lazy dog\n";
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>(s[i % 44]);
  return v;
}
}  // namespace

TEST_CASE("block ids are SHA-256: the standard test vectors, from several threads") {
  auto bytes = [](std::string_view s) { return std::as_bytes(std::span(s.data(), s.size())); };
  CHECK(Sha256Block(bytes("")).Hex() ==
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(Sha256Block(bytes("abc")).Hex() ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string million(1000000, 'a');
  const std::string want = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";
  std::vector<std::thread> threads;
  std::atomic<int> right{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 3; ++i)
        if (Sha256Block(bytes(million)).Hex() == want) right++;
    });
  for (auto& t : threads) t.join();
  CHECK(right == 12);
}

TEST_CASE("compressible block round-trips through zstd and keeps its id") {
  auto plain = TextBytes(65536);
  BlockId id = Sha256Block(plain);
  EncodedBlock enc = EncodeBlock(id, plain);
  CHECK(enc.codec == BlockCodec::kZstd);
  CHECK(enc.payload.size() < plain.size() / 10);
  std::vector<std::byte> out;
  REQUIRE(DecodeBlock(enc, out).ok());
  CHECK(out == plain);
}

TEST_CASE("incompressible block is stored raw") {
  auto plain = RandomBytes(65536, 1);
  EncodedBlock enc = EncodeBlock(Sha256Block(plain), plain);
  CHECK(enc.codec == BlockCodec::kRaw);
  CHECK(enc.payload.size() == plain.size());
  std::vector<std::byte> out;
  REQUIRE(DecodeBlock(enc, out).ok());
  CHECK(out == plain);
}

TEST_CASE("a damaged payload or a wrong id is reported as corruption") {
  for (auto plain : {TextBytes(16384), RandomBytes(16384, 2)}) {
    EncodedBlock enc = EncodeBlock(Sha256Block(plain), plain);
    std::vector<std::byte> out;
    EncodedBlock flipped = enc;
    flipped.payload[flipped.payload.size() / 2] ^= 0x40;
    Status st = DecodeBlock(flipped, out);
    CHECK(st.code() == Code::kCorruption);
    EncodedBlock wrong_id = enc;
    wrong_id.id.bytes[0] ^= 1;
    st = DecodeBlock(wrong_id, out);
    CHECK(st.code() == Code::kCorruption);
    CHECK(st.cause().find(wrong_id.id.Hex()) != std::string::npos);
  }
}

TEST_CASE(
    "a block verified by its manifest check: accepted intact, damage and other bytes refused") {
  for (auto plain : {TextBytes(16384), RandomBytes(16384, 4)}) {
    const EncodedBlock enc = EncodeBlock(Sha256Block(plain), plain);
    const FastHash check = FastHashBlock(plain);
    std::vector<std::byte> out(plain.size());
    REQUIRE(DecodeBlockInto(enc, out, &check).ok());
    CHECK(out == plain);
    EncodedBlock flipped = enc;
    flipped.payload[flipped.payload.size() / 2] ^= 0x40;
    CHECK(DecodeBlockInto(flipped, out, &check).code() == Code::kCorruption);
    // Another block's bytes of the same size under this id: caught by the check as by the id.
    auto other_plain = RandomBytes(16384, 5);
    const EncodedBlock swapped = EncodeBlock(enc.id, other_plain);
    Status st = DecodeBlockInto(swapped, out, &check);
    CHECK(st.code() == Code::kCorruption);
    CHECK(st.cause().find("XXH3-128") != std::string::npos);
    CHECK(DecodeBlockInto(swapped, out).code() == Code::kCorruption);
    // A wrong check (written by a faulty agent) does not fail intact bytes: their SHA-256 is
    // their id. With a wrong check and wrong bytes, nothing passes.
    FastHash wrong_check = check;
    wrong_check.high ^= 1;
    std::fill(out.begin(), out.end(), std::byte{0});
    REQUIRE(DecodeBlockInto(enc, out, &wrong_check).ok());
    CHECK(out == plain);
    CHECK(DecodeBlockInto(swapped, out, &wrong_check).code() == Code::kCorruption);
  }
}

TEST_CASE("random data is recognised as incompressible, data zstd shrinks is not") {
  CHECK(LooksIncompressible(RandomBytes(32768, 4)));
  CHECK(LooksIncompressible(RandomBytes(4u << 20, 5)));
  CHECK_FALSE(LooksIncompressible(TextBytes(32768)));
  // Half random, half zeros: zstd halves it, so it must be compressed.
  auto half = RandomBytes(32768, 6);
  std::fill(half.begin() + 16384, half.end(), std::byte{0});
  CHECK_FALSE(LooksIncompressible(half));
  EncodedBlock enc = EncodeBlock(Sha256Block(half), half);
  CHECK(enc.codec == BlockCodec::kZstd);
  CHECK(enc.payload.size() < 17000);
  // Random bytes drawn from 128 values (7 bits each): zstd's entropy coder saves about 1/8.
  auto seven = RandomBytes(32768, 7);
  for (auto& b : seven) b &= std::byte{0x7f};
  CHECK_FALSE(LooksIncompressible(seven));
  CHECK(EncodeBlock(Sha256Block(seven), seven).codec == BlockCodec::kZstd);
  // Too short to sample: left to zstd.
  CHECK_FALSE(LooksIncompressible(RandomBytes(1000, 8)));
}

TEST_CASE("VerifyBlock accepts what DecodeBlock accepts and rejects what it rejects") {
  std::vector<std::byte> scratch;
  for (auto plain : {TextBytes(16384), RandomBytes(16384, 3)}) {
    EncodedBlock enc = EncodeBlock(Sha256Block(plain), plain);
    CHECK(VerifyBlock(enc, scratch).ok());
    EncodedBlock flipped = enc;
    flipped.payload[flipped.payload.size() / 3] ^= 0x01;
    CHECK(VerifyBlock(flipped, scratch).code() == Code::kCorruption);
    EncodedBlock short_payload = enc;
    short_payload.payload.pop_back();
    CHECK(VerifyBlock(short_payload, scratch).code() == Code::kCorruption);
    EncodedBlock wrong_size = enc;
    wrong_size.plain_size += 1;
    CHECK(VerifyBlock(wrong_size, scratch).code() == Code::kCorruption);
  }
  EncodedBlock unknown = EncodeBlock(Sha256Block(TextBytes(100)), TextBytes(100));
  unknown.codec = static_cast<BlockCodec>(7);
  CHECK(VerifyBlock(unknown, scratch).code() == Code::kCorruption);
}

TEST_CASE("the change-tracking hash is XXH3-128 of the block") {
  // Local state files keep these values from one backup to the next: a change of hash (or of
  // its implementation, say a faster entry point) must give the same values, or every
  // incremental after an upgrade would read as fully changed. xxhash's XXH3_128bits is the
  // reference.
  std::mt19937_64 rng(5);
  std::string data(256 * 1024 + 7, '\0');
  for (auto& c : data) c = static_cast<char>(rng());
  for (size_t size :
       {size_t{0}, size_t{1}, size_t{17}, size_t{240}, size_t{4096}, size_t{32768}, data.size()}) {
    INFO("size " << size);
    const XXH128_hash_t want = XXH3_128bits(data.data(), size);
    const FastHash got = FastHashBlock(std::as_bytes(std::span(data.data(), size)));
    CHECK(got.low == want.low64);
    CHECK(got.high == want.high64);
  }
  CHECK_FALSE(FastHashBlock(std::as_bytes(std::span(data.data(), 32768))) ==
              FastHashBlock(std::as_bytes(std::span(data.data() + 1, 32768))));
}

TEST_CASE("zero detection") {
  std::vector<std::byte> z(65536);
  CHECK(IsAllZero(z));
  z[65535] = std::byte{1};
  CHECK_FALSE(IsAllZero(z));
  z[65535] = std::byte{0};
  z[3] = std::byte{1};
  CHECK_FALSE(IsAllZero(z));
  std::vector<std::byte> odd(37);
  CHECK(IsAllZero(odd));
  odd[36] = std::byte{9};
  CHECK_FALSE(IsAllZero(odd));
}

TEST_CASE("block size validation and parsing") {
  for (uint64_t ok : {16384ull, 65536ull, 1ull << 20, 4ull << 20})
    CHECK(ValidateBlockSize(ok).ok());
  for (uint64_t bad : {0ull, 8192ull, 49152ull, 8ull << 20, 65537ull})
    CHECK(ValidateBlockSize(bad).code() == Code::kInvalidArgument);
  CHECK(*ParseBlockSize("64K") == 65536u);
  CHECK(*ParseBlockSize("1M") == 1048576u);
  CHECK(*ParseBlockSize("16384") == 16384u);
  CHECK(*ParseBlockSize("4MiB") == 4194304u);
  CHECK_FALSE(ParseBlockSize("48K").ok());
  CHECK_FALSE(ParseBlockSize("8M").ok());
  CHECK_FALSE(ParseBlockSize("abc").ok());
  CHECK_FALSE(ParseBlockSize("64Q").ok());
  CHECK(ParseBlockSize("48K").status().fix().find("64K") != std::string::npos);
}

TEST_CASE("batch and id list round trip; truncation is rejected") {
  std::vector<EncodedBlock> blocks;
  for (int i = 0; i < 5; ++i) {
    auto plain = i % 2 ? TextBytes(16384 + i) : RandomBytes(16384, i);
    blocks.push_back(EncodeBlock(Sha256Block(plain), plain));
  }
  std::string wire = EncodeBatch(blocks);
  auto back = DecodeBatch(wire);
  REQUIRE(back.ok());
  REQUIRE(back->size() == 5);
  for (size_t i = 0; i < 5; ++i) {
    CHECK((*back)[i].id == blocks[i].id);
    CHECK((*back)[i].payload == blocks[i].payload);
    CHECK((*back)[i].codec == blocks[i].codec);
  }
  // The view decoder borrows the payloads from the wire buffer instead of copying them.
  auto views = DecodeBatchView(wire);
  REQUIRE(views.ok());
  REQUIRE(views->size() == 5);
  for (size_t i = 0; i < 5; ++i) {
    const auto& v = (*views)[i];
    CHECK(v.payload == blocks[i].payload);
    CHECK(v.plain_size == blocks[i].plain_size);
    CHECK(v.payload.data() >= wire.data());
    CHECK(v.payload.data() + v.payload.size() <= wire.data() + wire.size());
    std::vector<std::byte> out(v.plain_size);
    CHECK(DecodeBlockInto(v, out).ok());
  }
  // One record written by WriteRecord reads back field for field.
  std::string record(kRecordHeaderSize + blocks[1].payload.size(), '\0');
  WriteRecord(blocks[1], record.data());
  CHECK(record == wire.substr(8 + kRecordHeaderSize + blocks[0].payload.size(), record.size()));
  RecordHeader header = ReadRecordHeader(record.data());
  CHECK(header.id == blocks[1].id);
  CHECK(header.codec == blocks[1].codec);
  CHECK(header.plain_size == blocks[1].plain_size);
  CHECK(header.payload_size == blocks[1].payload.size());
  // A record claiming a block over 4 MiB is refused even when its bytes are all there.
  std::string huge = record;
  huge[33 + 3] = 0x01;  // plain size += 16 MiB
  CHECK_FALSE(DecodeBatchView(std::string("VMB1\x01\x00\x00\x00", 8) + huge).ok());
  CHECK(DecodeBatchView(std::string("VMB1\x01\x00\x00\x00", 8) + record).ok());
  CHECK_FALSE(DecodeBatchView(wire.substr(0, wire.size() - 1)).ok());
  CHECK_FALSE(DecodeBatch(wire.substr(0, wire.size() - 1)).ok());
  CHECK_FALSE(DecodeBatch(wire + "x").ok());
  CHECK_FALSE(DecodeBatch("VMB1\xff\xff\xff\xff").ok());

  std::vector<BlockId> ids{blocks[0].id, blocks[3].id};
  auto ids_back = DecodeIdList(EncodeIdList(ids));
  REQUIRE(ids_back.ok());
  CHECK(*ids_back == ids);
  CHECK_FALSE(DecodeIdList("VMI1\x02\x00\x00\x00").ok());
}

TEST_CASE("block id hex round trip") {
  auto plain = RandomBytes(100, 3);
  BlockId id = Sha256Block(plain);
  auto back = BlockId::FromHex(id.Hex());
  REQUIRE(back.ok());
  CHECK(*back == id);
  CHECK_FALSE(BlockId::FromHex("zz").ok());
  CHECK(Sha256Hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST_CASE("manifest encode/decode round trip, incremental with zero entries") {
  Manifest m;
  m.disk_size = 10 * 65536 + 100;  // a partial last block
  m.block_size = 65536;
  m.parent = "20261122T000000000Z-abcd";
  m.entries.push_back({0, Sha256Block(RandomBytes(10, 1))});
  m.entries.push_back({3, std::nullopt});
  m.entries.push_back({10, Sha256Block(RandomBytes(10, 2))});
  CHECK(m.block_count() == 11);
  auto back = DecodeManifest(EncodeManifest(m));
  REQUIRE(back.ok());
  CHECK(*back == m);
}

TEST_CASE("manifest entries carry the block's XXH3-128 check; entries without one still decode") {
  Manifest m;
  m.disk_size = 10 * 16384;
  m.block_size = 16384;
  m.parent = "20261207T000000000Z-c0de";
  auto data = [](uint64_t seed) { return RandomBytes(100, seed); };
  m.entries.push_back({0, Sha256Block(data(1)), FastHashBlock(data(1))});
  m.entries.push_back({1, Sha256Block(data(2)), std::nullopt});  // an older agent's entry
  m.entries.push_back({4, std::nullopt, std::nullopt});
  m.entries.push_back({9, Sha256Block(data(3)), FastHashBlock(data(3))});
  const std::string enc = EncodeManifest(m);
  // Header 30 + P, entries 57 (data with check), 41 (data), 9 (zero), 57, checksum 32.
  const size_t first = 30 + m.parent.size();
  CHECK(enc.size() == first + 57 + 41 + 9 + 57 + 32);
  CHECK(enc[first + 8] == 2);
  CHECK(enc[first + 57 + 8] == 1);
  CHECK(enc[first + 57 + 41 + 8] == 0);
  auto back = DecodeManifest(enc);
  REQUIRE(back.ok());
  CHECK(*back == m);
  CHECK(back->entries[0].check == FastHashBlock(data(1)));
  CHECK_FALSE(back->entries[1].check.has_value());
  // With a valid checksum over them: a check cut short, and an unknown kind, are refused.
  auto resealed = [](std::string body) {
    const BlockId sum = Sha256Block(std::as_bytes(std::span(body.data(), body.size())));
    return body.append(reinterpret_cast<const char*>(sum.bytes.data()), 32);
  };
  const std::string body = enc.substr(0, enc.size() - 32);
  CHECK(DecodeManifest(resealed(body.substr(0, body.size() - 8))).status().code() ==
        Code::kCorruption);
  std::string unknown_kind = body;
  unknown_kind[first + 8] = 3;
  auto bad = DecodeManifest(resealed(unknown_kind));
  CHECK(bad.status().code() == Code::kCorruption);
  CHECK(bad.status().cause().find("bad entry kind") != std::string::npos);
  // ApplyDelta keeps the checks of the entries it takes from either side.
  Manifest base{m.disk_size,
                m.block_size,
                "",
                {{2, Sha256Block(data(4)), FastHashBlock(data(4))},
                 {4, Sha256Block(data(5)), FastHashBlock(data(5))}}};
  auto merged = ApplyDelta(base, m);
  REQUIRE(merged.ok());
  REQUIRE(merged->entries.size() == 4);  // 0, 1 and 9 from the delta, 2 from the base; 4 zeroed
  CHECK(merged->entries[0] == m.entries[0]);
  CHECK(merged->entries[1] == m.entries[1]);
  CHECK(merged->entries[2] == base.entries[0]);
  CHECK(merged->entries[3] == m.entries[3]);
}

TEST_CASE("a manifest encoded piece by piece is byte-identical to EncodeManifest") {
  Manifest m;
  m.disk_size = 5000 * 16384;
  m.block_size = 16384;
  m.parent = "20261203T000000000Z-beef";
  for (uint64_t i = 0; i < 5000; i += 3)
    m.entries.push_back({i, i % 2 ? std::optional<BlockId>() : Sha256Block(RandomBytes(8, i))});
  ManifestEncoder enc(m.disk_size, m.block_size, m.parent, m.entries.size());
  std::string pieces;
  size_t takes = 0;
  for (const auto& e : m.entries) {
    enc.Add(e);
    if (enc.pending_bytes() >= 1000) {
      pieces += enc.Take();
      ++takes;
    }
  }
  auto rest = enc.Finish();
  REQUIRE(rest.ok());
  pieces += *rest;
  CHECK(takes > 10);
  CHECK(pieces == EncodeManifest(m));
  auto back = DecodeManifest(pieces);
  REQUIRE(back.ok());
  CHECK(*back == m);
  // A count in the header that the entries do not match is refused, not encoded.
  ManifestEncoder wrong(m.disk_size, m.block_size, "", 2);
  wrong.Add({0, Sha256Block(RandomBytes(8, 1))});
  CHECK(wrong.Finish().status().code() == Code::kInternal);
}

TEST_CASE("SHA-256 in pieces equals SHA-256 at once") {
  auto data = RandomBytes(100000, 5);
  std::string_view all(reinterpret_cast<const char*>(data.data()), data.size());
  Sha256Stream stream;
  stream.Update(all.substr(0, 1));
  stream.Update(all.substr(1, 65535));
  stream.Update(all.substr(65536));
  CHECK(stream.Finish() == Sha256Block(data));
  CHECK(Sha256Stream().Finish().Hex() ==
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST_CASE("manifest corruption is detected") {
  Manifest m;
  m.disk_size = 4 * 16384;
  m.block_size = 16384;
  m.entries.push_back({1, Sha256Block(RandomBytes(10, 1))});
  std::string enc = EncodeManifest(m);
  for (size_t pos : {size_t{0}, size_t{9}, enc.size() / 2, enc.size() - 1}) {
    std::string bad = enc;
    bad[pos] ^= 0x01;
    auto r = DecodeManifest(bad);
    CHECK(r.status().code() == Code::kCorruption);
  }
  CHECK(DecodeManifest(enc.substr(0, 20)).status().code() == Code::kCorruption);
  // A full manifest may not hold zero entries; indexes must be in range and sorted.
  Manifest zero_in_full = m;
  zero_in_full.entries.push_back({2, std::nullopt});
  CHECK_FALSE(DecodeManifest(EncodeManifest(zero_in_full)).ok());
  Manifest out_of_range = m;
  out_of_range.entries.push_back({4, Sha256Block(RandomBytes(10, 2))});
  CHECK_FALSE(DecodeManifest(EncodeManifest(out_of_range)).ok());
  Manifest unsorted = m;
  unsorted.entries.insert(unsorted.entries.begin(), {3, Sha256Block(RandomBytes(10, 3))});
  CHECK_FALSE(DecodeManifest(EncodeManifest(unsorted)).ok());
}

namespace {
// Reads `enc` through a ManifestReader whose source hands out pieces of 1..`most` bytes.
Result<Manifest> ReadInPieces(const std::string& enc, size_t most, size_t batch, bool verify,
                              uint64_t seed) {
  std::mt19937_64 rng(seed);
  size_t at = 0;
  auto reader = ManifestReader::Open(
      [&](std::span<char> out) -> Result<size_t> {
        const size_t n = std::min({out.size(), enc.size() - at, 1 + rng() % most});
        std::memcpy(out.data(), enc.data() + at, n);
        at += n;
        return n;
      },
      enc.size(), verify);
  if (!reader.ok()) return reader.take_status();
  const ManifestHeader& h = (*reader)->header();
  Manifest m{h.disk_size, h.block_size, h.parent, {}};
  std::vector<ManifestEntry> page;
  for (;;) {
    VMSNAP_RETURN_IF_ERROR((*reader)->Next(page, batch));
    if (page.empty()) break;
    if (page.size() > batch) return Status::Internal("a page larger than asked for");
    m.entries.insert(m.entries.end(), page.begin(), page.end());
  }
  if (h.entry_count != m.entries.size()) return Status::Internal("count differs from the header");
  return m;
}
}  // namespace

TEST_CASE("a manifest read piece by piece: the same entries, and every damage is found") {
  Manifest m;
  m.disk_size = 3000 * 16384 + 7;
  m.block_size = 16384;
  m.parent = "20261203T000000000Z-cafe";
  for (uint64_t i = 0; i < 3000; i += 1 + i % 4) {
    if (i % 5 == 1)
      m.entries.push_back({i, std::nullopt, std::nullopt});
    else  // some with a check (57 bytes), some without (41)
      m.entries.push_back({i, Sha256Block(RandomBytes(8, i)),
                           i % 3 ? std::optional(FastHashBlock(RandomBytes(8, i))) : std::nullopt});
  }
  const std::string enc = EncodeManifest(m);
  for (size_t most : {size_t{1}, size_t{7}, size_t{100}, size_t{1} << 20})
    for (size_t batch : {size_t{1}, size_t{13}, size_t{100000}}) {
      CAPTURE(most);
      CAPTURE(batch);
      auto back = ReadInPieces(enc, most, batch, true, most * 31 + batch);
      REQUIRE(back.ok());
      CHECK(*back == m);
    }
  // Any flipped byte is found: in the header or an entry as invalid, at the latest by the
  // checksum once the last entry has been read. Without verification, only the structure.
  for (size_t pos = 0; pos < enc.size(); pos += 97) {
    CAPTURE(pos);
    std::string bad = enc;
    bad[pos] ^= 0x20;
    CHECK(ReadInPieces(bad, 4096, 64, true, pos).status().code() == Code::kCorruption);
  }
  std::string damaged_id = enc;
  // Inside the last entry's id (before its check, if it has one): only the checksum shows it.
  REQUIRE(m.entries.back().id.has_value());
  damaged_id[enc.size() - 32 - (m.entries.back().check ? 16 : 0) - 8] ^= 1;
  CHECK(ReadInPieces(damaged_id, 4096, 64, true, 1).status().code() == Code::kCorruption);
  CHECK(ReadInPieces(damaged_id, 4096, 64, false, 1).ok());
  // Cut short, grown, or sized wrongly by the caller.
  CHECK(ReadInPieces(enc.substr(0, enc.size() - 1), 4096, 64, true, 2).status().code() ==
        Code::kCorruption);
  CHECK(ReadInPieces(enc + "x", 4096, 64, true, 3).status().code() == Code::kCorruption);
  CHECK(ReadInPieces(enc.substr(0, 30), 4096, 64, true, 4).status().code() == Code::kCorruption);
  // A source that fails ends the reading with its error.
  int calls = 0;
  auto failing = ManifestReader::Open(
      [&](std::span<char> out) -> Result<size_t> {
        if (++calls > 1) return Status::IoError("the disk went away");
        const size_t n = std::min<size_t>(out.size(), 200);
        std::memcpy(out.data(), enc.data(), n);
        return n;
      },
      enc.size());
  REQUIRE(failing.ok());
  std::vector<ManifestEntry> page;
  Status st;
  do st = (*failing)->Next(page, 1000);
  while (st.ok() && !page.empty());
  CHECK(st.code() == Code::kIoError);
  // A file.
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("vmsnap-manifest-reader-" + std::to_string(::getpid())))
                               .string();
  { std::ofstream(path, std::ios::binary) << enc; }
  {  // closed before the file is removed (Windows refuses to remove an open file)
    auto file = ManifestReader::OpenFile(path);
    REQUIRE(file.ok());
    CHECK((*file)->header().entry_count == m.entries.size());
    CHECK((*file)->header().parent == m.parent);
    std::vector<ManifestEntry> all;
    REQUIRE((*file)->Next(all, 1 << 20).ok());
    CHECK(all == m.entries);
    REQUIRE((*file)->Next(page, 1).ok());
    CHECK(page.empty());
  }
  std::filesystem::remove(path);
  CHECK(ManifestReader::OpenFile(path).status().code() == Code::kNotFound);
}

TEST_CASE("applying an incremental manifest replaces, adds and zeroes blocks") {
  auto id = [](int n) { return Sha256Block(RandomBytes(8, n)); };
  Manifest base{8 * 16384, 16384, "", {{0, id(1)}, {2, id(2)}, {5, id(3)}}};
  Manifest delta{
      8 * 16384, 16384, "parent", {{1, id(4)}, {2, std::nullopt}, {5, id(5)}, {7, id(6)}}};
  auto r = ApplyDelta(base, delta);
  REQUIRE(r.ok());
  std::vector<ManifestEntry> want{{0, id(1)}, {1, id(4)}, {5, id(5)}, {7, id(6)}};
  CHECK(r->entries == want);
  Manifest other_geometry = delta;
  other_geometry.block_size = 32768;
  CHECK_FALSE(ApplyDelta(base, other_geometry).ok());
}

#include "common/block_codec.hpp"

#include <openssl/evp.h>
#include <openssl/sha.h>
#include <xxhash.h>
#include <zstd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "common/bytes.hpp"

namespace vmsnap {

Status ValidateBlockSize(uint64_t block_size) {
  bool pow2 = block_size != 0 && (block_size & (block_size - 1)) == 0;
  if (!pow2 || block_size < kMinBlockSize || block_size > kMaxBlockSize)
    return Status::InvalidArgument("block size " + std::to_string(block_size) +
                                       " is not a power of two between 16 KiB and 4 MiB",
                                   "use one of 16K, 32K, 64K, 128K, 256K, 512K, 1M, 2M, 4M");
  return Status::Ok();
}

Result<uint32_t> ParseBlockSize(std::string_view text) {
  uint64_t value = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || ptr == text.data())
    return Status::InvalidArgument("block size '" + std::string(text) + "' is not a number",
                                   "use e.g. 64K or 1M");
  std::string suffix(ptr, text.data() + text.size());
  std::transform(suffix.begin(), suffix.end(), suffix.begin(),
                 [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  uint64_t mult = 1;
  if (suffix == "" || suffix == "B") {
  } else if (suffix == "K" || suffix == "KB" || suffix == "KIB") {
    mult = 1024;
  } else if (suffix == "M" || suffix == "MB" || suffix == "MIB") {
    mult = 1024 * 1024;
  } else {
    return Status::InvalidArgument("block size '" + std::string(text) + "' has unknown unit",
                                   "use a K or M suffix, e.g. 64K");
  }
  if (value > (uint64_t{1} << 40)) value = uint64_t{1} << 40;  // avoid overflow; rejected below
  uint64_t bytes = value * mult;
  VMSNAP_RETURN_IF_ERROR(ValidateBlockSize(bytes));
  return static_cast<uint32_t>(bytes);
}

std::string BlockId::Hex() const {
  static const char* kDigits = "0123456789abcdef";
  std::string s(64, '0');
  for (size_t i = 0; i < bytes.size(); ++i) {
    s[2 * i] = kDigits[bytes[i] >> 4];
    s[2 * i + 1] = kDigits[bytes[i] & 15];
  }
  return s;
}

Result<BlockId> BlockId::FromHex(std::string_view hex) {
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  BlockId id;
  if (hex.size() != 64) return Status::InvalidArgument("block id must be 64 hex digits");
  for (size_t i = 0; i < 32; ++i) {
    int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return Status::InvalidArgument("block id is not hexadecimal");
    id.bytes[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return id;
}

BlockId Sha256Block(std::span<const std::byte> data) {
  BlockId id;
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), id.bytes.data());
  return id;
}

struct Sha256Stream::Context {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> md{EVP_MD_CTX_new(), &EVP_MD_CTX_free};
};

// EVP_DigestInit_ex, Update and Final fail only on allocation failure or a provider without
// SHA-256; both are programming or installation errors that no caller could act on.
Sha256Stream::Sha256Stream() : ctx_(std::make_unique<Context>()) {
  if (!ctx_->md || EVP_DigestInit_ex(ctx_->md.get(), EVP_sha256(), nullptr) != 1)
    throw std::runtime_error("SHA-256 is not available from OpenSSL");
}

Sha256Stream::~Sha256Stream() = default;

void Sha256Stream::Update(std::string_view data) {
  if (EVP_DigestUpdate(ctx_->md.get(), data.data(), data.size()) != 1)
    throw std::runtime_error("SHA-256 update failed");
}

BlockId Sha256Stream::Finish() {
  BlockId id;
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx_->md.get(), id.bytes.data(), &len) != 1 || len != 32)
    throw std::runtime_error("SHA-256 final failed");
  return id;
}

std::string Sha256Hex(std::string_view data) {
  return Sha256Block(std::as_bytes(std::span(data.data(), data.size()))).Hex();
}

#ifdef VMSNAP_XXH3_AVX2
namespace detail {
void Xxh3_128Avx2(const void* data, size_t size, unsigned long long* low,
                  unsigned long long* high);  // fast_hash_avx2.cpp
}
#endif

FastHash FastHashBlock(std::span<const std::byte> data) {
#ifdef VMSNAP_XXH3_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) {
    unsigned long long low = 0, high = 0;
    detail::Xxh3_128Avx2(data.data(), data.size(), &low, &high);
    return FastHash{low, high};
  }
#endif
  XXH128_hash_t h = XXH3_128bits(data.data(), data.size());
  return FastHash{h.low64, h.high64};
}

bool IsAllZero(std::span<const std::byte> data) {
  // Word-at-a-time scan; the compiler vectorises the loop.
  const std::byte* p = data.data();
  size_t n = data.size();
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    uint64_t acc = 0;
    for (size_t j = 0; j < 64; j += 8) {
      uint64_t w;
      std::memcpy(&w, p + i + j, 8);
      acc |= w;
    }
    if (acc != 0) return false;
  }
  for (; i < n; ++i)
    if (p[i] != std::byte{0}) return false;
  return true;
}

namespace {

// zstd contexts are reused through a pool rather than thread_local objects: destructors of
// thread_local objects are unreliable with mingw-w64's emulated TLS (a Windows thread's TLS
// storage can be freed before they run). Thread-safe; idle contexts are freed at exit.
template <class Ctx, Ctx* (*Create)(), size_t (*Free)(Ctx*)>
class ContextPool {
 public:
  struct Deleter {
    void operator()(Ctx* c) const { Free(c); }
  };
  using Owned = std::unique_ptr<Ctx, Deleter>;

  // A context for the caller's exclusive use until the lease ends.
  class Lease {
   public:
    explicit Lease(ContextPool& pool) : pool_(pool), ctx_(pool.Take()) {}
    ~Lease() { pool_.Give(std::move(ctx_)); }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Ctx* get() const { return ctx_.get(); }

   private:
    ContextPool& pool_;
    Owned ctx_;
  };

 private:
  Owned Take() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) {
        Owned c = std::move(idle_.back());
        idle_.pop_back();
        return c;
      }
    }
    return Owned(Create());
  }
  void Give(Owned c) {
    std::lock_guard<std::mutex> lock(mu_);
    if (c && idle_.size() < 64) idle_.push_back(std::move(c));
  }

  std::mutex mu_;
  std::vector<Owned> idle_;
};

ContextPool<ZSTD_CCtx, &ZSTD_createCCtx, &ZSTD_freeCCtx> compress_contexts;
ContextPool<ZSTD_DCtx, &ZSTD_createDCtx, &ZSTD_freeDCtx> decompress_contexts;

}  // namespace

bool LooksIncompressible(std::span<const std::byte> data) {
  // Shannon entropy of the byte values, estimated from about 4096 bytes spread over the block.
  // Uniformly random bytes score about 7.95 bits per byte on that sample; data zstd level 1
  // shrinks by even 2 % scores well below 7.9 unless its redundancy is in repeats the sample
  // cannot see (a block made of a random pattern repeated), which stays raw then.
  constexpr size_t kSamples = 4096;
  if (data.size() < kSamples) return false;
  const size_t stride = data.size() / kSamples;
  uint32_t counts[256] = {};
  const auto* p = reinterpret_cast<const uint8_t*>(data.data());
  for (size_t i = 0; i < kSamples; ++i) counts[p[i * stride]]++;
  double bits = 0;
  for (uint32_t c : counts)
    if (c) bits -= c * std::log2(static_cast<double>(c) / kSamples);
  return bits / kSamples > 7.9;
}

// Level 1 with a hash table of 2^16 entries (256 KiB, fits a core's L2 cache) instead of the
// 2^13 level 1 picks for a 32 KiB input: it finds more matches sooner. On the benchmark's
// compressible data 11 % faster and 0.7 % smaller; on a tar of /usr/bin, /usr/share/doc and
// /usr/include 7 % faster and 0.8 % smaller (docs/PERFORMANCE.md). Decoders need nothing new.
constexpr int kZstdHashLog = 16;

EncodedBlock EncodeBlock(const BlockId& id, std::span<const std::byte> plain) {
  EncodedBlock out;
  out.id = id;
  out.plain_size = static_cast<uint32_t>(plain.size());
  if (LooksIncompressible(plain)) {
    out.payload.assign(reinterpret_cast<const char*>(plain.data()), plain.size());
    out.codec = BlockCodec::kRaw;
    return out;
  }
  decltype(compress_contexts)::Lease lease(compress_contexts);
  ZSTD_CCtx* cctx = lease.get();
  // Into a scratch buffer (not zero-filled, unlike a resized string), then a copy of exactly
  // n bytes: a bound-sized payload would stay allocated, and queues that budget memory by
  // payload size would hold several times their budget.
  const size_t bound = ZSTD_compressBound(plain.size());
  std::unique_ptr<char[]> scratch(new char[bound]);
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, 1);
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_hashLog, kZstdHashLog);
  size_t n = ZSTD_compress2(cctx, scratch.get(), bound, plain.data(), plain.size());
  if (!ZSTD_isError(n) && n < plain.size()) {
    out.payload.assign(scratch.get(), n);
    out.codec = BlockCodec::kZstd;
  } else {
    out.payload.assign(reinterpret_cast<const char*>(plain.data()), plain.size());
    out.codec = BlockCodec::kRaw;
  }
  return out;
}

Status DecodeBlock(const BlockRecordView& block, std::vector<std::byte>& out) {
  out.resize(block.plain_size);
  return DecodeBlockInto(block, out);
}

Status DecodeBlockInto(const BlockRecordView& block, std::span<std::byte> out,
                       const FastHash* check) {
  if (out.size() != block.plain_size)
    return Status::Corruption("block " + block.id.Hex() + " holds " +
                              std::to_string(block.plain_size) + " bytes, expected " +
                              std::to_string(out.size()));
  if (block.codec == BlockCodec::kRaw) {
    if (block.payload.size() != block.plain_size)
      return Status::Corruption("block " + block.id.Hex() + " has a raw payload of wrong size");
    std::memcpy(out.data(), block.payload.data(), block.plain_size);
  } else if (block.codec == BlockCodec::kZstd) {
    decltype(decompress_contexts)::Lease lease(decompress_contexts);
    ZSTD_DCtx* dctx = lease.get();
    size_t n = ZSTD_decompressDCtx(dctx, out.data(), out.size(), block.payload.data(),
                                   block.payload.size());
    if (ZSTD_isError(n) || n != block.plain_size)
      return Status::Corruption("block " + block.id.Hex() + " does not decompress");
  } else {
    return Status::Corruption("block " + block.id.Hex() + " has unknown codec " +
                              std::to_string(static_cast<int>(block.codec)));
  }
  if (check && FastHashBlock(out) == *check) return Status::Ok();
  // No check, or one the bytes do not match: their SHA-256 decides, so that a wrong check (a
  // faulty agent wrote it) does not make an intact block unrestorable.
  if (Sha256Block(out) != block.id)
    return Status::Corruption("block " + block.id.Hex() +
                              (check ? " matches neither the check its manifest holds (XXH3-128) "
                                       "nor its SHA-256"
                                     : " does not match its SHA-256"));
  return Status::Ok();
}

Status VerifyBlock(const BlockRecordView& block, std::vector<std::byte>& scratch) {
  if (block.codec != BlockCodec::kRaw) return DecodeBlock(block, scratch);
  if (block.payload.size() != block.plain_size)
    return Status::Corruption("block " + block.id.Hex() + " has a raw payload of wrong size");
  if (Sha256Block(std::as_bytes(std::span(block.payload.data(), block.payload.size()))) != block.id)
    return Status::Corruption("block " + block.id.Hex() + " does not match its SHA-256");
  return Status::Ok();
}

namespace {

// The record's header: id, codec, plain size and payload size.
void WriteRecordHeader(const BlockRecordView& b, char* out) {
  std::memcpy(out, b.id.bytes.data(), 32);
  out[32] = static_cast<char>(b.codec);
  auto le32 = [](char* p, uint64_t v) {
    for (int i = 0; i < 4; ++i) p[i] = static_cast<char>(v >> (8 * i));
  };
  le32(out + 33, b.plain_size);
  le32(out + 37, b.payload.size());
}

}  // namespace

void WriteRecord(const BlockRecordView& b, char* out) {
  WriteRecordHeader(b, out);
  if (!b.payload.empty()) std::memcpy(out + kRecordHeaderSize, b.payload.data(), b.payload.size());
}

RecordHeader ReadRecordHeader(const char* p) {
  ByteReader r(std::string_view(p, kRecordHeaderSize));
  RecordHeader h;
  uint8_t codec = 0;
  r.bytes(h.id.bytes.data(), 32);
  r.u8(codec);
  r.u32(h.plain_size);
  r.u32(h.payload_size);
  h.codec = static_cast<BlockCodec>(codec);
  return h;
}

bool ReadRecord(ByteReader& r, BlockRecordView& out) {
  std::string_view header;
  if (!r.view(kRecordHeaderSize, header)) return false;
  const RecordHeader h = ReadRecordHeader(header.data());
  out.id = h.id;
  out.codec = h.codec;
  out.plain_size = h.plain_size;
  return r.view(h.payload_size, out.payload) && out.plain_size <= kMaxBlockSize;
}

std::string EncodeBatch(std::span<const EncodedBlock> blocks) {
  size_t total = 8;
  for (const auto& b : blocks) total += kRecordHeaderSize + b.payload.size();
  ByteWriter w;
  w.str().reserve(total);
  w.bytes("VMB1");
  w.u32(static_cast<uint32_t>(blocks.size()));
  for (const auto& b : blocks) {
    char header[kRecordHeaderSize];
    WriteRecordHeader(b, header);
    w.bytes(header, kRecordHeaderSize);
    w.bytes(b.payload);
  }
  return w.take();
}

Result<std::vector<BlockRecordView>> DecodeBatchView(std::string_view data) {
  ByteReader r(data);
  std::string_view magic;
  uint32_t count = 0;
  if (!r.view(4, magic) || magic != "VMB1" || !r.u32(count))
    return Status::InvalidArgument("block batch has a bad header");
  if (count > r.remaining() / kRecordHeaderSize)
    return Status::InvalidArgument("block batch count too large");
  std::vector<BlockRecordView> out(count);
  for (auto& b : out)
    if (!ReadRecord(r, b))
      return Status::InvalidArgument("block batch is truncated or holds a block over 4 MiB");
  if (r.remaining() != 0) return Status::InvalidArgument("block batch has trailing bytes");
  return out;
}

Result<std::vector<EncodedBlock>> DecodeBatch(std::string_view data) {
  auto views = DecodeBatchView(data);
  if (!views.ok()) return views.take_status();
  std::vector<EncodedBlock> out;
  out.reserve(views->size());
  for (const auto& v : *views) out.push_back(v.ToOwned());
  return out;
}

std::string EncodeIdList(std::span<const BlockId> ids) {
  ByteWriter w;
  w.bytes("VMI1");
  w.u32(static_cast<uint32_t>(ids.size()));
  for (const auto& id : ids) w.bytes(id.bytes.data(), 32);
  return w.take();
}

Result<std::vector<BlockId>> DecodeIdList(std::string_view data) {
  ByteReader r(data);
  std::string_view magic;
  uint32_t count = 0;
  if (!r.view(4, magic) || magic != "VMI1" || !r.u32(count) ||
      r.remaining() != static_cast<size_t>(count) * 32)
    return Status::InvalidArgument("id list is malformed");
  std::vector<BlockId> ids(count);
  for (auto& id : ids) r.bytes(id.bytes.data(), 32);
  return ids;
}

}  // namespace vmsnap

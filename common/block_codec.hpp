// Block identity, compression and the batch wire format (docs/FORMAT.md).
//
// A block is a fixed-size slice of a disk. Its id is the SHA-256 of its plaintext. All-zero
// blocks have no id: they are never stored or sent. A payload is zstd level-1 compressed, or
// raw when compression does not make it smaller. All functions are pure and thread-safe.
#pragma once

#include <array>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.hpp"

namespace vmsnap {

class ByteReader;  // common/bytes.hpp

inline constexpr uint32_t kMinBlockSize = 16 * 1024;
inline constexpr uint32_t kMaxBlockSize = 4 * 1024 * 1024;
// For a disk the vault has no point of yet: chosen with bench/bench.sh (docs/PERFORMANCE.md):
// 2 % churn in random 16 KiB writes stores and sends 1.3x the changed bytes at 32 KiB, 1.9x at
// 64 KiB, while full backups and restores run about as fast as with 64 KiB.
inline constexpr uint32_t kDefaultBlockSize = 32 * 1024;

// Block size must be a power of two in [16 KiB, 4 MiB].
Status ValidateBlockSize(uint64_t block_size);

// Parses "64K", "65536", "1M", "1MiB"... into bytes (then validated by ValidateBlockSize).
Result<uint32_t> ParseBlockSize(std::string_view text);

struct BlockId {
  std::array<uint8_t, 32> bytes{};
  std::string Hex() const;
  static Result<BlockId> FromHex(std::string_view hex);
  auto operator<=>(const BlockId&) const = default;
};

struct BlockIdHash {
  size_t operator()(const BlockId& id) const {
    size_t h;
    static_assert(sizeof h <= sizeof id.bytes);
    std::memcpy(&h, id.bytes.data(), sizeof h);
    return h;
  }
};

// 128-bit fast content hash (XXH3-128): change detection (the agent's local state) and the
// check a manifest entry carries, with which a restore verifies the block's bytes. Not a
// block's identity: ids are SHA-256, which the vault verifies.
struct FastHash {
  uint64_t low = 0;
  uint64_t high = 0;
  bool operator==(const FastHash&) const = default;
};

BlockId Sha256Block(std::span<const std::byte> data);
FastHash FastHashBlock(std::span<const std::byte> data);
bool IsAllZero(std::span<const std::byte> data);
std::string Sha256Hex(std::string_view data);

// SHA-256 of data given in pieces (files and streams too large to hold at once). One thread at
// a time; Update after Finish is not allowed. Owns its OpenSSL context.
class Sha256Stream {
 public:
  Sha256Stream();
  ~Sha256Stream();
  Sha256Stream(const Sha256Stream&) = delete;
  Sha256Stream& operator=(const Sha256Stream&) = delete;
  void Update(std::string_view data);
  BlockId Finish();

 private:
  struct Context;
  std::unique_ptr<Context> ctx_;
};

enum class BlockCodec : uint8_t { kRaw = 0, kZstd = 1 };

struct EncodedBlock {
  BlockId id;
  BlockCodec codec = BlockCodec::kRaw;
  uint32_t plain_size = 0;
  std::string payload;
};

// An encoded block whose payload is borrowed: from a batch body, a pack read or an
// EncodedBlock. Valid only while that storage lives and is not modified.
struct BlockRecordView {
  BlockId id;
  BlockCodec codec = BlockCodec::kRaw;
  uint32_t plain_size = 0;
  std::string_view payload;

  BlockRecordView() = default;
  BlockRecordView(const BlockId& block_id, BlockCodec block_codec, uint32_t size,
                  std::string_view bytes)
      : id(block_id), codec(block_codec), plain_size(size), payload(bytes) {}
  // Implicit: every function taking a view takes an EncodedBlock too.
  BlockRecordView(const EncodedBlock& b)  // NOLINT(google-explicit-constructor)
      : id(b.id), codec(b.codec), plain_size(b.plain_size), payload(b.payload) {}
  EncodedBlock ToOwned() const { return {id, codec, plain_size, std::string(payload)}; }
};

// True when a sample of `data` looks like uniformly random bytes (compressed or encrypted
// content), which zstd cannot shrink: EncodeBlock then stores it raw without trying.
bool LooksIncompressible(std::span<const std::byte> data);

// Compresses `plain` whose SHA-256 is `id` (the caller computed it). zstd level 1; stored raw
// when that is not smaller, or when LooksIncompressible says it would not be.
EncodedBlock EncodeBlock(const BlockId& id, std::span<const std::byte> plain);

// Decompresses and verifies: kCorruption unless SHA-256(plaintext) == block.id and the size
// matches. `out` is resized to plain_size.
Status DecodeBlock(const BlockRecordView& block, std::vector<std::byte>& out);
// The same into a caller's buffer of exactly block.plain_size bytes (kCorruption otherwise).
// With `check` (a manifest entry's XXH3-128 of this block), the plaintext is compared with it
// instead of being hashed with SHA-256: damage, or another block's bytes, are caught the same
// way at about a twentieth of the cost. Only bytes that do not match the check are hashed with
// SHA-256 too, and accepted if that is their id (a wrong check alone fails no intact block).
// The caller must have matched block.id with the id it asked for (the check covers the bytes,
// the id names them).
Status DecodeBlockInto(const BlockRecordView& block, std::span<std::byte> out,
                       const FastHash* check = nullptr);

// Checks what DecodeBlock checks without keeping the plaintext: a raw payload is hashed where
// it is, a compressed one is decompressed into `scratch` (reused across calls).
Status VerifyBlock(const BlockRecordView& block, std::vector<std::byte>& scratch);

// One block record: id[32], u8 codec, u32 plain_size, u32 payload_size, payload (integers
// little-endian). The unit of a batch on the wire and of the vault's pack files.
constexpr size_t kRecordHeaderSize = 41;
// Writes `b`'s record at `out`, which must have kRecordHeaderSize + b.payload.size() bytes.
void WriteRecord(const BlockRecordView& b, char* out);
// A record's header alone, parsed from its first kRecordHeaderSize bytes at `p`.
struct RecordHeader {
  BlockId id;
  BlockCodec codec = BlockCodec::kRaw;
  uint32_t plain_size = 0;
  uint32_t payload_size = 0;
};
RecordHeader ReadRecordHeader(const char* p);
// Reads one record at `r`'s position into `out` (payload borrowed from r's input). False when
// the input ends inside the record or plain_size is over kMaxBlockSize; the codec is not
// checked (DecodeBlock rejects unknown ones).
bool ReadRecord(ByteReader& r, BlockRecordView& out);

// Batch wire format: "VMB1", u32 count, then count records. Used for uploads and fetches.
std::string EncodeBatch(std::span<const EncodedBlock> blocks);
// Parses a batch without copying payloads: the views borrow from `data`.
Result<std::vector<BlockRecordView>> DecodeBatchView(std::string_view data);
// The same with owned payloads.
Result<std::vector<EncodedBlock>> DecodeBatch(std::string_view data);

// A list of ids: "VMI1", u32 count, count * 32 bytes.
std::string EncodeIdList(std::span<const BlockId> ids);
Result<std::vector<BlockId>> DecodeIdList(std::string_view data);

}  // namespace vmsnap

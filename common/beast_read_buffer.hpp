// Internal to common/ (the HTTPS client and server): how both size Beast's read buffer.
#pragma once

#include <boost/beast/core/flat_buffer.hpp>
#include <cstddef>

namespace vmsnap {

// Beast reads a message through its dynamic buffer in pieces of max(512, capacity - size)
// bytes, at most 64 KiB each. A buffer that only ever grew to hold the headers makes every
// 16 KiB TLS record of a body arrive in 512-byte reads, one asynchronous operation (and one
// poll of the event loop) each: 32 per record. Call before reading each message so a single
// read can take a whole record. Never shrinks; keeps what the buffer holds.
inline constexpr std::size_t kReadBufferBytes = 64 * 1024;
inline void ReserveReadBuffer(boost::beast::flat_buffer& buffer) {
  if (buffer.capacity() - buffer.size() < kReadBufferBytes)
    buffer.reserve(buffer.size() + kReadBufferBytes);
}

}  // namespace vmsnap

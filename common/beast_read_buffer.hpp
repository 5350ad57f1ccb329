// Internal to common/ (the HTTPS client and server): how both size Beast's read buffer and
// read from the socket.
#pragma once

#include <boost/asio/buffered_read_stream.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
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

// The TCP stream under each TLS stream. Asio's TLS layer reads from the socket one TLS record
// (at most 17 KiB) at a time: a 4 MiB message took about 250 receive calls, each with an event
// loop poll and a re-armed timer — three system calls per record, which on this project's VM
// cost more than decrypting the record (docs/PERFORMANCE.md). This stream reads the socket in
// pieces of up to kSocketReadBytes (whatever has arrived) and hands the TLS layer its records
// from memory (the event loop is still polled once per record: Asio completes a buffered read
// through the layer below). Writes pass straight through. The timeout of the underlying
// tcp_stream still applies to each socket read.
inline constexpr std::size_t kSocketReadBytes = 256 * 1024;

// Beast's tcp_stream (timeouts on every operation) with the lowest-layer names Asio's stream
// adapters look for, which Beast keeps private.
class TimedTcpStream : public boost::beast::tcp_stream {
 public:
  explicit TimedTcpStream(boost::asio::io_context& ioc) : boost::beast::tcp_stream(ioc) {}
  // Takes over an accepted socket (Asio's stream adapters pass their argument on as an lvalue).
  explicit TimedTcpStream(socket_type& accepted) : boost::beast::tcp_stream(std::move(accepted)) {}
  using lowest_layer_type = socket_type;
  lowest_layer_type& lowest_layer() noexcept { return socket(); }
  const lowest_layer_type& lowest_layer() const noexcept { return socket(); }
};

class BufferedTcpStream : public boost::asio::buffered_read_stream<TimedTcpStream> {
 public:
  explicit BufferedTcpStream(boost::asio::io_context& ioc)
      : buffered_read_stream(ioc, kSocketReadBytes) {}
  explicit BufferedTcpStream(TimedTcpStream::socket_type&& accepted)
      : buffered_read_stream(accepted, kSocketReadBytes) {}
};

}  // namespace vmsnap

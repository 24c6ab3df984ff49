// A worker's end of its socket to the parent: whole frames out, from any
// of its threads, and bytes in, through an inbox, for the one thread that
// holds the reading role (worker.cpp). Private to src/.
//
//   send(frame | outgoing) --write mutex--> sendmsg, whole, never interleaved
//   read_exact(size) <--inbox (64 KiB, refilled by one recv)-- socket
//                    <--large payloads straight into the caller's memory--
//   descriptors (shared buffers) travel by SCM_RIGHTS both ways: those
//   received queue up until their frame takes them
//
// Plain blocking I/O: a worker serves one parent over one socket and has
// nothing else to wait for (the reading thread waits in one io_uring_enter
// where it can, else in poll). When the parent is gone a send ends the worker
// (exit 0) and a read returns false.
#pragma once

#include <coproc/detail/byte_buffer.hpp>
#include <coproc/detail/serialization.hpp>
#include <coproc/shared_buffer.hpp>

#include <chrono>
#include <cstddef>
#include <cstdio>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include <unistd.h>

struct iovec;
struct msghdr;

namespace coproc::detail {

// Ends the worker with `status`, its output flushed.
[[noreturn]] inline void worker_quit(int status) {
    std::fflush(nullptr);
    ::_exit(status);
}

// Frames to send: `start` (a late START), then `bytes`, with the `attached`
// parts (a large result, sent from where the function left it) spliced in
// at their offsets.
struct outgoing {
    byte_buffer start;
    byte_buffer bytes;
    std::vector<attached_bytes> attached;
    // The shared buffers of the RESULT in `bytes`: their descriptors go with
    // the first byte sent.
    shared_descriptors descriptors;
    [[nodiscard]] bool empty() const noexcept { return start.empty() && bytes.empty() && attached.empty(); }
    void clear() noexcept {
        start.clear();
        bytes.clear();
        attached.clear();
        descriptors.clear();
    }
};

class worker_channel {
public:
    // `spin`: how long to look for bytes before sleeping when none are there.
    worker_channel(int fd, std::chrono::microseconds spin) : fd_(fd), spin_(spin) {}

    [[nodiscard]] int fd() const noexcept { return fd_; }

    void send(const byte_buffer& frame);
    void send(const outgoing& frames);

    // Holds back every other thread's sends until released: a frame
    // written under it with write_all goes before them.
    [[nodiscard]] std::unique_lock<std::mutex> hold_writes() { return std::unique_lock{write_mutex_}; }
    // With hold_writes() held.
    void write_all(const byte_buffer& frame);

    // Reads `size` bytes; false when the parent closed the socket (or it
    // failed). Only the thread holding the reading role calls it.
    bool read_exact(void* into, std::size_t size);
    // Whether the inbox holds bytes not read yet (a frame that came in the
    // same recv as the last one).
    [[nodiscard]] bool inbox_holds_bytes() const noexcept { return inbox_begin_ < inbox_end_; }
    // Whether bytes from the parent wait in the socket, without blocking.
    [[nodiscard]] bool bytes_waiting() const;
    // The next `count` descriptors received (SCM_RIGHTS, with the bytes
    // read so far), taken over by the caller; false when fewer came.
    bool take_descriptors(std::size_t count, std::vector<int>& into);

private:
    void write_parts(::iovec* parts, std::size_t count, const shared_descriptors* descriptors = nullptr);
    struct incoming;
    ssize_t receive(void* into, std::size_t size, int flags);
    void keep_descriptors(::msghdr& message);
    // Waits until bytes arrive and receives them (at most `size`), with
    // their descriptors; as recv otherwise (-1 and errno, 0 at EOF).
    ssize_t wait_and_receive(void* into, std::size_t size);

    static constexpr std::size_t inbox_capacity = 64 * 1024;
    int fd_;
    std::chrono::microseconds spin_;
    std::mutex write_mutex_;
    std::vector<std::byte> inbox_ = std::vector<std::byte>(inbox_capacity); // bytes [begin, end) not read yet
    std::size_t inbox_begin_ = 0;
    std::size_t inbox_end_ = 0;
    std::deque<int> descriptors_; // received, not yet taken by their frame
    struct receive_ring;
    struct ring_deleter {
        void operator()(receive_ring* ring) const noexcept;
    };
    std::unique_ptr<receive_ring, ring_deleter> ring_; // the reading thread's; null: poll
    bool ring_tried_ = false;
};

} // namespace coproc::detail

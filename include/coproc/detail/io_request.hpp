// coproc/detail/io_request.hpp - the record of one io_uring operation.
//
// An io_request lives inside the awaiter of an event_loop operation, that is
// in the awaiting coroutine's frame, from submission until its completion has
// been delivered. The backend refers to it (io_uring: the ring's user_data;
// epoll: its lists of waiting operations and timers), and the buffers it names
// belong to the awaiting coroutine, which stays suspended until the kernel's
// completion arrives, so no buffer is released while the kernel may still
// touch it, even when the operation is cancelled.
#pragma once

#include <atomic>
#include <coroutine>
#include <cstddef>
#include <cstdint>

namespace coproc {
class event_loop;
}

namespace coproc::detail {

enum class io_kind : std::uint8_t {
    read,
    write,
    recv,
    send,
    sendmsg,
    recvmsg,
    poll,
    accept,
    connect,
    close,
    timeout,
};

// Name of the operation, as it appears in std::system_error messages.
const char* io_kind_name(io_kind kind) noexcept;

// Same layout as the kernel's struct __kernel_timespec (checked in src/).
struct kernel_timespec {
    std::int64_t tv_sec;
    long long tv_nsec;
};

struct io_request {
    io_kind kind{};
    int fd = -1;
    void* address = nullptr;       // buffer, msghdr, sockaddr
    void* address2 = nullptr;      // accept: socklen_t*
    std::uint64_t length = 0;      // buffer length, or socklen for connect
    std::uint64_t offset = 0;      // read/write file offset (-1: current position)
    std::uint32_t flags = 0;       // send/recv/accept flags, poll mask
    kernel_timespec deadline{};    // timeout: absolute CLOCK_MONOTONIC

    int result = 0;                       // the completion's res, set on the loop thread
    bool in_flight = false;               // submitted, completion not yet delivered
    std::coroutine_handle<> waiter{};     // resumed with the completion
    event_loop* loop = nullptr;

    // Links of the loop's list of operations in flight (loop thread only).
    io_request* prev_in_flight = nullptr;
    io_request* next_in_flight = nullptr;

    // The epoll backend's bookkeeping (loop thread only): where it holds the
    // operation, its links in a descriptor's list of waiting operations, the
    // readiness it waits for, or its place in the timer heap.
    std::uint8_t backend_state = 0;
    std::uint8_t backend_flags = 0;
    std::uint32_t waiting_events = 0;
    io_request* prev_waiting = nullptr;
    io_request* next_waiting = nullptr;
    std::size_t timer_index = 0;

    // Set by the stop callback, on whatever thread requested the stop; read
    // on the loop thread after the stop callback has been deregistered,
    // which synchronizes with the callback's completion. Relaxed is enough
    // for the flag itself: the cancel list below is mutex-protected.
    std::atomic<bool> cancel_requested{false};
    // Guarded by the loop's foreign-queue mutex: the request sits in the
    // list of cancellations that another thread asked for.
    bool in_cancel_list = false;
    io_request* next_cancel = nullptr;
};

} // namespace coproc::detail

// Internal: what the event loop asks of the machinery that performs its
// operations. Two implementations, each in its own file: io_uring
// (uring_backend.cpp) and epoll (epoll_backend.cpp). liburing and epoll
// appear there and nowhere else.
//
// The loop core (event_loop.cpp) owns everything that does not depend on the
// backend: the ready queue, the foreign queue, the roots, and the list of
// operations in flight. A backend performs operations and reports each
// one's end exactly once, through the completion_sink, from inside
// process() and never from inside submit().
#pragma once

#include <coproc/detail/io_request.hpp>
#include <coproc/event_loop.hpp>

#include <sys/types.h>

#include <memory>

namespace coproc::detail {

// Receives the end of each operation; implemented by the loop core.
class completion_sink {
public:
    // `result` is what the operation's completion says: a byte count, an
    // fd, poll events, 0, or a negative errno (-ECANCELED when cancelled,
    // -ETIME for a timer that expired).
    virtual void complete(io_request& request, int result) = 0;

protected:
    ~completion_sink() = default;
};

class loop_backend {
public:
    virtual ~loop_backend() = default;

    // --- loop thread

    // Starts an operation. Its end is reported by a later process().
    virtual void submit(io_request& request) = 0;
    // Asks an operation in flight to end early. It is still reported, with
    // -ECANCELED, or with its own result if it ended first.
    virtual void cancel(io_request& request) = 0;
    // Hands what was submitted over, waits for at least one event when
    // `block` (a completion or a wake()), and reports every operation that
    // has ended.
    virtual void process(bool block) = 0;
    // True when process(false) would report something at once.
    [[nodiscard]] virtual bool has_pending() const noexcept = 0;
    // The calling thread is about to drive the loop; `previous_owner` is the
    // thread that drove it before (0: none). Throws std::logic_error when
    // this backend cannot be driven from another thread, std::system_error
    // when it cannot be readied.
    virtual void claim(::pid_t self, ::pid_t previous_owner) = 0;
    // run() is returning: leave nothing of the backend's own in flight.
    virtual void leave_run() noexcept = 0;
    // Around each poll_ready() step: readies wait_fd() and consumes its
    // readiness, then leaves what makes it readable in place.
    virtual void begin_poll() = 0;
    virtual void end_poll() = 0;

    // --- any thread

    // Makes a blocked process() return, and wait_fd() readable.
    virtual void wake() noexcept = 0;
    [[nodiscard]] virtual int wait_fd() const noexcept = 0;
    // True when the calling thread may cancel operations in flight (the
    // loop is being destroyed and no thread is inside run()).
    [[nodiscard]] virtual bool can_cancel_here(::pid_t owner) const noexcept = 0;
    [[nodiscard]] virtual const event_loop_features& features() const noexcept = 0;
};

// Throw coproc::io_uring_unavailable when io_uring cannot be set up,
// std::system_error when another resource cannot be created.
std::unique_ptr<loop_backend> make_uring_backend(completion_sink& sink, const event_loop_options& options);
// Throws std::system_error when epoll, eventfd or timerfd cannot be created.
std::unique_ptr<loop_backend> make_epoll_backend(completion_sink& sink, const event_loop_options& options);

} // namespace coproc::detail

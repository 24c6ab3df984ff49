// The io_uring backend: each operation is one submission queue entry whose
// user_data points at its io_request; a stop request becomes
// IORING_OP_ASYNC_CANCEL; the completion's res is the operation's result.
//
// Other threads wake the loop by writing an eventfd on which the backend
// keeps a read pending in the ring.
//
// poll_ready()/wait_fd() are refused: with deferred task-run, completions
// reach the ring only while the loop thread is inside io_uring_enter, so
// another poller can only learn of them through an eventfd registered with
// the ring, and on Linux 6.18 such signals were seen to be lost for good
// after an earlier ring on the same thread had used the registered eventfd
// (reproduced with liburing alone). A loop driven from outside runs on
// epoll (see event_loop::poll_ready).

#include "loop_backend.hpp"
#include "ring_setup.hpp"

#include <liburing.h>
#include <linux/time_types.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <system_error>

static_assert(sizeof(coproc::detail::kernel_timespec) == sizeof(__kernel_timespec));
static_assert(offsetof(coproc::detail::kernel_timespec, tv_nsec) == offsetof(__kernel_timespec, tv_nsec));

namespace coproc::detail {
namespace {

// user_data of completions the backend ignores: those of its cancel requests.
constexpr std::uint64_t ignored_completion = 0;

class uring_backend final : public loop_backend {
public:
    uring_backend(completion_sink& sink, const event_loop_options& options);
    ~uring_backend() override;
    uring_backend(const uring_backend&) = delete;
    uring_backend& operator=(const uring_backend&) = delete;

    void submit(io_request& request) override;
    void cancel(io_request& request) override;
    void process(bool block) override;
    bool has_pending() const noexcept override { return ::io_uring_cq_ready(&ring_) > 0; }
    void claim(::pid_t self, ::pid_t previous_owner) override;
    void leave_run() noexcept override;
    void begin_poll() override;
    void end_poll() override {}
    void wake() noexcept override;
    int wait_fd() const noexcept override { return -1; }
    bool can_cancel_here(::pid_t owner) const noexcept override {
        return ring_enabled_ && (!features_.single_issuer || owner == ::gettid());
    }
    const event_loop_features& features() const noexcept override { return features_; }

private:
    ::io_uring_sqe* next_sqe();
    void arm_wake();
    void reap();

    completion_sink& sink_;
    mutable ::io_uring ring_{};
    event_loop_features features_;
    bool ring_enabled_ = false; // false while created with IORING_SETUP_R_DISABLED
    ::pid_t owner_ = 0;
    std::size_t in_flight_ = 0; // operations of the loop's, not the wake read

    int wake_fd_ = -1;
    // Heap-allocated so that a ring closed on a foreign thread can leave it
    // to the kernel (see the destructor).
    std::unique_ptr<std::uint64_t> wake_buffer_ = std::make_unique<std::uint64_t>(0);
    io_request wake_request_;
    bool wake_armed_ = false;
};

uring_backend::uring_backend(completion_sink& sink, const event_loop_options& options) : sink_(sink) {
    unsigned flags = 0;
    const int result = create_ring(ring_, options.entries, default_ring_setup_attempts(), flags);
    if (result != 0) {
        throw io_uring_unavailable(-result, describe_io_uring_setup_failure(-result, read_io_uring_disabled_sysctl()));
    }
    features_.setup_flags = flags;
    features_.single_issuer = (flags & IORING_SETUP_SINGLE_ISSUER) != 0;
    features_.defer_taskrun = (flags & IORING_SETUP_DEFER_TASKRUN) != 0;
    features_.coop_taskrun = (flags & IORING_SETUP_COOP_TASKRUN) != 0;
    features_.submit_all = (flags & IORING_SETUP_SUBMIT_ALL) != 0;
    ring_enabled_ = (flags & IORING_SETUP_R_DISABLED) == 0;
    wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) {
        const int error = errno;
        ::io_uring_queue_exit(&ring_);
        throw std::system_error(error, std::system_category(), "coproc: eventfd for the event loop");
    }
    wake_request_.kind = io_kind::read;
    wake_request_.fd = wake_fd_;
    wake_request_.address = wake_buffer_.get();
    wake_request_.length = sizeof(std::uint64_t);
    wake_request_.offset = ~std::uint64_t{0};
}

uring_backend::~uring_backend() {
    if (wake_armed_) {
        if (can_cancel_here(owner_)) {
            try {
                ::io_uring_sqe* sqe = next_sqe();
                ::io_uring_prep_cancel(sqe, &wake_request_, 0);
                ::io_uring_sqe_set_data64(sqe, ignored_completion);
                while (wake_armed_) process(true);
            } catch (...) {
                (void)wake_buffer_.release();
            }
        } else {
            // On a ring this thread may not use. The kernel cancels the read
            // when the ring closes, possibly later: leave it the buffer it
            // reads into.
            (void)wake_buffer_.release();
        }
    }
    ::io_uring_queue_exit(&ring_);
    ::close(wake_fd_);
}

::io_uring_sqe* uring_backend::next_sqe() {
    ::io_uring_sqe* sqe = ::io_uring_get_sqe(&ring_);
    if (sqe == nullptr) {
        // The submission queue is full: hand it to the kernel and retry.
        ::io_uring_submit(&ring_);
        sqe = ::io_uring_get_sqe(&ring_);
        if (sqe == nullptr) throw std::system_error(EBUSY, std::system_category(), "coproc: io_uring submission queue full");
    }
    return sqe;
}

void uring_backend::submit(io_request& request) {
    ::io_uring_sqe* sqe = next_sqe();
    switch (request.kind) {
    case io_kind::read:
        ::io_uring_prep_read(sqe, request.fd, request.address, static_cast<unsigned>(request.length), request.offset);
        break;
    case io_kind::write:
        ::io_uring_prep_write(sqe, request.fd, request.address, static_cast<unsigned>(request.length), request.offset);
        break;
    case io_kind::recv:
        ::io_uring_prep_recv(sqe, request.fd, request.address, request.length, static_cast<int>(request.flags));
        break;
    case io_kind::send:
        ::io_uring_prep_send(sqe, request.fd, request.address, request.length, static_cast<int>(request.flags));
        break;
    case io_kind::sendmsg:
        ::io_uring_prep_sendmsg(sqe, request.fd, static_cast<const ::msghdr*>(request.address), request.flags);
        break;
    case io_kind::recvmsg:
        ::io_uring_prep_recvmsg(sqe, request.fd, static_cast<::msghdr*>(request.address), request.flags);
        break;
    case io_kind::poll:
        ::io_uring_prep_poll_add(sqe, request.fd, request.flags);
        break;
    case io_kind::accept:
        ::io_uring_prep_accept(sqe, request.fd, static_cast<::sockaddr*>(request.address),
                               static_cast<::socklen_t*>(request.address2), static_cast<int>(request.flags));
        break;
    case io_kind::connect:
        ::io_uring_prep_connect(sqe, request.fd, static_cast<const ::sockaddr*>(request.address),
                                static_cast<::socklen_t>(request.length));
        break;
    case io_kind::close:
        ::io_uring_prep_close(sqe, request.fd);
        break;
    case io_kind::timeout:
        ::io_uring_prep_timeout(sqe, reinterpret_cast<__kernel_timespec*>(&request.deadline), 0, IORING_TIMEOUT_ABS);
        break;
    }
    ::io_uring_sqe_set_data(sqe, &request);
    if (&request != &wake_request_) ++in_flight_;
}

void uring_backend::cancel(io_request& request) {
    ::io_uring_sqe* sqe = next_sqe();
    ::io_uring_prep_cancel(sqe, &request, 0);
    ::io_uring_sqe_set_data64(sqe, ignored_completion);
}

void uring_backend::arm_wake() {
    submit(wake_request_);
    wake_armed_ = true;
}

void uring_backend::wake() noexcept {
    const std::uint64_t one = 1;
    // EAGAIN means the counter is saturated: the loop is bound to wake anyway.
    [[maybe_unused]] const auto written = ::write(wake_fd_, &one, sizeof one);
}

void uring_backend::process(bool block) {
    // Armed here, after the loop took what other threads queued: a wake()
    // in between leaves the eventfd non-zero, so the read completes at once.
    if (!wake_armed_) arm_wake();
    int result = 0;
    if (block) {
        result = ::io_uring_submit_and_wait(&ring_, 1);
    } else {
        // With IORING_SETUP_DEFER_TASKRUN completions are only posted while
        // this thread is in io_uring_enter with GETEVENTS. The wake read is
        // always pending, so there is always something to ask for.
        result = ::io_uring_submit_and_get_events(&ring_);
    }
    if (result < 0 && result != -EINTR && result != -EAGAIN && result != -EBUSY && result != -ETIME) {
        std::fprintf(stderr, "coproc: io_uring_enter failed: %s; the event loop cannot continue\n",
                     std::strerror(-result));
        std::terminate();
    }
    reap();
}

void uring_backend::reap() {
    struct completion {
        io_request* request;
        int result;
    };
    constexpr unsigned batch_size = 64;
    for (;;) {
        ::io_uring_cqe* cqes[batch_size];
        const unsigned count = ::io_uring_peek_batch_cqe(&ring_, cqes, batch_size);
        if (count == 0) return;
        completion batch[batch_size];
        for (unsigned i = 0; i < count; ++i) {
            batch[i] = {reinterpret_cast<io_request*>(::io_uring_cqe_get_data64(cqes[i])), cqes[i]->res};
        }
        // Release the ring slots before resuming anyone: resumed coroutines
        // submit, and the kernel may then post more completions.
        ::io_uring_cq_advance(&ring_, count);
        for (unsigned i = 0; i < count; ++i) {
            io_request* request = batch[i].request;
            if (request == nullptr) continue; // a cancel request's own completion
            if (request == &wake_request_) {
                wake_armed_ = false;
                continue;
            }
            --in_flight_;
            sink_.complete(*request, batch[i].result);
        }
    }
}

void uring_backend::claim(::pid_t self, ::pid_t previous_owner) {
    // Kernel thread ids, unlike pthread ids, are not reused while the
    // process has other threads alive for long, and they are what the kernel
    // checks for a single-issuer ring.
    if (previous_owner != 0 && previous_owner != self && features_.single_issuer) {
        throw std::logic_error("coproc: event_loop::run called from a thread other than the one that first ran the "
                               "loop; the ring is single-issuer, so one thread drives it for its whole life");
    }
    if (!ring_enabled_) {
        // liburing 2.3 declares io_uring_enable_rings but does not export it.
        if (::syscall(__NR_io_uring_register, ring_.ring_fd, IORING_REGISTER_ENABLE_RINGS, nullptr, 0) < 0) {
            throw std::system_error(errno, std::system_category(), "coproc: enabling the io_uring instance");
        }
        ring_enabled_ = true;
    }
    owner_ = self;
}

void uring_backend::leave_run() noexcept {
    // Leave nothing of the loop's own in the kernel between runs: the loop
    // may be destroyed on another thread, which cannot use this ring.
    if (!wake_armed_) return;
    try {
        cancel(wake_request_);
    } catch (...) {
        return; // no submission slot: it stays armed, which is safe
    }
    while (wake_armed_) process(true);
}

void uring_backend::begin_poll() {
    throw std::logic_error("coproc: event_loop::poll_ready needs the epoll backend; create the loop with "
                           "event_loop_options{.backend = coproc::event_loop_backend::epoll} (see the file comment "
                           "of src/uring_backend.cpp for why io_uring cannot be driven from another poller here)");
}

} // namespace

std::unique_ptr<loop_backend> make_uring_backend(completion_sink& sink, const event_loop_options& options) {
    return std::make_unique<uring_backend>(sink, options);
}

} // namespace coproc::detail

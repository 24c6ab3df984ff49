// The epoll backend, for where io_uring is not allowed (Docker's and
// Kubernetes' default seccomp profiles, kernel.io_uring_disabled, ...).
//
// An operation is tried at once, without blocking. When it would block, it
// waits in its descriptor's list until epoll reports the readiness it needs,
// and is tried again. Each descriptor is registered one-shot for the union of
// what its waiting operations need, and re-armed after each report, so a
// descriptor closed and reused behind the loop's back is registered afresh
// (epoll_ctl looks descriptors up by their current file). Timers live in a
// binary heap whose earliest deadline arms a timerfd. Other threads wake the
// loop through an eventfd. Operations that end inside submit() are reported
// by the next process(), as io_uring would.
//
// Per-call non-blocking flags are used where they exist (MSG_DONTWAIT,
// RWF_NOWAIT). Where they do not (accept4, connect, and read/write on files
// without RWF_NOWAIT support), a blocking descriptor is switched to
// O_NONBLOCK for the call and switched back. Regular files cannot be polled:
// their reads and writes run to completion inline, as they would in io-wq.

#include "loop_backend.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <system_error>
#include <utility>
#include <vector>

namespace coproc::detail {
namespace {

// Where the backend holds an operation (io_request::backend_state).
enum held : std::uint8_t { nowhere = 0, waiting = 1, timer = 2, done = 3 };
// io_request::backend_flags
constexpr std::uint8_t connecting = 1;   // connect returned EINPROGRESS: read SO_ERROR on readiness
constexpr std::uint8_t plain_call = 2;   // RWF_NOWAIT unsupported: O_NONBLOCK around a plain call

// epoll_event data of the backend's own descriptors; user descriptors use
// their number, which is below 2^31.
constexpr std::uint64_t wake_tag = std::uint64_t{1} << 40;
constexpr std::uint64_t timer_tag = std::uint64_t{2} << 40;

constexpr std::uint64_t current_position = ~std::uint64_t{0};

std::int64_t to_nanoseconds(const kernel_timespec& t) noexcept { return t.tv_sec * 1'000'000'000LL + t.tv_nsec; }

std::int64_t now_nanoseconds() noexcept {
    ::timespec now{};
    ::clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec * 1'000'000'000LL + now.tv_nsec;
}

// Runs `call` with O_NONBLOCK set on `fd`, restoring its flags after.
template <class Call>
long nonblocking_call(int fd, Call call) {
    const int flags = ::fcntl(fd, F_GETFL);
    if (flags < 0) return -1;
    if ((flags & O_NONBLOCK) != 0) return call();
    if (::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return -1;
    const long result = call();
    const int error = errno;
    ::fcntl(fd, F_SETFL, flags);
    errno = error;
    return result;
}

class epoll_backend final : public loop_backend {
public:
    explicit epoll_backend(completion_sink& sink);
    ~epoll_backend() override;
    epoll_backend(const epoll_backend&) = delete;
    epoll_backend& operator=(const epoll_backend&) = delete;

    void submit(io_request& request) override;
    void cancel(io_request& request) override;
    void process(bool block) override;
    bool has_pending() const noexcept override { return !done_.empty() || more_events_; }
    void claim(::pid_t, ::pid_t) override {}
    void leave_run() noexcept override {}
    void begin_poll() override {}
    void end_poll() override {}
    void wake() noexcept override;
    int wait_fd() const noexcept override { return epoll_fd_; }
    bool can_cancel_here(::pid_t) const noexcept override { return true; }
    const event_loop_features& features() const noexcept override { return features_; }

private:
    // The operations waiting on one descriptor, in submission order.
    struct descriptor {
        io_request* first = nullptr;
        io_request* last = nullptr;
        std::uint32_t armed = 0; // events of the live one-shot registration; trusted only while first != nullptr
        bool registered = false; // added to epoll at some point (it may have been closed since)
    };

    // Tries the operation without blocking. Returns true with
    // request.result set when it is over; false when it must wait for
    // request.waiting_events.
    bool attempt(io_request& request);
    bool attempt_transfer(io_request& request, bool reading);
    // Puts the operation in its descriptor's list; false when the
    // descriptor cannot be polled (a regular file), -errno in result when
    // registration failed otherwise.
    bool wait(io_request& request);
    // Registers `fd` one-shot for `events`. `reopened`: the file registered
    // under this number before is gone.
    bool arm(int fd, descriptor& state, std::uint32_t events, int& error, bool& reopened);
    // Ends every operation waiting on a descriptor with -error.
    void fail_waiting(descriptor& state, int error);
    void unlink(descriptor& state, io_request& request) noexcept;
    void finish(io_request& request, int result);
    void on_ready(int fd, std::uint32_t events);
    void start_timer(io_request& request);
    void on_timer();
    void arm_timerfd();
    void remove_timer(io_request& request) noexcept;
    void sift_up(std::size_t index) noexcept;
    void sift_down(std::size_t index) noexcept;
    void place(std::size_t index, io_request* request) noexcept;
    descriptor& state_of(int fd);

    completion_sink& sink_;
    event_loop_features features_{};
    int epoll_fd_ = -1;
    int wake_fd_ = -1;
    int timer_fd_ = -1;
    std::vector<descriptor> descriptors_; // indexed by fd
    std::vector<io_request*> timers_;     // min-heap on deadline
    std::int64_t timer_armed_for_ = std::numeric_limits<std::int64_t>::max();
    std::vector<io_request*> done_;       // ended, to be reported by the next process()
    bool more_events_ = false;            // the last epoll_wait filled its buffer
};

epoll_backend::epoll_backend(completion_sink& sink) : sink_(sink) {
    auto fail = [this](const char* what) {
        const int error = errno;
        if (timer_fd_ >= 0) ::close(timer_fd_);
        if (wake_fd_ >= 0) ::close(wake_fd_);
        if (epoll_fd_ >= 0) ::close(epoll_fd_);
        throw std::system_error(error, std::system_category(), what);
    };
    epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd_ < 0) fail("coproc: epoll_create1 for the event loop");
    wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) fail("coproc: eventfd for the event loop");
    timer_fd_ = ::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    if (timer_fd_ < 0) fail("coproc: timerfd for the event loop");
    ::epoll_event event{};
    event.events = EPOLLIN;
    event.data.u64 = wake_tag;
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &event) < 0) fail("coproc: epoll_ctl for the event loop");
    event.data.u64 = timer_tag;
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, timer_fd_, &event) < 0) fail("coproc: epoll_ctl for the event loop");
}

epoll_backend::~epoll_backend() {
    ::close(timer_fd_);
    ::close(wake_fd_);
    ::close(epoll_fd_);
}

epoll_backend::descriptor& epoll_backend::state_of(int fd) {
    const auto index = static_cast<std::size_t>(fd);
    if (index >= descriptors_.size()) descriptors_.resize(std::max<std::size_t>(index + 1, 2 * descriptors_.size()));
    return descriptors_[index];
}

void epoll_backend::finish(io_request& request, int result) {
    request.result = result;
    request.backend_state = done;
    done_.push_back(&request);
}

void epoll_backend::submit(io_request& request) {
    request.backend_state = nowhere;
    request.backend_flags = 0;
    request.waiting_events = 0;
    done_.reserve(done_.size() + 1); // finish() below must not fail
    if (request.kind == io_kind::timeout) {
        start_timer(request);
        return;
    }
    if (request.kind == io_kind::close) {
        if (request.fd >= 0 && static_cast<std::size_t>(request.fd) < descriptors_.size()) {
            descriptors_[static_cast<std::size_t>(request.fd)].registered = false;
        }
        finish(request, ::close(request.fd) == 0 ? 0 : -errno);
        return;
    }
    if (request.fd < 0) {
        finish(request, -EBADF);
        return;
    }
    if (request.kind == io_kind::poll) {
        request.waiting_events = request.flags;
        if (!wait(request)) {
            // Not pollable (a regular file): always ready, as poll(2) says.
            ::pollfd check{request.fd, static_cast<short>(request.flags), 0};
            ::poll(&check, 1, 0);
            finish(request, static_cast<unsigned short>(check.revents));
        }
        return;
    }
    if (attempt(request)) {
        finish(request, request.result);
        return;
    }
    if (!wait(request)) {
        // A regular file that would block (not in the page cache): do it
        // inline, as io-wq would on a thread of its own.
        request.backend_flags |= plain_call;
        const bool reading = request.kind == io_kind::read;
        attempt_transfer(request, reading);
        finish(request, request.result);
    }
}

bool epoll_backend::attempt_transfer(io_request& request, bool reading) {
    const int fd = request.fd;
    ::iovec buffer{request.address, static_cast<std::size_t>(request.length)};
    const auto offset = request.offset == current_position ? off_t{-1} : static_cast<off_t>(request.offset);
    long n;
    if ((request.backend_flags & plain_call) != 0) {
        n = nonblocking_call(fd, [&] { return reading ? ::preadv(fd, &buffer, 1, offset) : ::pwritev(fd, &buffer, 1, offset); });
        if (n < 0 && errno == ESPIPE && offset == -1) {
            n = nonblocking_call(fd, [&] { return reading ? ::readv(fd, &buffer, 1) : ::writev(fd, &buffer, 1); });
        }
    } else {
        n = reading ? ::preadv2(fd, &buffer, 1, offset, RWF_NOWAIT) : ::pwritev2(fd, &buffer, 1, offset, RWF_NOWAIT);
        if (n < 0 && errno == EOPNOTSUPP) {
            // No RWF_NOWAIT for this file (older kernels, some drivers).
            request.backend_flags |= plain_call;
            return attempt_transfer(request, reading);
        }
    }
    if (n >= 0) {
        request.result = static_cast<int>(n);
        return true;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
        request.waiting_events = reading ? EPOLLIN : EPOLLOUT;
        return false;
    }
    request.result = -errno;
    return true;
}

bool epoll_backend::attempt(io_request& request) {
    const int fd = request.fd;
    const int flags = static_cast<int>(request.flags);
    long n = 0;
    std::uint32_t need = EPOLLIN;
    switch (request.kind) {
    case io_kind::read: return attempt_transfer(request, true);
    case io_kind::write: return attempt_transfer(request, false);
    case io_kind::recv:
        n = ::recv(fd, request.address, request.length, flags | MSG_DONTWAIT);
        break;
    case io_kind::send:
        n = ::send(fd, request.address, request.length, flags | MSG_DONTWAIT);
        need = EPOLLOUT;
        break;
    case io_kind::recvmsg:
        n = ::recvmsg(fd, static_cast<::msghdr*>(request.address), flags | MSG_DONTWAIT);
        break;
    case io_kind::sendmsg:
        n = ::sendmsg(fd, static_cast<const ::msghdr*>(request.address), flags | MSG_DONTWAIT);
        need = EPOLLOUT;
        break;
    case io_kind::accept:
        n = nonblocking_call(fd, [&] {
            return ::accept4(fd, static_cast<::sockaddr*>(request.address), static_cast<::socklen_t*>(request.address2),
                             flags);
        });
        break;
    case io_kind::connect:
        need = EPOLLOUT;
        if ((request.backend_flags & connecting) != 0) {
            int error = 0;
            ::socklen_t length = sizeof error;
            if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) < 0) error = errno;
            request.result = -error;
            return true;
        }
        n = nonblocking_call(fd, [&] {
            return ::connect(fd, static_cast<const ::sockaddr*>(request.address), static_cast<::socklen_t>(request.length));
        });
        if (n < 0 && errno == EINPROGRESS) {
            request.backend_flags |= connecting;
            request.waiting_events = need;
            return false;
        }
        break;
    case io_kind::poll:
    case io_kind::close:
    case io_kind::timeout: break; // not attempted
    }
    if (n >= 0) {
        request.result = static_cast<int>(n);
        return true;
    }
    const bool caller_wants_no_wait = (request.kind == io_kind::recv || request.kind == io_kind::send ||
                                       request.kind == io_kind::recvmsg || request.kind == io_kind::sendmsg) &&
                                      (flags & MSG_DONTWAIT) != 0;
    if ((errno == EAGAIN || errno == EWOULDBLOCK) && !caller_wants_no_wait) {
        request.waiting_events = need;
        return false;
    }
    request.result = -errno;
    return true;
}

bool epoll_backend::arm(int fd, descriptor& state, std::uint32_t events, int& error, bool& reopened) {
    ::epoll_event event{};
    event.events = events | EPOLLONESHOT;
    event.data.u64 = static_cast<std::uint64_t>(fd);
    int op = state.registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    reopened = false;
    for (int tries = 0; tries < 2; ++tries) {
        if (::epoll_ctl(epoll_fd_, op, fd, &event) == 0) {
            state.registered = true;
            state.armed = events;
            return true;
        }
        if (op == EPOLL_CTL_MOD && errno == ENOENT) {
            // epoll looks a descriptor up by its current file: the file
            // registered under this number was closed (and the number maybe
            // reused) since.
            reopened = true;
            op = EPOLL_CTL_ADD;
        } else if (op == EPOLL_CTL_ADD && errno == EEXIST) {
            op = EPOLL_CTL_MOD; // registered before
        } else {
            break;
        }
    }
    error = errno;
    return false;
}

void epoll_backend::fail_waiting(descriptor& state, int error) {
    while (state.first != nullptr) {
        io_request* request = state.first;
        unlink(state, *request);
        finish(*request, -error);
    }
}

bool epoll_backend::wait(io_request& request) {
    const int fd = request.fd;
    descriptor& state = state_of(fd);
    const std::uint32_t wanted = (state.first != nullptr ? state.armed : 0) | request.waiting_events;
    // Always re-registered, even when the events are armed already: that is
    // how a descriptor closed and reused behind the loop's back is noticed.
    int error = 0;
    bool reopened = false;
    const bool armed = arm(fd, state, wanted, error, reopened);
    if (reopened) {
        // Operations still waiting were on the closed file: as with any
        // descriptor closed under a pending operation, they end with EBADF
        // (on io_uring they would hold the old file open until cancelled).
        fail_waiting(state, EBADF);
        if (armed) state.armed = request.waiting_events;
    }
    if (!armed) {
        if (error == EPERM) return false;
        finish(request, -error);
        return true;
    }
    request.backend_state = waiting;
    request.prev_waiting = state.last;
    request.next_waiting = nullptr;
    if (state.last != nullptr) {
        state.last->next_waiting = &request;
    } else {
        state.first = &request;
    }
    state.last = &request;
    return true;
}

void epoll_backend::unlink(descriptor& state, io_request& request) noexcept {
    if (request.prev_waiting != nullptr) {
        request.prev_waiting->next_waiting = request.next_waiting;
    } else {
        state.first = request.next_waiting;
    }
    if (request.next_waiting != nullptr) {
        request.next_waiting->prev_waiting = request.prev_waiting;
    } else {
        state.last = request.prev_waiting;
    }
    request.prev_waiting = request.next_waiting = nullptr;
    request.backend_state = nowhere;
}

void epoll_backend::on_ready(int fd, std::uint32_t events) {
    if (fd < 0 || static_cast<std::size_t>(fd) >= descriptors_.size()) return;
    descriptor& state = descriptors_[static_cast<std::size_t>(fd)];
    state.armed = 0; // one-shot: the registration is disabled now
    const std::uint32_t trouble = events & (EPOLLERR | EPOLLHUP);
    for (io_request* request = state.first; request != nullptr;) {
        io_request* next = request->next_waiting;
        if ((request->waiting_events & events) != 0 || trouble != 0) {
            if (request->kind == io_kind::poll) {
                unlink(state, *request);
                finish(*request, static_cast<int>(events & (request->flags | EPOLLERR | EPOLLHUP)));
            } else if (attempt(*request)) {
                unlink(state, *request);
                finish(*request, request->result);
            }
        }
        request = next;
    }
    if (state.first == nullptr) return;
    std::uint32_t wanted = 0;
    for (io_request* request = state.first; request != nullptr; request = request->next_waiting) {
        wanted |= request->waiting_events;
    }
    ::epoll_event event{};
    event.events = wanted | EPOLLONESHOT;
    event.data.u64 = static_cast<std::uint64_t>(fd);
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, fd, &event) == 0) {
        state.armed = wanted;
    } else {
        // The descriptor was closed under its operations.
        fail_waiting(state, errno == ENOENT ? EBADF : errno);
    }
}

// --- timers

void epoll_backend::place(std::size_t index, io_request* request) noexcept {
    timers_[index] = request;
    request->timer_index = index;
}

void epoll_backend::sift_up(std::size_t index) noexcept {
    io_request* moving = timers_[index];
    const auto deadline = to_nanoseconds(moving->deadline);
    while (index > 0) {
        const std::size_t parent = (index - 1) / 2;
        if (to_nanoseconds(timers_[parent]->deadline) <= deadline) break;
        place(index, timers_[parent]);
        index = parent;
    }
    place(index, moving);
}

void epoll_backend::sift_down(std::size_t index) noexcept {
    io_request* moving = timers_[index];
    const auto deadline = to_nanoseconds(moving->deadline);
    for (;;) {
        std::size_t child = 2 * index + 1;
        if (child >= timers_.size()) break;
        if (child + 1 < timers_.size() &&
            to_nanoseconds(timers_[child + 1]->deadline) < to_nanoseconds(timers_[child]->deadline)) {
            ++child;
        }
        if (to_nanoseconds(timers_[child]->deadline) >= deadline) break;
        place(index, timers_[child]);
        index = child;
    }
    place(index, moving);
}

void epoll_backend::start_timer(io_request& request) {
    if (to_nanoseconds(request.deadline) <= now_nanoseconds()) {
        finish(request, -ETIME);
        return;
    }
    timers_.push_back(&request);
    request.backend_state = timer;
    sift_up(timers_.size() - 1);
    if (timers_.front() == &request) arm_timerfd();
}

void epoll_backend::remove_timer(io_request& request) noexcept {
    const std::size_t index = request.timer_index;
    io_request* last = timers_.back();
    timers_.pop_back();
    if (last != &request) {
        place(index, last);
        sift_down(index);
        sift_up(last->timer_index);
    }
    request.backend_state = nowhere;
}

void epoll_backend::arm_timerfd() {
    if (timers_.empty()) return; // a timerfd that fires for nothing is harmless
    const std::int64_t deadline = to_nanoseconds(timers_.front()->deadline);
    if (deadline == timer_armed_for_) return;
    ::itimerspec when{};
    when.it_value.tv_sec = deadline / 1'000'000'000LL;
    when.it_value.tv_nsec = deadline % 1'000'000'000LL;
    if (when.it_value.tv_sec == 0 && when.it_value.tv_nsec == 0) when.it_value.tv_nsec = 1; // zero disarms
    if (::timerfd_settime(timer_fd_, TFD_TIMER_ABSTIME, &when, nullptr) < 0) {
        throw std::system_error(errno, std::system_category(), "coproc: timerfd_settime");
    }
    timer_armed_for_ = deadline;
}

void epoll_backend::on_timer() {
    std::uint64_t expirations;
    [[maybe_unused]] const auto consumed = ::read(timer_fd_, &expirations, sizeof expirations);
    timer_armed_for_ = std::numeric_limits<std::int64_t>::max();
    const std::int64_t now = now_nanoseconds();
    while (!timers_.empty() && to_nanoseconds(timers_.front()->deadline) <= now) {
        io_request* expired = timers_.front();
        remove_timer(*expired);
        finish(*expired, -ETIME);
    }
    arm_timerfd();
}

// --- the loop's side

void epoll_backend::cancel(io_request& request) {
    switch (request.backend_state) {
    case waiting:
        unlink(descriptors_[static_cast<std::size_t>(request.fd)], request);
        finish(request, -ECANCELED);
        break;
    case timer:
        remove_timer(request);
        finish(request, -ECANCELED);
        break;
    default: break; // already over (reported by the next process()), or never held
    }
}

void epoll_backend::wake() noexcept {
    const std::uint64_t one = 1;
    [[maybe_unused]] const auto written = ::write(wake_fd_, &one, sizeof one);
}

void epoll_backend::process(bool block) {
    constexpr int batch_size = 64;
    ::epoll_event events[batch_size];
    const int timeout = block && done_.empty() ? -1 : 0;
    int count = ::epoll_wait(epoll_fd_, events, batch_size, timeout);
    if (count < 0) {
        if (errno != EINTR) {
            std::fprintf(stderr, "coproc: epoll_wait failed: %s; the event loop cannot continue\n", std::strerror(errno));
            std::terminate();
        }
        count = 0;
    }
    more_events_ = count == batch_size;
    for (int i = 0; i < count; ++i) {
        const std::uint64_t tag = events[i].data.u64;
        if (tag == wake_tag) {
            std::uint64_t value;
            [[maybe_unused]] const auto consumed = ::read(wake_fd_, &value, sizeof value);
        } else if (tag == timer_tag) {
            on_timer();
        } else {
            on_ready(static_cast<int>(tag), events[i].events);
        }
    }
    // Report what has ended; what the resumed coroutines start and end at
    // once waits for the next call, so completions are never starved.
    std::vector<io_request*> ended;
    ended.swap(done_);
    for (io_request* request : ended) {
        request->backend_state = nowhere;
        sink_.complete(*request, request->result);
    }
    if (done_.capacity() == 0) {
        ended.clear();
        done_.swap(ended); // keep the allocation
    }
}

} // namespace

std::unique_ptr<loop_backend> make_epoll_backend(completion_sink& sink, const event_loop_options&) {
    return std::make_unique<epoll_backend>(sink);
}

} // namespace coproc::detail

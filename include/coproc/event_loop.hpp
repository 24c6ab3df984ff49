// coproc/event_loop.hpp - coproc::event_loop, a single-threaded coroutine
// runtime on io_uring, or on epoll where io_uring is not allowed.
//
// One thread drives the loop by calling run(); every coroutine the loop runs,
// and every completion of an operation below, resumes on that thread. Other
// threads talk to the loop through post(), stop(), and stop tokens, which are
// thread-safe. The rules in full: doc/runtime.md.
//
//     coproc::event_loop loop;
//     int n = loop.run(count_bytes(loop, fd));       // drives the loop until done
//
// Every awaitable operation (sleep_for, read, recv, ...) honours the stop
// token of the coroutine awaiting it: a stop request cancels the operation
// (IORING_OP_ASYNC_CANCEL on io_uring) and the coroutine resumes with
// coproc::cancelled_error once the operation is really over, never before,
// so buffers it uses stay valid until then. If the operation
// completed before the cancel took effect, its result is delivered as usual.
// Any other failure throws std::system_error whose code is the errno and whose
// what() names the operation ("coproc: recv: Connection reset by peer").
#pragma once

#include <coproc/detail/io_request.hpp>
#include <coproc/detail/root_task.hpp>
#include <coproc/error.hpp>
#include <coproc/task.hpp>

#include <cerrno>
#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <sys/socket.h>
#include <system_error>
#include <type_traits>

namespace coproc {

namespace detail {
class loop_core;

// Stop callback of an operation in flight: asks its loop to cancel it.
struct cancel_on_stop {
    io_request* request;
    void operator()() const noexcept;
};

[[noreturn]] void throw_io_error(io_kind kind, int negative_errno);
[[noreturn]] void throw_cancelled(io_kind kind);

// Hands a request to its loop's submission queue (loop thread only).
void submit_request(io_request& request);
// Called once the request's completion has been delivered: forgets any
// cancellation another thread queued for it.
void settle_request(io_request& request) noexcept;
// Reports an operation destroyed while the kernel holds it, and terminates.
[[noreturn]] void abandoned_in_flight(const io_request& request) noexcept;
} // namespace detail

// What performs the loop's operations. Both give every operation, its
// cancellation and the process pool the same behaviour.
enum class event_loop_backend {
    // io_uring where the kernel allows it, else epoll. The environment
    // variable COPROC_BACKEND (io_uring, epoll or auto) overrides this
    // choice, and only this one, so an unchanged program runs on either.
    automatic,
    io_uring, // io_uring or nothing: the constructor throws io_uring_unavailable
    epoll,    // epoll, eventfd and timerfd; works under any seccomp profile
};

// Which backend a loop runs on, and why.
struct event_loop_backend_info {
    event_loop_backend kind = event_loop_backend::io_uring; // never automatic
    // Empty on io_uring. On epoll, why: "requested by
    // event_loop_options::backend", "requested by COPROC_BACKEND=epoll", or
    // why io_uring could not be set up, as io_uring_unavailable::what()
    // says it (the cause and the fix).
    std::string reason;
};

// Name of a backend: "automatic", "io_uring", "epoll".
const char* to_string(event_loop_backend backend) noexcept;

// Options of an event_loop.
struct event_loop_options {
    // Submission queue size. The completion queue is sized larger, and the
    // loop never loses a completion when it overflows (IORING_FEAT_NODROP).
    // Unused on epoll, except that it must be positive.
    unsigned entries = 256;
    event_loop_backend backend = event_loop_backend::automatic;
};

// Which optional io_uring set-up flags the running kernel accepted (all
// false on the epoll backend).
struct event_loop_features {
    bool single_issuer = false;     // IORING_SETUP_SINGLE_ISSUER
    bool defer_taskrun = false;     // IORING_SETUP_DEFER_TASKRUN
    bool coop_taskrun = false;      // IORING_SETUP_COOP_TASKRUN
    bool submit_all = false;        // IORING_SETUP_SUBMIT_ALL
    unsigned setup_flags = 0;       // the flags the ring was created with
};

// An awaitable operation; returned by event_loop's member functions.
// Result is what co_await yields: std::size_t (bytes), int (a new fd),
// unsigned (poll events) or void. Movable until awaited; awaiting it once
// submits it. Not API beyond being awaitable.
template <class Result>
class [[nodiscard]] io_operation {
public:
    io_operation(event_loop& loop, detail::io_kind kind) noexcept {
        request_.loop = &loop;
        request_.kind = kind;
    }
    io_operation(io_operation&& other) noexcept { copy_parameters(other.request_); }
    io_operation& operator=(io_operation&&) = delete;
    io_operation(const io_operation&) = delete;
    io_operation& operator=(const io_operation&) = delete;
    // Destroying an operation the kernel still holds would let it write into
    // freed memory: that is a bug in the program (a task destroyed while
    // suspended on I/O, outside the loop's own shutdown), reported loudly.
    ~io_operation() {
        if (request_.in_flight) detail::abandoned_in_flight(request_);
    }

    detail::io_request& request() noexcept { return request_; }

    bool await_ready() const noexcept { return false; }

    template <class P>
    bool await_suspend(std::coroutine_handle<P> awaiting) {
        std::stop_token token = detail::stop_token_of(awaiting);
        if (token.stop_requested()) {
            // Never submitted: resume at once and throw cancelled_error.
            request_.result = -ECANCELED;
            request_.cancel_requested.store(true, std::memory_order_relaxed);
            return false;
        }
        request_.waiter = awaiting;
        detail::submit_request(request_);
        // Registered after submission: a stop requested in between runs the
        // callback right here, which cancels the operation just submitted.
        if (token.stop_possible()) stop_callback_.emplace(std::move(token), detail::cancel_on_stop{&request_});
        return true;
    }

    Result await_resume() {
        // Deregistering waits for a callback running on another thread, so
        // after this line cancel_requested is final.
        stop_callback_.reset();
        detail::settle_request(request_);
        const int result = request_.result;
        if (result < 0) {
            if (request_.kind == detail::io_kind::timeout && result == -ETIME) {
                // A timer expiring is its success.
            } else if ((result == -ECANCELED || result == -EINTR) &&
                       request_.cancel_requested.load(std::memory_order_relaxed)) {
                // io-wq reports a cancelled blocking operation as EINTR.
                detail::throw_cancelled(request_.kind);
            } else {
                detail::throw_io_error(request_.kind, result);
            }
        }
        if constexpr (std::is_void_v<Result>) {
            return;
        } else {
            return static_cast<Result>(result);
        }
    }

private:
    void copy_parameters(const detail::io_request& from) noexcept {
        request_.kind = from.kind;
        request_.fd = from.fd;
        request_.address = from.address;
        request_.address2 = from.address2;
        request_.length = from.length;
        request_.offset = from.offset;
        request_.flags = from.flags;
        request_.deadline = from.deadline;
        request_.loop = from.loop;
    }
    detail::io_request request_;
    std::optional<std::stop_callback<detail::cancel_on_stop>> stop_callback_;
};

// Awaitable that moves the awaiting coroutine to the back of the loop's ready
// queue; from another thread it moves the coroutine onto the loop's thread.
class [[nodiscard]] schedule_operation {
public:
    explicit schedule_operation(event_loop& loop) noexcept : loop_(&loop) {}
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> awaiting);
    void await_resume() const noexcept {}

private:
    event_loop* loop_;
};

class event_loop {
public:
    using options = event_loop_options;
    using clock = std::chrono::steady_clock;
    using exception_handler = std::function<void(std::exception_ptr)>;

    // Chooses the backend (see event_loop_backend): by default an io_uring
    // instance with the best set-up flags the kernel accepts (see
    // features()), or epoll when io_uring cannot be set up. Throws
    // coproc::io_uring_unavailable only when io_uring was required (by
    // options or COPROC_BACKEND=io_uring) and cannot be used,
    // std::invalid_argument for a COPROC_BACKEND value it does not know,
    // std::system_error for other failures (eventfd creation).
    explicit event_loop(options opts = {});

    // Destroys the loop without running anything more: operations in flight
    // are cancelled in the kernel and their completions awaited (never
    // delivered), spawned tasks still alive are destroyed (their locals'
    // destructors run; their bodies do not resume), posted functions not yet
    // run are destroyed unrun. For a graceful end, stop() and let run()
    // return first. Must not be called from inside the loop.
    ~event_loop();

    event_loop(const event_loop&) = delete;
    event_loop& operator=(const event_loop&) = delete;

    // Drives the loop on the calling thread until `body` completes; returns
    // its value or rethrows its exception. Spawned tasks, posted functions
    // and completions are served meanwhile. `token` cancels `body` (its
    // operations throw coproc::cancelled_error). The first thread to call
    // run() becomes the loop's thread for good (the ring is single-issuer);
    // run() from another thread, or from inside the loop, throws
    // std::logic_error.
    template <class T>
    T run(task<T> body, std::stop_token token = {});

    // Starts `body` as a detached task: it runs on the loop's thread while
    // the loop runs and is owned by the loop. An exception escaping it is
    // passed to the unhandled-exception handler, except a cancelled_error
    // caused by a stop of its own token (stop() or `token`). Call it on the
    // loop thread, or on any thread while no thread is inside run(); from
    // another thread while the loop runs it throws std::logic_error.
    void spawn(task<void> body, std::stop_token token = {});

    // Queues `fn` to run on the loop's thread and wakes the loop. Thread-safe;
    // functions posted by one thread run in the order posted. An exception
    // escaping `fn` goes to the unhandled-exception handler.
    void post(std::function<void()> fn);

    // Requests a stop of every task the loop runs (run's and spawned ones):
    // their pending operations are cancelled and they resume with
    // coproc::cancelled_error. run() returns once its own task has finished.
    // Thread-safe; when called while no thread runs the loop, it takes effect
    // at the next run().
    void stop();

    // Sets the function that receives exceptions escaping spawned tasks and
    // posted functions. The default prints them to stderr. Call it on the
    // loop thread or before the loop runs.
    void set_unhandled_exception_handler(exception_handler handler);

    // True on the thread that is inside run() right now.
    [[nodiscard]] bool is_loop_thread() const noexcept;

    // True while some thread is inside run(). Thread-safe, and only a
    // snapshot: the answer may change as soon as it is returned.
    [[nodiscard]] bool running() const noexcept;

    // The loop the calling thread is running (inside its run()), or null.
    [[nodiscard]] static event_loop* current() noexcept;

    // The io_uring set-up flags that were accepted by the kernel.
    [[nodiscard]] const event_loop_features& features() const noexcept;

    // The backend this loop runs on and, when it is not what was asked
    // for, why.
    [[nodiscard]] const event_loop_backend_info& backend() const noexcept;

    // --- driving the loop from another event loop (Asio's io_context, a
    // GUI's, epoll of your own): poll_ready() plus wait_fd(). This needs a
    // loop on the epoll backend (event_loop_options{.backend =
    // event_loop_backend::epoll}). On io_uring with deferred task-run,
    // completions reach the ring only while the loop's thread is inside
    // io_uring_enter, and the one way to tell another poller, an eventfd
    // registered with the ring, was seen to lose signals on Linux 6.18; so
    // poll_ready() on an io_uring loop throws std::logic_error, and
    // wait_fd() is -1 there.

    // Runs on the calling thread, without blocking, what is ready now:
    // functions posted and stops requested by other threads, ready
    // coroutines, and the completions the kernel has delivered. Returns true
    // when more is ready at once (call again soon), false when everything
    // left waits on I/O, timers or other threads; wait_fd() then turns
    // readable when that changes. The thread rules are run()'s: the first
    // thread to drive the loop (by run() or poll_ready()) owns it for good,
    // and poll_ready() from inside the loop throws std::logic_error. Between
    // calls no thread is inside run(), so spawn() may be called there.
    // Throws std::logic_error on the io_uring backend.
    bool poll_ready();

    // A file descriptor, owned by the loop, that becomes readable whenever
    // the loop gets work (-1 on io_uring): a completion, a
    // post(), a stop(), a coroutine scheduled from another thread. Each such
    // event is a fresh wake-up of the descriptor, so it suits an
    // edge-triggered epoll such as Asio's reactor: when poll_ready() returns
    // false, start waiting right away, before returning to the outer loop,
    // and no event is missed. poll_ready() consumes the readiness, so a
    // level-triggered poll(2) works too. Never read, write or close it.
    [[nodiscard]] int wait_fd() const noexcept;

    // --- awaitable operations; co_await them from coroutines the loop runs.

    // Resumes the awaiter on the loop thread, after everything already ready.
    schedule_operation schedule() noexcept { return schedule_operation{*this}; }

    // Completes no earlier than `duration` from now / than `deadline`
    // (CLOCK_MONOTONIC, the clock behind std::chrono::steady_clock).
    io_operation<void> sleep_for(clock::duration duration);
    io_operation<void> sleep_until(clock::time_point deadline);

    // read(2)/write(2) at `offset`; the default, -1, uses and moves the file
    // position. Yield the byte count (0 from read: end of file).
    io_operation<std::size_t> read(int fd, std::span<std::byte> buffer, std::uint64_t offset = ~std::uint64_t{0});
    io_operation<std::size_t> write(int fd, std::span<const std::byte> buffer, std::uint64_t offset = ~std::uint64_t{0});

    // recv(2)/send(2). send defaults to MSG_NOSIGNAL: a closed peer is an
    // EPIPE error, not a SIGPIPE.
    io_operation<std::size_t> recv(int fd, std::span<std::byte> buffer, int flags = 0);
    io_operation<std::size_t> send(int fd, std::span<const std::byte> buffer, int flags = MSG_NOSIGNAL);

    // sendmsg(2)/recvmsg(2), control messages included: this is how file
    // descriptors travel (SCM_RIGHTS). `message` and everything it points to
    // must stay valid until the operation completes; recvmsg updates
    // msg_controllen and msg_flags as recvmsg(2) does.
    io_operation<std::size_t> sendmsg(int fd, const ::msghdr* message, int flags = MSG_NOSIGNAL);
    io_operation<std::size_t> recvmsg(int fd, ::msghdr* message, int flags = 0);

    // Waits until `fd` is ready for `events` (POLLIN, POLLOUT, ...); yields
    // the events that are ready (POLLHUP and POLLERR included).
    io_operation<unsigned> poll(int fd, unsigned events);

    // accept4(2); yields the new connection's fd. `address` may be null.
    io_operation<int> accept(int fd, ::sockaddr* address = nullptr, ::socklen_t* address_length = nullptr,
                             int flags = SOCK_CLOEXEC);
    // connect(2); `address` must stay valid until the operation completes.
    io_operation<void> connect(int fd, const ::sockaddr* address, ::socklen_t address_length);
    // close(2) through the ring.
    io_operation<void> close(int fd);

private:
    friend class schedule_operation;
    friend struct detail::cancel_on_stop;
    friend class detail::root_promise;
    friend struct report_unhandled;
    friend void detail::submit_request(detail::io_request& request);
    friend void detail::settle_request(detail::io_request& request) noexcept;

    // Checks the calling thread may run the loop; makes it the loop thread.
    void enter_run();
    // Undoes enter_run when run() fails before serving.
    void abandon_run() noexcept;
    // Links the root into the list of live roots, ties `token` to its stop
    // source and queues it to start.
    void start_root(std::coroutine_handle<detail::root_promise> root, std::stop_token token);
    // Serves the loop until `done` becomes true.
    void run_until(const bool& done) noexcept;
    void report_unhandled(std::exception_ptr error) noexcept;

    std::unique_ptr<detail::loop_core> core_;
};

// Passes an exception to the loop's unhandled-exception handler, from inside a
// root coroutine. Not API.
struct report_unhandled {
    std::exception_ptr error;
    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<detail::root_promise> root) const noexcept {
        root.promise().loop->report_unhandled(error);
        return false;
    }
    void await_resume() const noexcept {}
};

template <class T>
detail::root_task run_root(task<T> body, detail::run_outcome<T>* outcome) {
    try {
        if constexpr (std::is_void_v<T>) {
            co_await std::move(body);
        } else {
            outcome->value.emplace(co_await std::move(body));
        }
    } catch (...) {
        outcome->exception = std::current_exception();
    }
    outcome->done = true;
}

template <class T>
T event_loop::run(task<T> body, std::stop_token token) {
    enter_run();
    detail::run_outcome<T> outcome;
    try {
        start_root(run_root(std::move(body), &outcome).handle, std::move(token));
    } catch (...) {
        abandon_run();
        throw;
    }
    run_until(outcome.done);
    if (outcome.exception) std::rethrow_exception(outcome.exception);
    if constexpr (!std::is_void_v<T>) return std::move(*outcome.value);
}

} // namespace coproc

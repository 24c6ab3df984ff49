// The event loop's core, whatever the backend: the ready queue, the queue
// that other threads fill, the roots, and the operations in flight. The
// backends (loop_backend.hpp) perform the operations.
//
// One iteration of the loop, on the loop thread:
//
//   drain the foreign queue  (posted functions, coroutines scheduled from other
//                             threads, cancellations asked for by other threads,
//                             stop())
//   resume ready coroutines  (those present when the step began)
//   process                  (the backend starts what was submitted, waits only
//                             when nothing is ready, and reports what ended;
//                             each report resumes the coroutine awaiting it)
//
// Other threads never touch the backend's structures: they push onto the
// foreign queue under its mutex and wake the backend.

#include <coproc/cancellation.hpp>
#include <coproc/event_loop.hpp>

#include "loop_backend.hpp"

#include <unistd.h>

#include <cstdlib>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace coproc {
namespace detail {

class loop_core;

namespace {
// The loop the calling thread is running right now (inside run()), if any.
thread_local loop_core* current_loop = nullptr;
} // namespace

const char* io_kind_name(io_kind kind) noexcept {
    switch (kind) {
    case io_kind::read: return "read";
    case io_kind::write: return "write";
    case io_kind::recv: return "recv";
    case io_kind::send: return "send";
    case io_kind::sendmsg: return "sendmsg";
    case io_kind::recvmsg: return "recvmsg";
    case io_kind::poll: return "poll";
    case io_kind::accept: return "accept";
    case io_kind::connect: return "connect";
    case io_kind::close: return "close";
    case io_kind::timeout: return "timer";
    }
    return "operation";
}

void throw_io_error(io_kind kind, int negative_errno) {
    throw std::system_error(-negative_errno, std::system_category(), std::string("coproc: ") + io_kind_name(kind));
}

void throw_cancelled(io_kind kind) {
    throw cancelled_error(std::string("coproc: ") + io_kind_name(kind) + " cancelled by a stop request");
}

class loop_core final : public completion_sink {
public:
    explicit loop_core(const event_loop_options& options);
    ~loop_core();
    loop_core(const loop_core&) = delete;
    loop_core& operator=(const loop_core&) = delete;

    // --- loop thread
    void submit(io_request& request);
    void submit_cancel(io_request& request);
    void serve(const bool& done);
    bool poll_step();
    void shut_down() noexcept;
    void link_root(root_promise& root) noexcept;
    void unlink_root(root_promise& root) noexcept;
    void report(std::exception_ptr error) noexcept;

    // --- any thread
    void post(std::function<void()> fn);
    void schedule_from_foreign_thread(std::coroutine_handle<> handle);
    void request_cancel_from_foreign_thread(io_request& request);
    void request_stop();
    void forget_foreign_cancel(io_request& request) noexcept;

    // completion_sink: the backend reports an operation's end.
    void complete(io_request& request, int result) override;

    std::unique_ptr<loop_backend> backend;
    event_loop_backend_info backend_info;
    event_loop* owner_loop = nullptr;   // the event_loop this core belongs to
    ::pid_t owner = 0;                  // kernel thread id of the thread that last drove the loop
    // A thread is inside run(). Read by spawn(), running() and the
    // destructor on other threads to reject misuse, and claimed by run():
    // the thread whose exchange (acq_rel) turns it true sees what the last
    // runner wrote before its release store turned it false (owner, the
    // ring's state), so a thread that takes over an idle loop, or refuses
    // to, reads them without a race. The other loads guard no data: relaxed.
    std::atomic<bool> running{false};
    bool shutting_down = false;         // in the destructor: completions are not delivered
    std::deque<std::coroutine_handle<>> ready;
    event_loop::exception_handler handler;

private:
    void drain_foreign();
    void run_ready();
    void unlink_in_flight(io_request& request) noexcept;
    // Runs `push` under the foreign-queue mutex and wakes the loop.
    template <class Push>
    void push_foreign(Push push);

    io_request* in_flight_ = nullptr;   // doubly linked through prev/next_in_flight
    std::size_t in_flight_count_ = 0;
    root_promise* roots_ = nullptr;     // live roots, doubly linked

    // The foreign queue. has_foreign_ is written only under mutex_; the loop
    // reads it without the lock to skip locking when nothing was queued. A
    // stale false is harmless: whoever queued wrote the eventfd after setting
    // it, so the loop wakes and looks again. Relaxed suffices because the
    // data itself is read under the mutex.
    std::mutex mutex_;
    std::atomic<bool> has_foreign_{false};
    std::vector<std::function<void()>> posted_;
    std::vector<std::coroutine_handle<>> scheduled_;
    io_request* cancel_list_ = nullptr;  // singly linked through next_cancel
    bool stop_requested_ = false;
};

namespace {
// The backend that options and COPROC_BACKEND ask for; falls back from
// io_uring to epoll when io_uring cannot be set up and was not required.
std::unique_ptr<loop_backend> choose_backend(completion_sink& sink, const event_loop_options& options,
                                             event_loop_backend_info& info) {
    event_loop_backend wanted = options.backend;
    const char* origin = "event_loop_options::backend";
    if (wanted == event_loop_backend::automatic) {
        if (const char* variable = std::getenv("COPROC_BACKEND"); variable != nullptr && *variable != '\0') {
            const std::string value = variable;
            if (value == "epoll") {
                wanted = event_loop_backend::epoll;
            } else if (value == "io_uring") {
                wanted = event_loop_backend::io_uring;
            } else if (value != "auto" && value != "automatic") {
                throw std::invalid_argument("coproc: COPROC_BACKEND=" + value +
                                            " is not a backend; use io_uring, epoll or auto");
            }
            origin = "COPROC_BACKEND";
        }
    }
    switch (wanted) {
    case event_loop_backend::io_uring:
        info = {event_loop_backend::io_uring, {}};
        return make_uring_backend(sink, options);
    case event_loop_backend::epoll:
        info = {event_loop_backend::epoll,
                std::string("requested by ") + origin + (origin[0] == 'C' ? "=epoll" : "")};
        return make_epoll_backend(sink, options);
    case event_loop_backend::automatic: break;
    }
    try {
        info = {event_loop_backend::io_uring, {}};
        return make_uring_backend(sink, options);
    } catch (const io_uring_unavailable& unavailable) {
        info = {event_loop_backend::epoll, unavailable.what()};
        return make_epoll_backend(sink, options);
    }
}
} // namespace

loop_core::loop_core(const event_loop_options& options) {
    if (options.entries == 0) throw std::invalid_argument("coproc: event_loop_options::entries must be positive");
    backend = choose_backend(*this, options, backend_info);
}

loop_core::~loop_core() = default;

void loop_core::submit(io_request& request) {
    if (current_loop != this) {
        throw std::logic_error(std::string("coproc: ") + io_kind_name(request.kind) +
                               " awaited outside the loop's thread; event_loop operations must be awaited by "
                               "coroutines the loop runs");
    }
    backend->submit(request);
    request.in_flight = true;
    request.prev_in_flight = nullptr;
    request.next_in_flight = in_flight_;
    if (in_flight_ != nullptr) in_flight_->prev_in_flight = &request;
    in_flight_ = &request;
    ++in_flight_count_;
}

void loop_core::submit_cancel(io_request& request) { backend->cancel(request); }

template <class Push>
void loop_core::push_foreign(Push push) {
    bool first;
    {
        std::lock_guard lock{mutex_};
        push();
        first = !has_foreign_.exchange(true, std::memory_order_relaxed);
    }
    // Only the push that makes the queue non-empty wakes the backend; the
    // loop clears the flag under the mutex when it takes the queue.
    if (first) backend->wake();
}

void loop_core::post(std::function<void()> fn) {
    push_foreign([&] { posted_.push_back(std::move(fn)); });
}

void loop_core::schedule_from_foreign_thread(std::coroutine_handle<> handle) {
    push_foreign([&] { scheduled_.push_back(handle); });
}

void loop_core::request_cancel_from_foreign_thread(io_request& request) {
    push_foreign([&] {
        if (request.in_cancel_list) return;
        request.in_cancel_list = true;
        request.next_cancel = cancel_list_;
        cancel_list_ = &request;
    });
}

void loop_core::request_stop() {
    push_foreign([&] { stop_requested_ = true; });
}

void loop_core::forget_foreign_cancel(io_request& request) noexcept {
    std::lock_guard lock{mutex_};
    if (!request.in_cancel_list) return;
    for (io_request** link = &cancel_list_; *link != nullptr; link = &(*link)->next_cancel) {
        if (*link == &request) {
            *link = request.next_cancel;
            break;
        }
    }
    request.in_cancel_list = false;
}

void loop_core::drain_foreign() {
    if (!has_foreign_.load(std::memory_order_relaxed)) return;
    std::vector<std::function<void()>> posted;
    std::vector<std::coroutine_handle<>> scheduled;
    std::vector<io_request*> cancels;
    bool stop;
    {
        std::lock_guard lock{mutex_};
        posted.swap(posted_);
        scheduled.swap(scheduled_);
        for (io_request* request = cancel_list_; request != nullptr; request = request->next_cancel) {
            request->in_cancel_list = false;
            cancels.push_back(request);
        }
        cancel_list_ = nullptr;
        stop = std::exchange(stop_requested_, false);
        has_foreign_.store(false, std::memory_order_relaxed);
    }
    // Every request in the list is still in flight: it leaves the list (under
    // the mutex, in settle_request) before its awaiter can go away, and that
    // happens on this thread, which is busy here.
    for (io_request* request : cancels) submit_cancel(*request);
    if (stop) {
        // request_stop runs callbacks inline, and one may end (and free) a
        // root; so collect the sources first. They are reference-counted.
        std::vector<std::stop_source> sources;
        for (root_promise* root = roots_; root != nullptr; root = root->next) sources.push_back(root->stop_source);
        for (auto& source : sources) source.request_stop();
    }
    for (auto handle : scheduled) ready.push_back(handle);
    for (auto& fn : posted) {
        try {
            fn();
        } catch (...) {
            report(std::current_exception());
        }
    }
}

void loop_core::run_ready() {
    // Only what is ready now: a coroutine that schedules itself again waits
    // for the next iteration, so completions are never starved.
    for (std::size_t n = ready.size(); n > 0 && !ready.empty(); --n) {
        auto handle = ready.front();
        ready.pop_front();
        handle.resume();
    }
}

void loop_core::unlink_in_flight(io_request& request) noexcept {
    if (request.prev_in_flight != nullptr) {
        request.prev_in_flight->next_in_flight = request.next_in_flight;
    } else {
        in_flight_ = request.next_in_flight;
    }
    if (request.next_in_flight != nullptr) request.next_in_flight->prev_in_flight = request.prev_in_flight;
    request.prev_in_flight = request.next_in_flight = nullptr;
    --in_flight_count_;
    request.in_flight = false;
}

void loop_core::complete(io_request& request, int result) {
    unlink_in_flight(request);
    request.result = result;
    if (!shutting_down) request.waiter.resume();
}

namespace {
// Makes `core` the calling thread's current loop for the scope, and restores
// whichever loop was current before (a loop may be run or destroyed from a
// coroutine of another loop).
class current_loop_scope {
public:
    explicit current_loop_scope(loop_core* core) noexcept : previous_(std::exchange(current_loop, core)) {}
    ~current_loop_scope() { current_loop = previous_; }
    current_loop_scope(const current_loop_scope&) = delete;
    current_loop_scope& operator=(const current_loop_scope&) = delete;

private:
    loop_core* previous_;
};
} // namespace

void loop_core::serve(const bool& done) {
    current_loop_scope scope{this};
    while (!done) {
        drain_foreign();
        run_ready();
        if (done) break;
        backend->process(ready.empty() && !has_foreign_.load(std::memory_order_relaxed));
    }
    backend->leave_run();
    running.store(false, std::memory_order_release); // pairs with enter_run's exchange
}

bool loop_core::poll_step() {
    current_loop_scope scope{this};
    backend->begin_poll();
    drain_foreign();
    run_ready();
    backend->process(false);
    backend->end_poll();
    return !ready.empty() || has_foreign_.load(std::memory_order_relaxed) || backend->has_pending();
}

void loop_core::shut_down() noexcept {
    shutting_down = true;
    if (in_flight_count_ > 0 && !backend->can_cancel_here(owner)) {
        // Only the thread that ran this single-issuer ring may submit, so
        // nothing can be cancelled from here, and closing the ring does not
        // wait for work the kernel already started. Freeing the frames that
        // own the buffers could let the kernel write into freed memory:
        // leak them instead, and say so.
        std::fprintf(stderr,
                     "coproc: event_loop destroyed on a thread other than the one that ran it, with %zu operation(s) "
                     "in flight; their coroutine frames are leaked to keep the kernel from writing into freed "
                     "memory. Destroy the loop on the thread that runs it.\n",
                     in_flight_count_);
        roots_ = nullptr;
        ready.clear();
        std::lock_guard lock{mutex_};
        posted_.clear();
        scheduled_.clear();
        cancel_list_ = nullptr;
        return;
    }
    if (in_flight_count_ > 0) {
        // Cancel everything and wait for every completion, delivering none:
        // only then may the frames that own the buffers be destroyed.
        current_loop_scope scope{this};
        for (io_request* request = in_flight_; request != nullptr; request = request->next_in_flight) {
            submit_cancel(*request);
        }
        while (in_flight_count_ > 0) backend->process(true);
    }
    while (roots_ != nullptr) {
        // The promise's destructor unlinks the root.
        std::coroutine_handle<root_promise>::from_promise(*roots_).destroy();
    }
    ready.clear();
    std::lock_guard lock{mutex_};
    posted_.clear();
    scheduled_.clear();
    cancel_list_ = nullptr;
}

void loop_core::link_root(root_promise& root) noexcept {
    root.prev = nullptr;
    root.next = roots_;
    if (roots_ != nullptr) roots_->prev = &root;
    roots_ = &root;
}

void loop_core::unlink_root(root_promise& root) noexcept {
    if (root.prev != nullptr) {
        root.prev->next = root.next;
    } else if (roots_ == &root) {
        roots_ = root.next;
    }
    if (root.next != nullptr) root.next->prev = root.prev;
    root.prev = root.next = nullptr;
}

void loop_core::report(std::exception_ptr error) noexcept {
    if (handler) {
        handler(std::move(error));
        return;
    }
    try {
        std::rethrow_exception(std::move(error));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "coproc: unhandled exception in a task spawned on the event loop: %s\n", e.what());
    } catch (...) {
        std::fprintf(stderr, "coproc: unhandled exception of unknown type in a task spawned on the event loop\n");
    }
}

// --- glue called from the public headers

void submit_request(io_request& request) { request.loop->core_->submit(request); }

void settle_request(io_request& request) noexcept {
    if (request.cancel_requested.load(std::memory_order_relaxed)) request.loop->core_->forget_foreign_cancel(request);
}

void abandoned_in_flight(const io_request& request) noexcept {
    std::fprintf(stderr,
                 "coproc: a %s operation was destroyed while the kernel still held it (a task destroyed while "
                 "suspended on I/O); aborting rather than let the kernel write into freed memory\n",
                 io_kind_name(request.kind));
    std::abort();
}

void cancel_on_stop::operator()() const noexcept {
    loop_core& core = *request->loop->core_;
    request->cancel_requested.store(true, std::memory_order_relaxed);
    if (current_loop == &core) {
        try {
            core.submit_cancel(*request);
            return;
        } catch (...) {
            // No submission slot: fall back to the queue, served next iteration.
        }
    }
    try {
        core.request_cancel_from_foreign_thread(*request);
    } catch (...) {
        // Out of memory while queueing a cancellation: the operation simply
        // runs to completion, which is always safe.
    }
}

root_promise::~root_promise() {
    if (loop != nullptr) loop->core_->unlink_root(*this);
}

root_task spawn_root(task<void> body) {
    const std::stop_token token = co_await get_stop_token();
    std::exception_ptr error;
    try {
        co_await std::move(body);
    } catch (const cancelled_error&) {
        // Cancelled because its own token was stopped: that is what was asked.
        if (!token.stop_requested()) error = std::current_exception();
    } catch (...) {
        error = std::current_exception();
    }
    if (error) co_await report_unhandled{error};
}

} // namespace detail

// --- event_loop

event_loop::event_loop(options opts) : core_(std::make_unique<detail::loop_core>(opts)) { core_->owner_loop = this; }

event_loop::~event_loop() {
    if (core_->running.load(std::memory_order_relaxed) && is_loop_thread()) {
        std::fprintf(stderr, "coproc: event_loop destroyed from inside its own run()\n");
        std::terminate();
    }
    core_->shut_down();
}

void event_loop::enter_run() {
    auto& core = *core_;
    if (core.running.exchange(true, std::memory_order_acq_rel)) {
        throw std::logic_error(is_loop_thread() ? "coproc: event_loop::run called from inside the loop"
                                                : "coproc: event_loop::run called while another thread runs it");
    }
    const ::pid_t self = ::gettid();
    try {
        core.backend->claim(self, core.owner);
    } catch (...) {
        core.running.store(false, std::memory_order_release);
        throw;
    }
    core.owner = self;
}

bool event_loop::poll_ready() {
    enter_run();
    bool more = false;
    try {
        more = core_->poll_step();
    } catch (...) {
        abandon_run();
        throw;
    }
    core_->running.store(false, std::memory_order_release); // pairs with enter_run's exchange
    return more;
}

int event_loop::wait_fd() const noexcept { return core_->backend->wait_fd(); }

void event_loop::abandon_run() noexcept { core_->running.store(false, std::memory_order_release); }

void event_loop::start_root(std::coroutine_handle<detail::root_promise> root, std::stop_token token) {
    auto& promise = root.promise();
    promise.loop = this;
    core_->link_root(promise);
    if (token.stop_possible()) promise.user_token_link.emplace(std::move(token), detail::request_stop_on{&promise.stop_source});
    core_->ready.push_back(root);
}

void event_loop::run_until(const bool& done) noexcept {
    try {
        core_->serve(done);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "coproc: event loop failed: %s\n", e.what());
        std::terminate();
    }
}

void event_loop::spawn(task<void> body, std::stop_token token) {
    if (core_->running.load(std::memory_order_relaxed) && !is_loop_thread()) {
        throw std::logic_error("coproc: event_loop::spawn called from a thread other than the loop's; use post()");
    }
    start_root(detail::spawn_root(std::move(body)).handle, std::move(token));
}

void event_loop::post(std::function<void()> fn) { core_->post(std::move(fn)); }

void event_loop::stop() { core_->request_stop(); }

void event_loop::set_unhandled_exception_handler(exception_handler handler) { core_->handler = std::move(handler); }

bool event_loop::is_loop_thread() const noexcept { return detail::current_loop == core_.get(); }

bool event_loop::running() const noexcept { return core_->running.load(std::memory_order_relaxed); }

event_loop* event_loop::current() noexcept {
    return detail::current_loop != nullptr ? detail::current_loop->owner_loop : nullptr;
}

const event_loop_features& event_loop::features() const noexcept { return core_->backend->features(); }

const event_loop_backend_info& event_loop::backend() const noexcept { return core_->backend_info; }

const char* to_string(event_loop_backend backend) noexcept {
    switch (backend) {
    case event_loop_backend::automatic: return "automatic";
    case event_loop_backend::io_uring: return "io_uring";
    case event_loop_backend::epoll: return "epoll";
    }
    return "unknown";
}

void event_loop::report_unhandled(std::exception_ptr error) noexcept { core_->report(std::move(error)); }

void schedule_operation::await_suspend(std::coroutine_handle<> awaiting) {
    if (loop_->is_loop_thread()) {
        loop_->core_->ready.push_back(awaiting);
    } else {
        loop_->core_->schedule_from_foreign_thread(awaiting);
    }
}

// --- operations

namespace {
detail::kernel_timespec to_kernel_timespec(event_loop::clock::time_point deadline) {
    const auto since_epoch = deadline.time_since_epoch();
    const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(since_epoch);
    const auto nanoseconds = std::chrono::duration_cast<std::chrono::nanoseconds>(since_epoch - seconds);
    return {seconds.count(), nanoseconds.count()};
}
} // namespace

io_operation<void> event_loop::sleep_for(clock::duration duration) {
    return sleep_until(clock::now() + (duration < clock::duration::zero() ? clock::duration::zero() : duration));
}

io_operation<void> event_loop::sleep_until(clock::time_point deadline) {
    io_operation<void> operation{*this, detail::io_kind::timeout};
    operation.request().deadline = to_kernel_timespec(deadline);
    return operation;
}

namespace {
template <class Result>
io_operation<Result> buffer_operation(event_loop& loop, detail::io_kind kind, int fd, const void* data,
                                      std::size_t size, std::uint64_t offset, int flags) {
    io_operation<Result> operation{loop, kind};
    auto& request = operation.request();
    request.fd = fd;
    request.address = const_cast<void*>(data);
    request.length = size;
    request.offset = offset;
    request.flags = static_cast<std::uint32_t>(flags);
    return operation;
}
} // namespace

io_operation<std::size_t> event_loop::read(int fd, std::span<std::byte> buffer, std::uint64_t offset) {
    return buffer_operation<std::size_t>(*this, detail::io_kind::read, fd, buffer.data(), buffer.size(), offset, 0);
}

io_operation<std::size_t> event_loop::write(int fd, std::span<const std::byte> buffer, std::uint64_t offset) {
    return buffer_operation<std::size_t>(*this, detail::io_kind::write, fd, buffer.data(), buffer.size(), offset, 0);
}

io_operation<std::size_t> event_loop::recv(int fd, std::span<std::byte> buffer, int flags) {
    return buffer_operation<std::size_t>(*this, detail::io_kind::recv, fd, buffer.data(), buffer.size(), 0, flags);
}

io_operation<std::size_t> event_loop::send(int fd, std::span<const std::byte> buffer, int flags) {
    return buffer_operation<std::size_t>(*this, detail::io_kind::send, fd, buffer.data(), buffer.size(), 0, flags);
}

io_operation<std::size_t> event_loop::sendmsg(int fd, const ::msghdr* message, int flags) {
    return buffer_operation<std::size_t>(*this, detail::io_kind::sendmsg, fd, message, 0, 0, flags);
}

io_operation<std::size_t> event_loop::recvmsg(int fd, ::msghdr* message, int flags) {
    return buffer_operation<std::size_t>(*this, detail::io_kind::recvmsg, fd, message, 0, 0, flags);
}

io_operation<unsigned> event_loop::poll(int fd, unsigned events) {
    return buffer_operation<unsigned>(*this, detail::io_kind::poll, fd, nullptr, 0, 0, static_cast<int>(events));
}

io_operation<int> event_loop::accept(int fd, ::sockaddr* address, ::socklen_t* address_length, int flags) {
    auto operation = buffer_operation<int>(*this, detail::io_kind::accept, fd, address, 0, 0, flags);
    operation.request().address2 = address_length;
    return operation;
}

io_operation<void> event_loop::connect(int fd, const ::sockaddr* address, ::socklen_t address_length) {
    return buffer_operation<void>(*this, detail::io_kind::connect, fd, address, address_length, 0, 0);
}

io_operation<void> event_loop::close(int fd) {
    return buffer_operation<void>(*this, detail::io_kind::close, fd, nullptr, 0, 0, 0);
}

} // namespace coproc

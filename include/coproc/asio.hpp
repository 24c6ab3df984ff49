// coproc/asio.hpp - coproc inside Asio programs: process-pool work started
// with any Asio completion token, and an io_context that drives a coproc
// event_loop on its own thread.
//
//     asio::awaitable<std::string> reply(coproc::process_pool& pool, long n) {
//         long primes = co_await coproc::async_submit<count_primes>(pool, n, asio::use_awaitable);
//         co_return std::to_string(primes);
//     }
//
//     asio::io_context io;                 // one thread for the server and the pool:
//     coproc::event_loop loop;
//     coproc::process_pool pool{loop};
//     coproc::asio_driver driver{io, loop}; // io.run() drives the loop too
//     asio::co_spawn(io, serve(pool), asio::detached);
//     io.run();
//
// Header-only, and the one coproc header that includes Asio (standalone
// Asio 1.22 or newer); it is not part of coproc/coproc.hpp, and libcoproc
// never includes Asio. The operations below follow Asio's conventions:
// asio::async_initiate, so every completion token works (callbacks,
// use_awaitable, use_future, experimental::deferred, as_tuple, detached,
// parallel_group, awaitable operators); the completion signature of
// co_spawn, void(std::exception_ptr, R); the handler's associated executor,
// allocator and cancellation slot.
//
// Where the loop runs. Either
//  - on a thread of its own (loop.run(...) there): the pool's completions
//    are posted from that thread to each handler's executor; or
//  - on the io_context's thread, through an asio_driver: the io_context
//    runs what the loop has ready whenever the loop's wake-up descriptor
//    turns readable, so a server and its pool share one thread.
// README.md, "Asio", compares the two.
//
// Threads. The handler of every operation runs on its associated executor
// (a strand is honoured; a handler with none runs on asio::system_executor),
// always through asio::post: never inside the initiating function, and never
// inside the coproc loop's own step (so a handler may destroy the pool, the
// loop or the io_context). Outstanding work is counted on that executor
// until the handler is posted, so io_context::run() does not return while
// an operation is out.
//
// Lifetimes. Destroying the io_context (the execution context of the
// handler's executor), the pool or the loop, in any order that coproc
// itself allows (the pool before its loop), with operations outstanding:
//  - the io_context first: the handlers of its outstanding operations are
//    destroyed uncalled (as Asio destroys the handlers it has queued), and
//    their tasks are cancelled;
//  - the pool first: its tasks end cancelled, and each handler is called
//    with operation_aborted once the loop runs them, or, if the loop is
//    destroyed before it ran again, when the loop is destroyed;
//  - the loop (after the pool): handlers not yet completed are called with
//    operation_aborted.
// In every case each handler is called exactly once or destroyed, and no
// operation waits for ever.
//
// Errors. A task's exception reaches the handler as the exception_ptr (so
// use_awaitable rethrows it as its own type: worker_died, remote_error,
// std::invalid_argument, ...). A cancellation, whoever asked for it (the
// cancellation slot, future::cancel, the pool's destruction or shutdown
// with cancel_futures, event_loop::stop), arrives as
// std::system_error with code asio::error::operation_aborted, its what()
// keeping coproc's message: coproc::cancelled_error is translated. A
// failure at the initiating call (queue_full, pool_closed,
// broken_process_pool, an argument that does not serialize) is posted to
// the handler like any other outcome.
//
// GCC 12 (PRs 100611, 101367): do not pass a braced temporary directly in a
// co_await expression (co_await async_submit<f>(pool, std::string{"x"},
// asio::use_awaitable) double-frees); name the argument first. The same
// rule as for process_pool::submit.
#pragma once

#include <coproc/event_loop.hpp>
#include <coproc/future.hpp>
#include <coproc/process_pool.hpp>
#include <coproc/task.hpp>

#include <asio/associated_allocator.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/error.hpp>
#include <asio/execution.hpp>
#include <asio/execution_context.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/query.hpp>

#include <atomic>
#include <cstddef>
#include <exception>
#include <fcntl.h>
#include <memory>
#include <mutex>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <stop_token>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <unistd.h>
#include <utility>
#include <vector>

namespace coproc {

namespace detail::asio_bridge {
template <auto F>
struct initiate_submit;
template <auto F>
struct initiate_map;
struct initiate_shutdown;
class driver_core;
class loop_demand;
template <class R>
struct signature_of {
    using type = void(std::exception_ptr, R);
};
template <>
struct signature_of<void> {
    using type = void(std::exception_ptr);
};
template <class R>
using submit_signature = typename signature_of<R>::type;
} // namespace detail::asio_bridge

// Runs F(args...) in a worker of `pool`, as pool.submit<F>(args...) does,
// and calls the completion handler with its outcome. The last argument is
// the completion token; the ones before it are F's arguments, converted to
// F's parameter types and serialized when the operation is initiated (for a
// lazy token such as experimental::deferred, when the deferred operation is
// started; until then it keeps decayed copies of them).
//
// The handler is called exactly once, on its associated executor, through
// asio::post, when the task is final: with the result, with the task's
// exception, or with std::system_error(asio::error::operation_aborted) when
// the task was cancelled. A submit that fails at once (queue_full,
// pool_closed, broken_process_pool) is posted to the handler as well: the
// initiating function never calls the handler and throws only what Asio's
// initiation itself may throw (std::bad_alloc).
//
// @par Completion Signature
// void(std::exception_ptr, R) where R is F's result type (void(std::exception_ptr)
// when F returns void). On failure R is value-initialized.
//
// @par Per-Operation Cancellation
//  - terminal (what use_awaitable and awaitable operators send) and partial:
//    a pending task is removed from the queue and never runs; a task sent
//    to a worker but not started is dropped by the worker unrun; a running
//    task has its std::stop_token stopped. With terminal, a task that has
//    not returned within process_pool_options::cancel_grace then has its
//    worker killed and replaced (future::cancel); with partial it is never
//    killed and keeps its worker until it returns (future::request_stop).
//    The handler gets operation_aborted at once.
//  - total: only a task that has not started running is cancelled, as
//    above; a running task runs on (cancelling it would leave side
//    effects), and the handler gets its outcome.
//  - a task that has already ended: nothing happens.
// The cancellation handler only asks the pool (thread-safe); the slot is
// cleared on the handler's executor before the handler runs.
//
// Thread Safety: like process_pool::submit, callable from any thread.
template <auto F, class... ArgsAndToken>
auto async_submit(process_pool& pool, ArgsAndToken&&... args_and_token);

// Runs F over every element of `inputs` in workers, as co_await
// pool.map<F>(inputs, options) does, and calls the handler with the results
// in input order. `inputs` is copied or moved into the operation (so an
// lvalue range need not outlive it). Chunks are submitted when the
// operation is initiated; the collecting runs on the pool's loop.
//
// @par Completion Signature
// void(std::exception_ptr, std::vector<R>): the results, or the first
// failure in input order (the chunks still in flight are then cancelled).
//
// @par Per-Operation Cancellation
// terminal and partial: every chunk still pending or in a worker is
// cancelled as async_submit cancels a task, and the handler gets
// operation_aborted. total: ignored (chunks may have run). Nothing happens
// once the map has completed.
//
// Thread Safety: callable from any thread. Throws std::invalid_argument
// (chunksize 0) through the handler, like every other failure.
template <auto F, std::ranges::input_range Range, class CompletionToken>
auto async_map(process_pool& pool, Range&& inputs, map_options options, CompletionToken&& token);

// co_await pool.shutdown(options), for Asio code: stops accepting work and,
// with `wait`, completes once the pending and running tasks are done and
// the workers have exited. process_pool::shutdown_blocking cannot be used on
// the io_context's thread when an asio_driver drives the loop from it (the
// loop would never run); this can.
//
// @par Completion Signature
// void(std::exception_ptr)
//
// @par Per-Operation Cancellation
// terminal and partial: the wait ends with operation_aborted; the pool
// stays closed, and what still runs is killed when the pool is destroyed.
// total: ignored.
template <class CompletionToken>
auto async_shutdown(process_pool& pool, shutdown_options options, CompletionToken&& token);

// Lets an asio::io_context drive a coproc event_loop on the io_context's
// thread: whenever the loop has work (a completion from the kernel, a post,
// a timer, a submit from another thread), its wake-up descriptor turns
// readable, and a handler on the io_context runs what the loop has ready
// (event_loop::poll_ready), then waits again. A server and its pool then
// share one thread, with no thread hop between a task's completion and its
// handler.
//
// The wait is armed only while the loop has something to do for Asio code:
// while an async_submit, async_map or async_shutdown on a pool of this loop
// is outstanding, or while a hold from keep_driving() exists. So
// io_context::run() returns when the server's own work is done, as with any
// other Asio I/O object. Between those, the loop is not driven: its
// timers (idle workers, cancel_grace kills, deadlines) wait for the next
// operation. A server keeps a hold while it serves.
//
// The first thread to drive a loop owns it: with a driver, never call
// loop.run() from another thread. Only one driver per loop (a second throws
// std::logic_error).
//
// Thread Safety: construct, use and destroy the driver on the io_context's
// thread (or while no thread runs it). The operations above may be
// initiated from any thread. Destroying the io_context first is allowed:
// the driver then stops driving; destroy the driver before the loop.
// The options of a loop that an asio_driver drives: the epoll backend,
// which is what event_loop::poll_ready() needs (see event_loop.hpp).
//     coproc::event_loop loop{coproc::driven_loop_options};
inline constexpr event_loop_options driven_loop_options{.backend = event_loop_backend::epoll};

class asio_driver {
public:
    // Keeps the driver driving the loop while it exists (for coroutines
    // spawned on the loop, or the pool's own timers between operations).
    // Move-only; release() or the destructor lets go.
    class hold {
    public:
        hold() noexcept = default;
        hold(hold&& other) noexcept : demand_(std::move(other.demand_)) {}
        hold& operator=(hold&& other) noexcept {
            if (this != &other) {
                release();
                demand_ = std::move(other.demand_);
            }
            return *this;
        }
        hold(const hold&) = delete;
        hold& operator=(const hold&) = delete;
        ~hold() { release(); }
        void release() noexcept;
        [[nodiscard]] bool owns() const noexcept { return demand_ != nullptr; }

    private:
        friend class asio_driver;
        explicit hold(std::shared_ptr<detail::asio_bridge::loop_demand> demand) noexcept : demand_(std::move(demand)) {}
        std::shared_ptr<detail::asio_bridge::loop_demand> demand_;
    };

    // Starts driving `loop` from `io`. Throws std::logic_error when another
    // driver drives `loop` or when `loop` is not on the epoll backend
    // (create it with driven_loop_options), std::system_error when the
    // wake-up descriptor cannot be duplicated.
    asio_driver(asio::io_context& io, event_loop& loop);
    // Stops driving: the pending wait is cancelled. Operations still
    // outstanding then complete only if something else drives the loop, or
    // end as described under Lifetimes above.
    ~asio_driver();
    asio_driver(const asio_driver&) = delete;
    asio_driver& operator=(const asio_driver&) = delete;

    // A hold that keeps the loop driven until it is released.
    [[nodiscard]] hold keep_driving();

private:
    std::shared_ptr<detail::asio_bridge::driver_core> core_;
};

// ---------------------------------------------------------------------------
// Implementation. Not API.

namespace detail::asio_bridge {

// Translates coproc's cancellation into Asio's: every cancelled_error
// becomes std::system_error(asio::error::operation_aborted) with the same
// message; every other exception is passed on as it is.
inline std::exception_ptr asio_error_of(std::exception_ptr error) {
    if (!error) return error;
    try {
        std::rethrow_exception(error);
    } catch (const cancelled_error& cancelled) {
        return std::make_exception_ptr(std::system_error(asio::error::operation_aborted, cancelled.what()));
    } catch (...) {
        return error;
    }
}

template <class Executor>
asio::execution_context& context_of(const Executor& executor) {
    if constexpr (asio::can_query<const Executor&, asio::execution::context_t>::value) {
        return asio::query(executor, asio::execution::context);
    } else {
        return executor.context();
    }
}

// --- the driver's bookkeeping
//
// What Asio code wants from one loop is a loop_demand: how many operations
// on the loop's pools are outstanding, plus the holds, and the driver that
// drives the loop, if any. Operations find it through demand_table by the
// loop's address, whether a driver exists or not (it may come later), and
// count themselves in it (driver_ticket) until their handler is posted.

class driver_core;

class loop_demand {
public:
    // Any thread. The first demand wakes the driver.
    void acquire() noexcept;
    // Any thread. The last release lets the driver go idle, so that
    // io_context::run() can return.
    void release() noexcept;
    // After this thread posted to the loop (a submit, a cancel): steps the
    // loop soon, whether or not its wake-up descriptor turns readable.
    // A post() to the loop wakes wait_fd() on its own; the nudge makes the
    // step come without a round trip through the reactor. (It was first a
    // workaround for io_uring loops, whose registered eventfd lost wake-ups
    // on Linux 6.18; a driven loop is on epoll now, see driven_loop_options.)
    void nudge() noexcept;
    [[nodiscard]] bool wanted() const noexcept {
        // acquire: pairs with the acq_rel changes, so a driver that sees
        // demand also sees what the operation did before counting itself.
        return count_.load(std::memory_order_acquire) > 0;
    }
    // Throws std::logic_error when another driver drives the loop.
    void attach(const std::shared_ptr<driver_core>& driver) {
        std::lock_guard lock{mutex_};
        if (!driver_.expired()) {
            throw std::logic_error("coproc::asio_driver: this event_loop already has a driver; one driver per loop");
        }
        driver_ = driver;
    }
    void detach() noexcept {
        std::lock_guard lock{mutex_};
        driver_.reset();
    }

private:
    std::shared_ptr<driver_core> driver() noexcept {
        std::lock_guard lock{mutex_};
        return driver_.lock();
    }
    std::atomic<std::size_t> count_{0};
    std::mutex mutex_;
    std::weak_ptr<driver_core> driver_; // mutex_
};

struct demand_table {
    std::mutex mutex;
    std::vector<std::pair<const event_loop*, std::weak_ptr<loop_demand>>> entries;

    static std::shared_ptr<loop_demand> of(const event_loop& loop) {
        static demand_table table;
        std::lock_guard lock{table.mutex};
        for (auto& [key, weak] : table.entries) {
            if (key != &loop) continue;
            if (auto demand = weak.lock()) return demand;
            auto demand = std::make_shared<loop_demand>();
            weak = demand;
            return demand;
        }
        std::erase_if(table.entries, [](const auto& entry) { return entry.second.expired(); });
        auto demand = std::make_shared<loop_demand>();
        table.entries.emplace_back(&loop, demand);
        return demand;
    }
};

// Drives one event_loop from one io_context. States, on the io_context's
// thread:
//
//   idle --(demand 0 -> 1: kick posted)--> stepping: poll_ready()
//   stepping --(more ready)--> step posted again
//   stepping --(nothing ready, demand > 0)--> waiting: async_wait on the
//                                             loop's wake-up descriptor
//   stepping --(nothing ready, demand 0)--> idle
//   waiting --(readable, or cancelled while demand > 0)--> stepping
//   waiting --(demand -> 0: wait cancelled)--> idle
//   any --(driver destroyed, io_context shut down)--> closed
//
// Everything but `closed_` is touched on the io_context's thread only;
// `mutex_` guards `closed_` together with every post to the io_context, so
// that no post from another thread reaches an io_context being destroyed.
class driver_core : public std::enable_shared_from_this<driver_core> {
public:
    driver_core(asio::io_context& io, event_loop& loop) : io_(&io), loop_(&loop), demand_(demand_table::of(loop)) {
        // A duplicate: the loop keeps its descriptor, and the reactor's
        // registration stays valid however the two are destroyed.
        const int fd = ::fcntl(loop.wait_fd(), F_DUPFD_CLOEXEC, 0);
        if (fd < 0) {
            throw std::system_error(errno, std::generic_category(),
                                    "coproc::asio_driver: cannot duplicate the loop's wake-up descriptor");
        }
        try {
            wake_.emplace(io, fd);
        } catch (...) {
            ::close(fd);
            throw;
        }
    }

    [[nodiscard]] const std::shared_ptr<loop_demand>& demand() const noexcept { return demand_; }

    // io thread, once: becomes the loop's driver and takes a first step.
    void start() {
        demand_->attach(shared_from_this());
        kick();
    }
    // Any thread.
    void kick() noexcept { post_to_io(&driver_core::on_kick); }
    void idle() noexcept { post_to_io(&driver_core::on_idle); }

    // io thread: the driver is destroyed, or its io_context shuts down.
    void close() noexcept {
        {
            std::lock_guard lock{mutex_};
            if (closed_) return;
            closed_ = true;
        }
        demand_->detach();
        // Destroying the descriptor cancels the wait; its handler sees
        // closed_ and does nothing.
        wake_.reset();
    }

private:
    void post_to_io(void (driver_core::*member)()) noexcept {
        std::lock_guard lock{mutex_};
        if (closed_) return;
        try {
            asio::post(*io_, [self = shared_from_this(), member] { (self.get()->*member)(); });
        } catch (...) {
            // Out of memory: the next operation kicks again.
        }
    }

    bool is_closed() noexcept {
        std::lock_guard lock{mutex_};
        return closed_;
    }

    // A kick steps the loop soon, even while a wait is pending (the wait is
    // cancelled, and its handler steps): see loop_demand::nudge.
    void on_kick() {
        if (step_queued_) return;
        if (waiting_) {
            wake_->cancel();
            return;
        }
        step();
    }
    void on_idle() {
        if (waiting_ && !demand_->wanted() && wake_) wake_->cancel();
    }

    void step() {
        step_queued_ = false;
        if (is_closed()) return;
        const bool more = loop_->poll_ready(); // may close this driver (a coroutine destroyed it)
        if (is_closed()) return;
        if (more) {
            step_queued_ = true;
            post_to_io(&driver_core::step);
            return;
        }
        // The loop's contract: after poll_ready() returned false, a wait
        // started at once, in this handler, misses no wake-up.
        if (demand_->wanted()) arm();
    }

    void arm() {
        waiting_ = true;
        wake_->async_wait(asio::posix::stream_descriptor::wait_read, [self = shared_from_this()](const std::error_code& ec) {
            self->waiting_ = false;
            if (self->is_closed()) return;
            if (ec && !self->demand_->wanted()) return; // cancelled by the last release: idle
            self->step();
        });
    }

    asio::io_context* io_;
    event_loop* loop_;
    std::shared_ptr<loop_demand> demand_;
    std::optional<asio::posix::stream_descriptor> wake_;
    std::mutex mutex_;
    bool closed_ = false;      // mutex_
    bool waiting_ = false;     // io thread
    bool step_queued_ = false; // io thread
};

inline void loop_demand::acquire() noexcept {
    if (count_.fetch_add(1, std::memory_order_acq_rel) != 0) return;
    if (auto driving = driver()) driving->kick();
}

inline void loop_demand::nudge() noexcept {
    if (auto driving = driver()) driving->kick();
}

inline void loop_demand::release() noexcept {
    if (count_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    if (auto driving = driver()) driving->idle();
}

// One unit of demand on a loop, from an operation's start until its
// handler is posted. Thread-safe: the loop's thread resets it when the
// operation completes while the initiating thread, or a cancellation, may
// still nudge through it (ThreadSanitizer saw that race).
class driver_ticket {
public:
    driver_ticket() noexcept = default;
    explicit driver_ticket(const event_loop& loop) : demand_(demand_table::of(loop)) { demand_->acquire(); }
    driver_ticket(driver_ticket&& other) noexcept : demand_(other.take()) {}
    driver_ticket& operator=(driver_ticket&&) = delete;
    ~driver_ticket() { reset(); }
    void nudge() const noexcept {
        std::shared_ptr<loop_demand> demand;
        {
            std::lock_guard lock{mutex_};
            demand = demand_;
        }
        if (demand) demand->nudge();
    }
    void reset() noexcept {
        if (auto demand = take()) demand->release();
    }

private:
    std::shared_ptr<loop_demand> take() noexcept {
        std::lock_guard lock{mutex_};
        return std::move(demand_);
    }
    mutable std::mutex mutex_;
    std::shared_ptr<loop_demand> demand_; // mutex_
};

// --- operations
//
// One outstanding operation keeps its handler here, registered with the
// execution context of the handler's executor:
//
//   initiated --(task final: complete() posts the handler)--> completed
//       |
//       +--(the context shuts down: handler destroyed, task cancelled)--> abandoned
//       +--(destroyed unfinished: the loop died)--> completed with operation_aborted
//
// The registry's mutex guards every operation's handler and work guard, so
// that a completion on the loop's thread and the context's shutdown on
// another never both take the handler, and no post reaches a context whose
// shutdown has begun.

class operation_base;

struct handler_box_base {
    virtual ~handler_box_base() = default;
};

template <class Handler>
struct handler_box final : handler_box_base {
    explicit handler_box(Handler&& h) : handler(std::move(h)) {}
    Handler handler;
};

class operation_registry {
public:
    std::mutex mutex;

    // Under `mutex`.
    [[nodiscard]] bool shut_down() const noexcept { return shut_down_; }
    void link(operation_base* operation) noexcept;
    void unlink(operation_base* operation) noexcept;

    // The execution context shuts down (io_context destroyed): every
    // outstanding handler is destroyed, outside the lock (destroying a
    // coroutine's handler may destroy other operations), and its task
    // cancelled. Drivers on this context close.
    void shut_down_now() noexcept;

    void add_driver(std::weak_ptr<driver_core> driver) {
        std::lock_guard lock{mutex};
        drivers_.push_back(std::move(driver));
    }

private:
    operation_base* first_ = nullptr;
    bool shut_down_ = false;
    std::vector<std::weak_ptr<driver_core>> drivers_;
};

class operation_base : public std::enable_shared_from_this<operation_base> {
public:
    virtual ~operation_base() = default;
    // The cancellation slot's request, on the thread that emits it.
    virtual void request_cancel(asio::cancellation_type type) noexcept = 0;

protected:
    friend class operation_registry;
    // Under the registry's mutex: gives up the handler (and the work).
    virtual std::unique_ptr<handler_box_base> abandon_locked() noexcept = 0;
    // After abandon_locked, outside the lock: cancels the task.
    virtual void after_abandon() noexcept = 0;

    operation_base* previous_ = nullptr;
    operation_base* next_ = nullptr;
    bool linked_ = false;
};

inline void operation_registry::link(operation_base* operation) noexcept {
    operation->previous_ = nullptr;
    operation->next_ = first_;
    if (first_) first_->previous_ = operation;
    first_ = operation;
    operation->linked_ = true;
}

inline void operation_registry::unlink(operation_base* operation) noexcept {
    if (!operation->linked_) return;
    if (operation->previous_) operation->previous_->next_ = operation->next_;
    else first_ = operation->next_;
    if (operation->next_) operation->next_->previous_ = operation->previous_;
    operation->previous_ = operation->next_ = nullptr;
    operation->linked_ = false;
}

inline void operation_registry::shut_down_now() noexcept {
    std::vector<std::shared_ptr<operation_base>> abandoned;
    std::vector<std::unique_ptr<handler_box_base>> handlers;
    std::vector<std::weak_ptr<driver_core>> drivers;
    {
        std::lock_guard lock{mutex};
        shut_down_ = true;
        drivers.swap(drivers_);
        while (operation_base* operation = first_) {
            unlink(operation);
            // Null while the operation's destructor waits for this mutex:
            // it then finds its handler gone... or here, still there: take it.
            auto owner = operation->weak_from_this().lock();
            try {
                if (owner) abandoned.push_back(std::move(owner));
            } catch (...) {
                // Out of memory: its handler is still destroyed below.
            }
            auto handler = operation->abandon_locked();
            try {
                handlers.push_back(std::move(handler));
            } catch (...) {
                // Destroyed here, under the lock, as a last resort.
            }
        }
    }
    handlers.clear();
    for (auto& operation : abandoned) operation->after_abandon();
    abandoned.clear();
    for (auto& weak : drivers) {
        if (auto driver = weak.lock()) driver->close();
    }
}

// The registry of one execution context, as an Asio service, so that it
// learns when the context shuts down.
class registry_service final : public asio::execution_context::service {
public:
    using key_type = registry_service;
    inline static asio::execution_context::id id;

    explicit registry_service(asio::execution_context& context)
        : asio::execution_context::service(context), registry_(std::make_shared<operation_registry>()) {}

    [[nodiscard]] const std::shared_ptr<operation_registry>& registry() const noexcept { return registry_; }

private:
    void shutdown() override { registry_->shut_down_now(); }

    std::shared_ptr<operation_registry> registry_;
};

template <class Executor>
std::shared_ptr<operation_registry> registry_of(const Executor& executor) {
    return asio::use_service<registry_service>(context_of(executor)).registry();
}

// What is posted to the handler's executor: clears the cancellation slot,
// then calls the handler. Carries the handler's allocator.
template <class Handler, class... Values>
struct completion {
    Handler handler;
    std::exception_ptr error;
    std::tuple<Values...> values;

    using allocator_type = asio::associated_allocator_t<Handler>;
    allocator_type get_allocator() const noexcept { return asio::get_associated_allocator(handler); }

    void operator()() {
        asio::get_associated_cancellation_slot(handler).clear();
        std::apply([this](auto&... value) { std::move(handler)(std::move(error), std::move(value)...); }, values);
    }
};

// The cancellation slot's handler: holds the operation weakly, so that the
// slot (which lives in the caller's frame or signal) never keeps it alive.
struct cancel_request {
    std::weak_ptr<operation_base> operation;
    void operator()(asio::cancellation_type type) const noexcept {
        if (auto alive = operation.lock()) alive->request_cancel(type);
    }
};

template <class... Values>
struct first_or_void {
    using type = void;
};
template <class Value>
struct first_or_void<Value> {
    using type = Value;
};

// How an operation reacts to its cancellation slot.
enum class cancel_target : unsigned char {
    task,      // a pool future: async_submit
    coroutine, // a coroutine on the loop, stopped through its token: async_map, async_shutdown
};

template <class Handler, class... Values>
class operation final : public operation_base {
public:
    using executor_type = asio::associated_executor_t<Handler>;
    using value_type = typename first_or_void<Values...>::type;

    operation(Handler&& handler, const event_loop& loop, cancel_target target)
        : executor_(asio::get_associated_executor(handler)), registry_(registry_of(executor_)), ticket_(loop),
          target_(target) {
        work_.emplace(executor_);
        handler_ = std::make_unique<handler_box<Handler>>(std::move(handler));
        std::lock_guard lock{registry_->mutex};
        registry_->link(this);
    }

    // The loop died with the operation unfinished (its done callback or
    // coroutine was destroyed unrun): the handler still gets an answer.
    ~operation() override {
        fail(std::make_exception_ptr(std::system_error(
            asio::error::operation_aborted, "coproc: the event loop was destroyed before the operation completed")));
        std::lock_guard lock{registry_->mutex};
        registry_->unlink(this);
    }

    // Before anything can complete the operation: connects the slot.
    void install_cancellation(asio::cancellation_slot slot) {
        if (slot.is_connected()) slot.template emplace<cancel_request>(cancel_request{weak_from_this()});
    }

    void set_task(future<value_type> task) { task_.emplace(std::move(task)); }
    [[nodiscard]] std::stop_token stop_token() const noexcept { return stop_.get_token(); }

    // Registers the completion with the task (which may call it at once).
    void watch_task() {
        task_->add_done_callback([self = std::static_pointer_cast<operation>(shared_from_this())](const auto&) {
            self->finish_from_task();
        });
        ticket_.nudge();
    }
    void nudge() const noexcept { ticket_.nudge(); }

    // Posts the handler with this outcome, unless it was already posted or
    // destroyed. Any thread.
    void complete(std::exception_ptr error, Values... values) noexcept {
        std::unique_lock lock{registry_->mutex};
        if (!handler_) return;
        registry_->unlink(this);
        auto box = std::move(handler_);
        try {
            asio::post(executor_, completion<Handler, Values...>{std::move(box->handler), std::move(error),
                                                                 std::tuple<Values...>{std::move(values)...}});
        } catch (...) {
            // Out of memory: the handler is destroyed uncalled.
        }
        // After the post, which counts as work on the executor itself.
        work_.reset();
        lock.unlock();
        box.reset();
        ticket_.reset();
    }

    void fail(std::exception_ptr error) noexcept { complete(std::move(error), Values{}...); }

    void request_cancel(asio::cancellation_type type) noexcept override {
        using ct = asio::cancellation_type;
        const bool terminal = (type & ct::terminal) != ct::none;
        const bool stop_it = terminal || (type & ct::partial) != ct::none;
        const bool before_start = (type & ct::total) != ct::none;
        try {
            if (target_ == cancel_target::task) {
                if (!task_ || task_->done()) return;
                if (terminal || (before_start && !task_->running())) {
                    task_->cancel(); // a running task: stop token, then a kill after cancel_grace
                } else if (stop_it) {
                    task_->request_stop(); // partial: the stop token only, never a kill
                }
            } else if (stop_it) {
                stop_.request_stop();
            }
            ticket_.nudge();
        } catch (...) {
            // Out of memory while queueing the cancellation: the task runs on.
        }
    }

private:
    void finish_from_task() noexcept {
        std::exception_ptr error;
        if constexpr (std::is_void_v<value_type>) {
            try {
                std::move(*task_).get(); // final: does not block
            } catch (...) {
                error = asio_error_of(std::current_exception());
            }
            complete(std::move(error));
        } else {
            std::optional<value_type> value;
            try {
                value.emplace(std::move(*task_).get());
            } catch (...) {
                error = asio_error_of(std::current_exception());
            }
            if (value) complete(nullptr, std::move(*value));
            else fail(std::move(error));
        }
    }

    std::unique_ptr<handler_box_base> abandon_locked() noexcept override {
        work_.reset();
        return std::move(handler_);
    }

    void after_abandon() noexcept override {
        request_cancel(asio::cancellation_type::terminal);
        ticket_.reset();
    }

    executor_type executor_;
    std::shared_ptr<operation_registry> registry_;
    driver_ticket ticket_;
    cancel_target target_;
    std::optional<asio::executor_work_guard<executor_type>> work_; // registry_->mutex
    std::unique_ptr<handler_box<Handler>> handler_;                // registry_->mutex
    std::optional<future<value_type>> task_;
    std::stop_source stop_;
};

template <class Handler, class R>
using operation_for = std::conditional_t<std::is_void_v<R>, operation<std::decay_t<Handler>>,
                                         operation<std::decay_t<Handler>, std::conditional_t<std::is_void_v<R>, int, R>>>;

inline event_loop& loop_of(process_pool& pool) { return pool_loop(*pool_core_of(pool)); }

// Completes `op` with what `body` yields; runs on the loop.
template <class Operation, class R>
task<void> complete_from(task<R> body, std::shared_ptr<Operation> op) {
    std::exception_ptr error;
    if constexpr (std::is_void_v<R>) {
        try {
            co_await std::move(body);
        } catch (...) {
            error = asio_error_of(std::current_exception());
        }
        op->complete(std::move(error));
    } else {
        std::optional<R> value;
        try {
            value.emplace(co_await std::move(body));
        } catch (...) {
            error = asio_error_of(std::current_exception());
        }
        if (value) op->complete(nullptr, std::move(*value));
        else op->fail(std::move(error));
    }
}

// Spawns `body` on `loop` from any thread, under `token`.
template <class Operation>
void start_on_loop(event_loop& loop, task<void> body, const std::shared_ptr<Operation>& op) {
    try {
        auto holder = std::make_shared<task<void>>(std::move(body));
        loop.post([&loop, holder, token = op->stop_token()] { loop.spawn(std::move(*holder), token); });
        op->nudge();
    } catch (...) {
        op->fail(std::current_exception());
    }
}

template <auto F>
struct initiate_submit {
    process_pool* pool;

    template <class Handler, class... Args>
    void operator()(Handler&& handler, Args&&... args) const {
        using R = typename remote<F>::result;
        asio::cancellation_slot slot = asio::get_associated_cancellation_slot(handler);
        auto op = std::make_shared<operation_for<Handler, R>>(std::move(handler), loop_of(*pool), cancel_target::task);
        try {
            op->set_task(pool->template submit<F>(std::forward<Args>(args)...));
        } catch (...) {
            op->fail(std::current_exception());
            return;
        }
        op->install_cancellation(slot);
        op->watch_task();
    }
};

template <auto F>
struct initiate_map {
    process_pool* pool;

    template <class Handler, class Range>
    void operator()(Handler&& handler, Range&& inputs, map_options options) const {
        using R = std::vector<typename remote<F>::result>;
        asio::cancellation_slot slot = asio::get_associated_cancellation_slot(handler);
        event_loop& loop = loop_of(*pool);
        auto op = std::make_shared<operation_for<Handler, R>>(std::move(handler), loop, cancel_target::coroutine);
        std::optional<task<R>> body;
        try {
            body.emplace(pool->template map<F>(std::move(inputs), options)); // submits now
        } catch (...) {
            op->fail(asio_error_of(std::current_exception()));
            return;
        }
        op->install_cancellation(slot);
        start_on_loop(loop, complete_from(std::move(*body), op), op);
    }
};

struct initiate_shutdown {
    process_pool* pool;

    template <class Handler>
    void operator()(Handler&& handler, shutdown_options options) const {
        asio::cancellation_slot slot = asio::get_associated_cancellation_slot(handler);
        event_loop& loop = loop_of(*pool);
        auto op = std::make_shared<operation_for<Handler, void>>(std::move(handler), loop, cancel_target::coroutine);
        op->install_cancellation(slot);
        start_on_loop(loop, complete_from(pool->shutdown(options), op), op);
    }
};

template <auto F, class Token, class... Args>
auto submit_with_token(process_pool& pool, Token&& token, Args&&... args) {
    using R = typename remote<F>::result;
    static_assert(std::is_void_v<R> || std::is_default_constructible_v<R>,
                  "coproc::async_submit<F>: F's result type must be default-constructible (the completion signature "
                  "void(std::exception_ptr, R) passes R{} with a failure)");
    return asio::async_initiate<Token, submit_signature<R>>(initiate_submit<F>{&pool}, token,
                                                            std::forward<Args>(args)...);
}

template <auto F, class Tuple, std::size_t... I>
auto submit_split(process_pool& pool, Tuple&& all, std::index_sequence<I...>) {
    constexpr std::size_t last = std::tuple_size_v<std::remove_reference_t<Tuple>> - 1;
    return submit_with_token<F>(pool, std::get<last>(std::move(all)), std::get<I>(std::move(all))...);
}

} // namespace detail::asio_bridge

template <auto F, class... ArgsAndToken>
auto async_submit(process_pool& pool, ArgsAndToken&&... args_and_token) {
    static_assert(sizeof...(ArgsAndToken) >= 1,
                  "coproc::async_submit<F>(pool, args..., token): the last argument is the completion token "
                  "(asio::use_awaitable, a callback, ...)");
    return detail::asio_bridge::submit_split<F>(pool, std::forward_as_tuple(std::forward<ArgsAndToken>(args_and_token)...),
                                                std::make_index_sequence<sizeof...(ArgsAndToken) - 1>{});
}

template <auto F, std::ranges::input_range Range, class CompletionToken>
auto async_map(process_pool& pool, Range&& inputs, map_options options, CompletionToken&& token) {
    using R = std::vector<typename detail::remote<F>::result>;
    return asio::async_initiate<CompletionToken, void(std::exception_ptr, R)>(
        detail::asio_bridge::initiate_map<F>{&pool}, token, std::decay_t<Range>(std::forward<Range>(inputs)), options);
}

template <class CompletionToken>
auto async_shutdown(process_pool& pool, shutdown_options options, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::exception_ptr)>(detail::asio_bridge::initiate_shutdown{&pool},
                                                                           token, options);
}

inline void asio_driver::hold::release() noexcept {
    if (auto demand = std::move(demand_)) demand->release();
}

namespace detail::asio_bridge {
inline event_loop& drivable(event_loop& loop) {
    if (loop.backend().kind != event_loop_backend::epoll) {
        throw std::logic_error("coproc::asio_driver needs a loop on the epoll backend: create it as "
                               "coproc::event_loop loop{coproc::driven_loop_options} (io_uring cannot wake another "
                               "poller reliably; see event_loop::poll_ready)");
    }
    return loop;
}
} // namespace detail::asio_bridge

inline asio_driver::asio_driver(asio::io_context& io, event_loop& loop)
    : core_(std::make_shared<detail::asio_bridge::driver_core>(io, detail::asio_bridge::drivable(loop))) {
    auto registry = asio::use_service<detail::asio_bridge::registry_service>(io).registry();
    core_->start();
    registry->add_driver(core_);
}

inline asio_driver::~asio_driver() { core_->close(); }

inline asio_driver::hold asio_driver::keep_driving() {
    core_->demand()->acquire();
    return hold{core_->demand()};
}

} // namespace coproc

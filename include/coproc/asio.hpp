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
template <class T>
struct initiate_next;
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

// The next item of a stream (process_pool::submit_stream), as co_await
// items.next() does: the item, or std::nullopt once the task returned and
// every item was taken; or why the task ended otherwise (its exception,
// worker_died, timeout_error), once every item received before was taken.
// `items` must belong to `pool`, outlive the operation and not be used
// otherwise until the handler runs; one async_next at a time per stream.
//
// @par Completion Signature
// void(std::exception_ptr, std::optional<T>)
//
// @par Per-Operation Cancellation
// terminal and partial: the stream is cancelled, as a stop of a coroutine
// awaiting next() cancels it (its task's stop token, then a kill after
// cancel_grace), and the handler gets operation_aborted. total: ignored.
//
// Thread Safety: callable from any thread.
template <class T, class CompletionToken>
auto async_next(process_pool& pool, stream<T>& items, CompletionToken&& token);

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
// while an async_submit, async_map, async_next or async_shutdown on a pool
// of this loop is outstanding, or while a hold from keep_driving() exists. So
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
// Implementation. Not API: the bridge's machinery (coproc/detail/asio_bridge.hpp).

#include <coproc/detail/asio_bridge.hpp> // inside namespace coproc, on purpose

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

template <class T, class CompletionToken>
auto async_next(process_pool& pool, stream<T>& items, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::exception_ptr, std::optional<T>)>(
        detail::asio_bridge::initiate_next<T>{&pool, &items}, token);
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

// coproc/future.hpp - coproc::future<T>, the result of process_pool::submit.
//
//     coproc::future<double> f = pool.submit<simulate>(1, 0.5);
//     double value = co_await std::move(f);       // on the pool's event loop
//     double again = other.get(std::chrono::seconds{5});  // from any other thread
//
//     auto ready = coproc::make_ready_future(42);  // final at once, no pool
//     auto failed = coproc::make_exceptional_future<int>(std::make_exception_ptr(std::runtime_error{"no"}));
//
// A future is move-only; it shares the task's state with the pool. Dropping
// a future does not cancel its task (as in Python); cancel() does.
// Awaiting or get() yields the value (moved out from an rvalue future,
// copied from an lvalue) or rethrows: the task's own exception (the same
// standard type, or coproc::remote_error), coproc::worker_died,
// coproc::broken_process_pool, or coproc::cancelled_error.
//
// Thread Safety: distinct futures are independent. On one future, cancel(),
// done(), cancelled(), running(), exception(), id(), add_done_callback() and
// get() may be called from any thread at once; result() too once done() is
// true. Awaiting, moving, assigning and destroying a future must not overlap
// other calls on the same future object, and a value moved out (co_await
// std::move(f), std::move(f).get()) must not be read by result() at the same
// time.
#pragma once

#include <coproc/detail/promise_base.hpp>
#include <coproc/detail/work_item.hpp>
#include <coproc/error.hpp>

#include <chrono>
#include <coroutine>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stop_token>
#include <stdexcept>
#include <type_traits>
#include <utility>

namespace coproc {

template <class T>
class future;

namespace detail {
// The state behind a future, for coproc's own templates (map_stream reads
// the results a failed chunk sent before its failing input). Not API.
struct future_access {
    template <class T>
    static typed_work_item<T>& item(const future<T>& pending) {
        return *pending.item_;
    }
};
} // namespace detail

template <class T>
class [[nodiscard]] future {
public:
    using value_type = T;
    // What result() returns: const T&, or void for future<void>.
    using const_reference = std::conditional_t<std::is_void_v<T>, void, std::add_lvalue_reference_t<const T>>;

    // An empty future: valid() is false, and every other member throws
    // std::logic_error.
    future() noexcept = default;
    // Takes over one reference to `item` (made by process_pool::submit or
    // make_ready_future; not for users).
    explicit future(detail::typed_work_item<T>* item) noexcept : item_(item) {}
    future(future&& other) noexcept : item_(std::exchange(other.item_, nullptr)) {}
    future& operator=(future&& other) noexcept {
        if (this != &other) {
            reset();
            item_ = std::exchange(other.item_, nullptr);
        }
        return *this;
    }
    future(const future&) = delete;
    future& operator=(const future&) = delete;
    // Lets go of the task's state; never cancels the task.
    ~future() { reset(); }

    // True when the future refers to a task (it was not moved from).
    [[nodiscard]] bool valid() const noexcept { return item_ != nullptr; }

    // The task's id in its pool (ids start at 1); 0 for a future made by
    // make_ready_future or make_exceptional_future.
    [[nodiscard]] std::uint64_t id() const { return checked().id; }

    // Cancels the task, whatever its state; returns false only when it had
    // already ended (its result stays). Thread-safe.
    //  - pending: removed from the queue; it never runs;
    //  - dispatched (sent, not started): the worker drops it unrun;
    //  - running: the worker stops the task's std::stop_token; a task that
    //    has not returned after process_pool_options::cancel_grace has its
    //    worker killed and replaced. With `force`, the worker is killed at
    //    once.
    // The future ends cancelled at once (awaiting it throws
    // cancelled_error); a result that arrives later is discarded. Done
    // callbacks and an awaiting coroutine are then resumed on the pool's
    // loop thread. A future made ready (make_ready_future) is final from the
    // start: cancel() returns false. Throws std::bad_alloc when the request
    // to the worker cannot be queued.
    bool cancel(bool force = false) { return detail::cancel_work_item(checked(), force); }

    // Cancels the task as cancel() does, except that a running task is only
    // asked to stop, through its std::stop_token, and its worker is never
    // killed for it: a task that ignores the token keeps its worker busy
    // until it returns (its result is then discarded). What Asio's
    // cancellation_type::partial asks for. Thread-safe.
    bool request_stop() { return detail::cancel_work_item(checked(), false, false); }

    // True once the task ended cancelled (by cancel(), by its awaiter's stop
    // token, by shutdown with cancel_futures, or by the pool's destruction).
    [[nodiscard]] bool cancelled() const { return checked().state() == detail::work_state::cancelled; }
    // True while a worker runs the task: only after the worker acknowledged
    // the start (START frame), never for a task merely sent to it.
    [[nodiscard]] bool running() const { return checked().state() == detail::work_state::running; }
    // True once the task is final: finished, failed or cancelled.
    [[nodiscard]] bool done() const { return detail::is_final(checked().state()); }

    // The exception the task ended with (cancelled_error when cancelled), or
    // null when it has not ended or ended with a value. Does not block.
    [[nodiscard]] std::exception_ptr exception() const {
        const auto& item = checked();
        return detail::is_final(item.state()) ? item.error : nullptr;
    }

    // The outcome of a final future, read in place: a reference to its value
    // (nothing for future<void>), or rethrows the exception it ended with
    // (cancelled_error when cancelled). Never blocks and never moves the
    // value out, so a done callback, which receives a const future, reads
    // the value with it. Throws std::logic_error while the task has not
    // ended (wait for it with co_await or get() first). After the value was
    // moved out (co_await std::move(f), std::move(f).get()), it refers to
    // the moved-from value. The reference lives as long as the task's state
    // (this future, or a done callback's).
    const_reference result() const {
        const auto& item = checked();
        if (!detail::is_final(item.state())) {
            throw std::logic_error("coproc: future::result() called before the task ended; co_await the future, "
                                   "call get(), or read it in a done callback");
        }
        if (item.error) std::rethrow_exception(item.error);
        if constexpr (std::is_void_v<T>) {
            return;
        } else {
            return *item.value;
        }
    }

    // Calls `callback(future)` once the task is final, with a future that
    // shares this one's state (read the outcome with result() or
    // exception()):
    //  - while the task has not ended: later, on the pool's loop thread
    //    (posted to the loop, never run inside the pool's own bookkeeping);
    //  - once it has (and always for make_ready_future's futures): at once,
    //    on the calling thread, before add_done_callback returns.
    // An exception escaping the callback never reaches the caller: it goes
    // to the unhandled-exception handler of the event loop the calling
    // thread runs (event_loop::set_unhandled_exception_handler, reached
    // through a function posted to that loop), or, on a thread that runs no
    // loop, is printed to stderr ("coproc: exception calling a done callback
    // of ..."); then the other callbacks run as usual, as in Python.
    // Callbacks added before the end run in the order added. Throws
    // std::bad_alloc only (the callback is then never called).
    void add_done_callback(std::function<void(const future&)> callback) {
        auto* item = &checked();
        // The callback owns a future of its own, so the state lives as long
        // as the callback, even one that is destroyed without being called.
        // Made before the reference is taken, so a failed allocation leaks
        // nothing.
        auto view = std::make_shared<future>();
        item->retain();
        view->item_ = item;
        detail::add_work_item_callback(*item, done_callback{std::move(view), std::move(callback)});
    }

    // The last value the task reported with coproc::report_progress that has
    // reached the parent, or nothing before the first. Once the future has
    // finished or failed, it is the last value the task reported (the worker
    // sends it before the answer); a report that arrives after cancel() is
    // dropped. Does not block. Thread-safe.
    [[nodiscard]] std::optional<double> latest_progress() const { return detail::latest_progress_of(checked()); }

    // Calls `callback(value)` for each progress report of the task that
    // reaches the parent from now on, on the pool's loop thread, in the order
    // reported: posted to the loop, never run inside the pool's own
    // bookkeeping. The worker throttles the reports
    // (process_pool_options::progress_interval), so a chatty task does not
    // flood the loop, and sends the last one before its answer: every report
    // that reached the parent before the task ended is called before the
    // future's done callbacks run, and before a coroutine suspended awaiting
    // the future resumes. A coroutine that awaits the future only once it
    // has ended (no suspension) may go on before the last calls ran: what
    // the callback refers to should outlive the loop's run, or be held by
    // the callback. Nothing is called for reports that arrive
    // after cancel(), nor for a future that is already final, nor for one
    // made ready. A second call replaces the callback. An exception escaping
    // it goes to the loop's unhandled-exception handler. Thread-safe; throws
    // std::bad_alloc only.
    void on_progress(std::function<void(double)> callback) {
        detail::set_work_item_progress_callback(checked(), std::move(callback));
    }

    // Blocks until the task is final and yields its value or rethrows. Call
    // it from a thread that is not the pool's loop thread (there it would
    // never return, and throws std::logic_error instead). With a timeout,
    // throws coproc::timeout_error when the task is not final in time. A
    // future that is already final (make_ready_future's) never blocks, on
    // any thread.
    T get() & { return wait_then_take<false>(std::chrono::nanoseconds{-1}); }
    T get() && { return wait_then_take<true>(std::chrono::nanoseconds{-1}); }
    template <class Rep, class Period>
    T get(std::chrono::duration<Rep, Period> timeout) & {
        return wait_then_take<false>(std::chrono::duration_cast<std::chrono::nanoseconds>(timeout));
    }
    template <class Rep, class Period>
    T get(std::chrono::duration<Rep, Period> timeout) && {
        return wait_then_take<true>(std::chrono::duration_cast<std::chrono::nanoseconds>(timeout));
    }

    // Awaiting suspends until the task is final, resuming on the pool's
    // event loop thread; await it from a coroutine that loop runs. A final
    // future (make_ready_future's) does not suspend. A stop of the awaiting
    // coroutine's token (coproc::with_timeout, when_any, ...) cancels the
    // task, as cancel() does. Yields the value or rethrows as get() does.
    // One coroutine at a time may await a future (a second throws
    // std::logic_error).
    auto operator co_await() & { return awaiter<false>{&checked()}; }
    auto operator co_await() && { return awaiter<true>{&checked()}; }

private:
    friend struct detail::future_access;

    // What add_done_callback hands to the task's state: runs the user's
    // callback and reports what escapes it instead of throwing.
    struct done_callback {
        std::shared_ptr<const future> view;
        std::function<void(const future&)> callback;
        void operator()() const noexcept {
            try {
                callback(*view);
            } catch (...) {
                detail::report_callback_error(*view->item_, std::current_exception());
            }
        }
    };

    // Cancels the task when the awaiter's stop token is stopped.
    struct cancel_task {
        detail::typed_work_item<T>* item;
        void operator()() const noexcept {
            try {
                detail::cancel_work_item(*item);
            } catch (...) {
                // Out of memory while queueing the cancellation: the task runs on.
            }
        }
    };

    template <bool Move>
    struct awaiter {
        detail::typed_work_item<T>* item;
        std::optional<std::stop_callback<cancel_task>> on_stop{};
        std::coroutine_handle<> registered{}; // set while the item holds our handle

        awaiter(detail::typed_work_item<T>* work) noexcept : item(work) {}
        awaiter(awaiter&& other) noexcept : item(other.item) {}
        // A coroutine destroyed while suspended here (its loop shut down)
        // must not stay registered with a task that may still finish.
        ~awaiter() {
            on_stop.reset();
            if (registered) detail::forget_awaiter(*item, registered);
        }

        bool await_ready() const noexcept { return detail::is_final(item->state()); }
        template <class P>
        bool await_suspend(std::coroutine_handle<P> awaiting) {
            std::stop_token token = detail::stop_token_of(awaiting);
            if (token.stop_requested()) {
                detail::cancel_work_item(*item);
                return false;
            }
            if (!detail::await_work_item(*item, awaiting)) return false;
            registered = awaiting;
            // Registered after the awaiter: a stop requested meanwhile runs
            // the callback at once, which cancels and so resumes it.
            if (token.stop_possible()) on_stop.emplace(std::move(token), cancel_task{item});
            return true;
        }
        T await_resume() {
            on_stop.reset();
            registered = {};
            return take<Move>(*item);
        }
    };

    template <bool Move>
    static T take(detail::typed_work_item<T>& item) {
        if (item.error) std::rethrow_exception(item.error);
        if constexpr (!std::is_void_v<T>) {
            if constexpr (Move) {
                return std::move(*item.value);
            } else {
                return *item.value;
            }
        }
    }

    template <bool Move>
    T wait_then_take(std::chrono::nanoseconds timeout) {
        auto& item = checked();
        if (!detail::wait_work_item(item, timeout)) {
            throw timeout_error("coproc: future::get timed out before the task ended");
        }
        return take<Move>(item);
    }

    detail::typed_work_item<T>& checked() const {
        if (item_ == nullptr) throw std::logic_error("coproc: use of an empty (moved-from) future");
        return *item_;
    }

    void reset() noexcept {
        if (item_ != nullptr) std::exchange(item_, nullptr)->release();
    }

    detail::typed_work_item<T>* item_ = nullptr;
};

// --- futures made final without a pool: for tests, and for adapters that
// hand a value they already have to code that expects a future (Python:
// Future() with set_result / set_exception).
//
// The future is final from the start: co_await does not suspend (on any
// thread, in any coroutine), get() never blocks (not even on a loop thread),
// done() is true, cancel() returns false, running() and cancelled() are
// false, id() is 0, add_done_callback calls its callback at once, and wait
// and as_completed count it as final at once. It belongs to no pool and no
// loop, so it may outlive both. T must be a type a pool task may return
// (serializable with cereal).

// A future that finished with `value` (copied or moved in). Throws what
// copying or moving the value throws, or std::bad_alloc.
template <class T>
future<std::decay_t<T>> make_ready_future(T&& value) {
    using value_type = std::decay_t<T>;
    auto item = std::make_unique<detail::typed_work_item<value_type>>();
    item->value.emplace(std::forward<T>(value));
    item->set_state(detail::work_state::finished); // release: publishes the value
    return future<value_type>{item.release()};
}

// A future<void> that finished. Throws std::bad_alloc only.
inline future<void> make_ready_future() {
    auto item = std::make_unique<detail::typed_work_item<void>>();
    item->set_state(detail::work_state::finished);
    return future<void>{item.release()};
}

// A future<T> that failed with `error`: awaiting it, get() and result()
// rethrow it, exception() returns it. Its state is failed, not cancelled,
// whatever the exception's type (cancelled() is false even for a
// cancelled_error, as for a pool task that threw one itself). Throws
// std::invalid_argument when `error` is null, std::bad_alloc.
template <class T>
future<T> make_exceptional_future(std::exception_ptr error) {
    if (!error) {
        throw std::invalid_argument("coproc::make_exceptional_future: the exception_ptr is null; pass "
                                    "std::make_exception_ptr(e) or std::current_exception(), or use "
                                    "make_ready_future for a future that succeeded");
    }
    auto item = std::make_unique<detail::typed_work_item<T>>();
    item->error = std::move(error);
    item->set_state(detail::work_state::failed); // release: publishes the error
    return future<T>{item.release()};
}

} // namespace coproc

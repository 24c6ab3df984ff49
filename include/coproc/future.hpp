// coproc/future.hpp - coproc::future<T>, the result of process_pool::submit.
//
//     coproc::future<double> f = pool.submit<simulate>(1, 0.5);
//     double value = co_await std::move(f);       // on the pool's event loop
//     double again = other.get(std::chrono::seconds{5});  // from any other thread
//
// A future is move-only; it shares the task's state with the pool. Dropping
// a future does not cancel its task (as in Python); cancel() does.
// Awaiting or get() yields the value (moved out from an rvalue future,
// copied from an lvalue) or rethrows: the task's own exception (the same
// standard type, or coproc::remote_error), coproc::worker_died,
// coproc::broken_process_pool, or coproc::cancelled_error.
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
class [[nodiscard]] future {
public:
    using value_type = T;

    future() noexcept = default;
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
    ~future() { reset(); }

    // True when the future refers to a task (it was not moved from).
    [[nodiscard]] bool valid() const noexcept { return item_ != nullptr; }

    // The task's id in its pool.
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
    // cancelled_error); a result that arrives later is discarded.
    bool cancel(bool force = false) { return detail::cancel_work_item(checked(), force); }

    // True once the task ended cancelled.
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

    // Calls `callback(*this-like future)` on the pool's loop thread once the
    // task is final (posted to the loop, never run inside the pool's own
    // bookkeeping), or at once, on the calling thread, if it already is.
    void add_done_callback(std::function<void(const future&)> callback) {
        auto* item = &checked();
        item->retain();
        // The callback owns a future of its own, so the state lives as long
        // as the callback, even one that is destroyed without being called.
        auto view = std::make_shared<const future>(item);
        detail::add_work_item_callback(*item, [view, callback = std::move(callback)] { callback(*view); });
    }

    // Blocks until the task is final and yields its value or rethrows. Call
    // it from a thread that is not the pool's loop thread (there it would
    // never return, and throws std::logic_error instead). With a timeout,
    // throws coproc::timeout_error when the task is not final in time.
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
    // event loop thread; await it from a coroutine that loop runs. A stop of
    // the awaiting coroutine's token (coproc::with_timeout, when_any, ...)
    // cancels the task, as cancel() does.
    // One coroutine at a time may await a future (a second throws
    // std::logic_error).
    auto operator co_await() & { return awaiter<false>{&checked()}; }
    auto operator co_await() && { return awaiter<true>{&checked()}; }

private:
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

} // namespace coproc

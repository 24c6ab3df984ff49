// coproc/wait.hpp - waiting on many futures: as_completed and wait, the
// counterparts of concurrent.futures.as_completed and concurrent.futures.wait.
//
//     auto order = coproc::as_completed(futures);            // async_generator<std::size_t>
//     while (auto index = co_await order.next()) use(co_await std::move(futures[*index]));
//
//     auto [done, not_done] = co_await coproc::wait(futures, coproc::return_when::first_completed);
//     auto [ok, late] = co_await coproc::wait(futures, coproc::return_when::all_completed, 2s);
//
// Both refer to the futures by position in the vector, which must outlive
// the generator or the wait. Await them on the loop thread of the pool the
// futures belong to (futures made by make_ready_future belong to none and
// may be waited on from any loop). Both honour the awaiter's stop token:
// a stop ends them with coproc::cancelled_error. Both take an optional
// timeout of their own, which, unlike with_timeout, keeps what is known
// when it passes: wait returns the futures still unfinished in not_done,
// as_completed says how many are left.
//
// Thread Safety: like a task: create, await and destroy them on one thread
// (the futures they watch may be cancelled or completed by any thread).
#pragma once

#include <coproc/async_generator.hpp>
#include <coproc/cancellation.hpp>
#include <coproc/error.hpp>
#include <coproc/event_loop.hpp>
#include <coproc/future.hpp>
#include <coproc/task.hpp>

#include <coproc/when_any.hpp>
#include <coproc/with_timeout.hpp>

#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstddef>
#include <deque>
#include <memory>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <vector>

namespace coproc {

// When wait() completes (Python: FIRST_COMPLETED, FIRST_EXCEPTION,
// ALL_COMPLETED).
enum class return_when {
    first_completed, // as soon as any future is final
    // as soon as any future fails (ends with an exception), or all are
    // final. A cancelled future is final but has not failed: it does not
    // end the wait, whether it was cancelled before the call or during it.
    first_exception,
    all_completed, // when every future is final
};

// What wait() yields. Both lists are in ascending order.
struct wait_result {
    std::vector<std::size_t> done;     // positions of the futures final when the wait ended
    std::vector<std::size_t> not_done; // positions of the others; non-empty after a timeout
};

namespace detail {

// Positions of futures in the order they became final. Filled by done
// callbacks on the loop thread; one consumer awaits it.
class completion_queue {
public:
    void push(std::size_t index) {
        ready_.push_back(index);
        wake();
    }

    [[nodiscard]] bool has_ready() const noexcept { return !ready_.empty(); }

    [[nodiscard]] std::size_t pop() {
        const std::size_t index = ready_.front();
        ready_.pop_front();
        return index;
    }

    // Suspends until an index is ready; throws cancelled_error when the
    // awaiter's token is stopped first.
    class awaiter {
    public:
        explicit awaiter(completion_queue* queue) noexcept : queue_(queue) {}
        bool await_ready() const noexcept { return !queue_->ready_.empty(); }
        template <class P>
        bool await_suspend(std::coroutine_handle<P> consumer) {
            std::stop_token token = stop_token_of(consumer);
            if (token.stop_requested()) return false;
            queue_->loop_ = event_loop::current();
            queue_->consumer_ = consumer;
            queue_->claimed_.store(false, std::memory_order_relaxed);
            if (token.stop_possible()) stop_.emplace(std::move(token), on_stop{queue_});
            return true;
        }
        void await_resume() {
            stop_.reset();
            if (queue_->ready_.empty()) throw cancelled_error("coproc: waiting for futures was cancelled");
        }

    private:
        struct on_stop {
            completion_queue* queue;
            void operator()() const noexcept { queue->wake(); }
        };
        completion_queue* queue_;
        std::optional<std::stop_callback<on_stop>> stop_;
    };

    awaiter wait() noexcept { return awaiter{this}; }

private:
    // Resumes the consumer once, whoever comes first: a completion (loop
    // thread) or a stop request (any thread). acq_rel on the claim orders
    // the consumer's registration before the resumption.
    void wake() noexcept {
        if (!consumer_ || claimed_.exchange(true, std::memory_order_acq_rel)) return;
        auto consumer = std::exchange(consumer_, {});
        if (loop_ != nullptr) {
            schedule_operation{*loop_}.await_suspend(consumer);
        } else {
            consumer.resume();
        }
    }

    std::deque<std::size_t> ready_;
    std::coroutine_handle<> consumer_{};
    event_loop* loop_ = nullptr;
    std::atomic<bool> claimed_{true};
};

template <class T>
std::shared_ptr<completion_queue> watch_completions(std::vector<future<T>>& futures) {
    auto queue = std::make_shared<completion_queue>();
    for (std::size_t i = 0; i < futures.size(); ++i) {
        futures[i].add_done_callback([queue, i](const future<T>&) { queue->push(i); });
    }
    return queue;
}

// How far a wait has come: how many futures it has not yet seen final, and
// whether its return_when condition holds.
struct wait_progress {
    return_when when;
    std::size_t unseen;
    bool met = unseen == 0;
};

// Counts one future seen final.
template <class T>
void note_final(wait_progress& progress, const future<T>& final) {
    --progress.unseen;
    if (progress.when == return_when::first_completed) progress.met = true;
    // As in Python's wait: a cancelled future carries cancelled_error, but
    // it was cancelled, it did not fail.
    if (progress.when == return_when::first_exception && !final.cancelled() && final.exception() != nullptr) {
        progress.met = true;
    }
    if (progress.unseen == 0) progress.met = true;
}

// Counts the futures already known final, without suspending, until the
// condition holds. The futures final before the wait began come first, so
// one that had already failed ends a first_exception wait at once.
template <class T>
void note_ready(completion_queue& queue, std::vector<future<T>>& futures, wait_progress& progress) {
    while (!progress.met && queue.has_ready()) note_final(progress, futures[queue.pop()]);
}

// Counts futures as they become final until the condition holds. Throws
// cancelled_error when its stop token is stopped first.
template <class T>
task<void> note_until_met(std::shared_ptr<completion_queue> queue, std::vector<future<T>>* futures,
                          wait_progress* progress) {
    while (!progress->met) {
        co_await queue->wait();
        note_ready(*queue, *futures, *progress);
    }
}

// Completes once a future's position is ready in `queue`. Throws
// cancelled_error when its stop token is stopped first.
inline task<void> next_completion(std::shared_ptr<completion_queue> queue) { co_await queue->wait(); }

template <class T>
wait_result partition(const std::vector<future<T>>& futures) {
    wait_result result;
    for (std::size_t i = 0; i < futures.size(); ++i) (futures[i].done() ? result.done : result.not_done).push_back(i);
    return result;
}

// now + timeout, saturated so that a huge timeout cannot overflow.
inline std::chrono::steady_clock::time_point deadline_after(std::chrono::steady_clock::duration timeout) {
    const auto now = std::chrono::steady_clock::now();
    if (timeout > std::chrono::steady_clock::time_point::max() - now) return std::chrono::steady_clock::time_point::max();
    return now + timeout;
}

// The loop of the calling thread, whose timer bounds a wait.
inline event_loop& timer_loop(const char* what) {
    event_loop* loop = event_loop::current();
    if (loop == nullptr) {
        throw std::logic_error(std::string(what) + " with a timeout awaited outside an event loop's thread; the timer "
                                                   "runs on the loop: await it from a coroutine the loop runs");
    }
    return *loop;
}

inline std::string describe_timeout(std::chrono::steady_clock::duration timeout) {
    const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(timeout).count();
    if (micros % 1000 == 0) return std::to_string(micros / 1000) + " ms";
    return std::to_string(micros) + " us";
}

// The waits themselves, behind the public overloads; `timeout` empty: none.

template <class T>
task<wait_result> wait_for_futures(std::vector<future<T>>* futures, return_when when,
                                   std::optional<std::chrono::steady_clock::duration> timeout) {
    // The deadline counts from the first await, as with_timeout's does.
    const auto deadline = timeout ? deadline_after(*timeout) : std::chrono::steady_clock::time_point::max();
    auto queue = watch_completions(*futures);
    wait_progress progress{when, futures->size()};
    note_ready(*queue, *futures, progress);
    if (progress.met) co_return partition(*futures);
    if (!timeout) {
        co_await note_until_met(std::move(queue), futures, &progress);
        co_return partition(*futures);
    }
    if (std::chrono::steady_clock::now() < deadline) {
        // The timer, when it wins, stops note_until_met, and when_any awaits
        // it; a stop of our own token stops both, and when_any rethrows
        // cancelled_error.
        event_loop& loop = timer_loop("coproc::wait");
        co_await when_any(note_until_met(queue, futures, &progress), sleep_until_task(&loop, deadline));
    }
    const std::stop_token token = co_await coproc::get_stop_token();
    if (!progress.met && token.stop_requested()) throw cancelled_error("coproc: waiting for futures was cancelled");
    co_return partition(*futures);
}

template <class T>
async_generator<std::size_t> yield_as_completed(std::vector<future<T>>* futures,
                                                std::optional<std::chrono::steady_clock::duration> timeout) {
    // The deadline counts from the first next(), as in Python, whose
    // as_completed is a generator too.
    const auto deadline = timeout ? deadline_after(*timeout) : std::chrono::steady_clock::time_point::max();
    auto queue = watch_completions(*futures);
    for (std::size_t delivered = 0; delivered < futures->size(); ++delivered) {
        if (!queue->has_ready() && !timeout) co_await queue->wait();
        if (!queue->has_ready()) {
            if (std::chrono::steady_clock::now() < deadline) {
                event_loop& loop = timer_loop("coproc::as_completed");
                co_await when_any(next_completion(queue), sleep_until_task(&loop, deadline));
            }
            // Still nothing: the timer won (a future final meanwhile would
            // be yielded first), or a stop came at the same moment.
            if (!queue->has_ready()) {
                const std::stop_token token = co_await coproc::get_stop_token();
                if (token.stop_requested()) throw cancelled_error("coproc: waiting for futures was cancelled");
                throw timeout_error("coproc::as_completed: " + std::to_string(futures->size() - delivered) + " of " +
                                    std::to_string(futures->size()) + " futures unfinished when its timeout of " +
                                    describe_timeout(*timeout) +
                                    " passed; they run on: cancel them, or wait for them again");
            }
        }
        co_yield queue->pop();
    }
}

} // namespace detail

// Yields the position of each future as it becomes final, each exactly
// once: first the futures already final, then the others in the order they
// end. The generator's body runs inside next(), which resumes on the
// loop thread of the futures' pool. next() throws cancelled_error when the
// awaiter's stop token is stopped; then the generator has ended. Futures
// the vector gains after the first next() are not watched.
template <class T>
async_generator<std::size_t> as_completed(std::vector<future<T>>& futures) {
    return detail::yield_as_completed(&futures, std::nullopt);
}

// The same, with a deadline `timeout` after the first next() (Python's
// as_completed(fs, timeout)): a next() that would have to wait past it
// throws coproc::timeout_error, whose what() says how many futures are
// unfinished ("coproc::as_completed: 2 of 3 futures unfinished when its
// timeout of 200 ms passed; ..."), and the generator ends. Futures that
// end before the deadline are all yielded first. The futures themselves are
// not cancelled. Must be awaited on an event loop's thread (the timer runs
// there), or std::logic_error is thrown.
template <class T>
async_generator<std::size_t> as_completed(std::vector<future<T>>& futures, std::chrono::steady_clock::duration timeout) {
    return detail::yield_as_completed(&futures, std::optional{timeout});
}

// Completes when the condition `when` holds, at once when it already holds;
// yields which futures are final then (done) and which not (not_done).
// Resumes on the loop thread of the futures' pool. Throws cancelled_error
// when the awaiter's stop token is stopped first.
template <class T>
task<wait_result> wait(std::vector<future<T>>& futures, return_when when = return_when::all_completed) {
    return detail::wait_for_futures(&futures, when, std::nullopt);
}

// The same, bounded by `timeout` from when it is first awaited (Python's
// wait(fs, timeout, return_when)): when the timeout passes first it does not
// throw, it yields the partition at that moment, with the unfinished futures
// in not_done. The futures themselves are not cancelled. A timeout of zero
// or less only looks at the futures. Must be awaited on an event loop's
// thread (the timer runs there), or std::logic_error is thrown (not when the
// condition already holds). Throws cancelled_error when the awaiter's stop
// token is stopped first.
template <class T>
task<wait_result> wait(std::vector<future<T>>& futures, return_when when, std::chrono::steady_clock::duration timeout) {
    return detail::wait_for_futures(&futures, when, std::optional{timeout});
}

} // namespace coproc

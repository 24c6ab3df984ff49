// coproc/wait.hpp - waiting on many futures: as_completed and wait, the
// counterparts of concurrent.futures.as_completed and concurrent.futures.wait.
//
//     auto order = coproc::as_completed(futures);            // async_generator<std::size_t>
//     while (auto index = co_await order.next()) use(co_await std::move(futures[*index]));
//
//     auto [done, not_done] = co_await coproc::wait(futures, coproc::return_when::first_completed);
//
// Both refer to the futures by position in the vector, which must outlive
// the generator or the wait. Await them on the pool's loop thread. Both
// honour the awaiter's stop token (with_timeout gives them a deadline).
#pragma once

#include <coproc/async_generator.hpp>
#include <coproc/cancellation.hpp>
#include <coproc/error.hpp>
#include <coproc/event_loop.hpp>
#include <coproc/future.hpp>
#include <coproc/task.hpp>

#include <atomic>
#include <coroutine>
#include <cstddef>
#include <deque>
#include <memory>
#include <optional>
#include <stop_token>
#include <vector>

namespace coproc {

enum class return_when {
    first_completed, // as soon as any future is final
    // as soon as any future fails (ends with an exception), or all are
    // final. A cancelled future is final but has not failed: it does not
    // end the wait, whether it was cancelled before the call or during it.
    first_exception,
    all_completed,   // when every future is final
};

struct wait_result {
    std::vector<std::size_t> done;     // positions of the final futures
    std::vector<std::size_t> not_done; // positions of the others
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

} // namespace detail

// Yields the position of each future as it becomes final, each exactly once.
template <class T>
async_generator<std::size_t> as_completed(std::vector<future<T>>& futures) {
    auto queue = detail::watch_completions(futures);
    for (std::size_t delivered = 0; delivered < futures.size(); ++delivered) {
        co_await queue->wait();
        co_yield queue->pop();
    }
}

// Completes when the condition `when` holds; yields which futures are final.
template <class T>
task<wait_result> wait(std::vector<future<T>>& futures, return_when when = return_when::all_completed) {
    auto queue = detail::watch_completions(futures);
    for (std::size_t finished = 0; finished < futures.size(); ++finished) {
        co_await queue->wait();
        const std::size_t index = queue->pop();
        if (when == return_when::first_completed) break;
        // As in Python's wait: a cancelled future carries cancelled_error,
        // but it was cancelled, it did not fail.
        if (when == return_when::first_exception && !futures[index].cancelled() && futures[index].exception() != nullptr) {
            break;
        }
    }
    wait_result result;
    for (std::size_t i = 0; i < futures.size(); ++i) (futures[i].done() ? result.done : result.not_done).push_back(i);
    co_return result;
}

} // namespace coproc

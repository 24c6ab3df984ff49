// coproc/detail/join.hpp - running several tasks concurrently and resuming
// one awaiting coroutine when all of them have ended. The engine behind
// when_all and when_any.
//
// States of a join:
//
//   starting   the awaiting coroutine starts each child in turn; a child runs
//              until its first suspension (or to its end).
//   waiting    the awaiting coroutine is suspended; children end, on the loop
//              thread or on whatever thread resumes them.
//   joined     the last child to end resumes the awaiting coroutine by
//              symmetric transfer.
//
// The count starts at children + 1: the extra unit belongs to the awaiting
// coroutine and is released once every child has been started, so no child
// can resume the awaiter while it is still inside await_suspend.
#pragma once

#include <coproc/detail/linked_stop_source.hpp>
#include <coproc/detail/promise_base.hpp>

#include <atomic>
#include <coroutine>
#include <cstddef>
#include <exception>
#include <optional>
#include <span>
#include <stop_token>
#include <type_traits>
#include <utility>
#include <variant>

namespace coproc::detail {

// What a task<T> contributes to a tuple or variant: void becomes monostate.
template <class T>
using non_void_t = std::conditional_t<std::is_void_v<T>, std::monostate, T>;

class join_state {
public:
    explicit join_state(std::size_t children) noexcept : remaining_(children + 1) {}

    // Called by the awaiting coroutine before any child starts.
    void set_awaiting(std::coroutine_handle<> awaiting) noexcept { awaiting_ = awaiting; }

    // Called by each child as it ends; yields the coroutine to transfer to.
    // acq_rel: the release publishes this child's result; the acquire by the
    // last arrival makes every child's result visible to the awaiter it
    // resumes.
    std::coroutine_handle<> arrive() noexcept {
        if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) return awaiting_;
        return std::noop_coroutine();
    }

    // Called by the awaiting coroutine after starting every child; true when
    // it must suspend (some child is still running). acq_rel as in arrive().
    bool release_starter() noexcept { return remaining_.fetch_sub(1, std::memory_order_acq_rel) > 1; }

private:
    std::atomic<std::size_t> remaining_;
    std::coroutine_handle<> awaiting_{};
};

class join_child_promise;

// A child coroutine of a join. Owns its frame; it is destroyed with the
// awaiting coroutine's frame once the join is over.
class join_child {
public:
    using promise_type = join_child_promise;
    explicit join_child(std::coroutine_handle<join_child_promise> handle) noexcept : handle_(handle) {}
    join_child(join_child&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
    join_child& operator=(join_child&&) = delete;
    join_child(const join_child&) = delete;
    join_child& operator=(const join_child&) = delete;
    ~join_child();

    void start(join_state& join, std::stop_token token) noexcept;

private:
    std::coroutine_handle<join_child_promise> handle_;
};

class join_child_promise : public promise_base {
public:
    join_child get_return_object() noexcept {
        return join_child{std::coroutine_handle<join_child_promise>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() const noexcept { return {}; }

    struct final_awaiter {
        bool await_ready() const noexcept { return false; }
        std::coroutine_handle<> await_suspend(std::coroutine_handle<join_child_promise> self) noexcept {
            return self.promise().join->arrive();
        }
        void await_resume() const noexcept {}
    };
    final_awaiter final_suspend() const noexcept { return {}; }
    void return_void() const noexcept {}
    // Child bodies catch everything and hand it to their combinator.
    void unhandled_exception() const noexcept { std::terminate(); }

    join_state* join = nullptr;
};

inline join_child::~join_child() {
    if (handle_) handle_.destroy();
}

inline void join_child::start(join_state& join, std::stop_token token) noexcept {
    handle_.promise().join = &join;
    handle_.promise().set_stop_token(std::move(token));
    handle_.resume();
}

// Starts every child with `token` and suspends until all have ended.
class join_awaiter {
public:
    join_awaiter(std::span<join_child> children, join_state& join, std::stop_token token) noexcept
        : children_(children), join_(&join), token_(std::move(token)) {}

    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> awaiting) noexcept {
        join_->set_awaiting(awaiting);
        for (auto& child : children_) child.start(*join_, token_);
        return join_->release_starter();
    }
    void await_resume() const noexcept {}

private:
    std::span<join_child> children_;
    join_state* join_;
    std::stop_token token_;
};

} // namespace coproc::detail

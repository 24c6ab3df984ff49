// coproc/cancellation.hpp - reading and replacing the stop token a coroutine
// runs with.
//
// Every coproc::task carries a std::stop_token. It comes from whoever awaits
// the task (a task inherits its awaiter's token), from event_loop::run and
// event_loop::spawn, or from with_stop_token below. A stop request on it
// cancels the operation the task is suspended on, and the task resumes with
// coproc::cancelled_error. Code that is not suspended can poll the token it
// gets from get_stop_token().
#pragma once

#include <coproc/detail/promise_base.hpp>
#include <coproc/detail/linked_stop_source.hpp>
#include <coproc/task.hpp>

#include <coroutine>
#include <optional>
#include <stop_token>
#include <utility>

namespace coproc {

namespace detail {
struct stop_token_awaiter {
    std::stop_token token;
    bool await_ready() const noexcept { return false; }
    template <class P>
    bool await_suspend(std::coroutine_handle<P> awaiting) noexcept {
        token = stop_token_of(awaiting);
        return false; // never suspends: the value is read synchronously
    }
    std::stop_token await_resume() noexcept { return std::move(token); }
};

} // namespace detail

// co_await get_stop_token() yields the awaiting task's stop token without
// suspending.
[[nodiscard]] inline detail::stop_token_awaiter get_stop_token() noexcept { return {}; }

// Runs `body` with a token that is stopped when either the awaiter's token or
// `token` is stopped. Yields body's value or rethrows its exception
// (coproc::cancelled_error when the stop cancelled one of its operations).
template <class T>
task<T> with_stop_token(task<T> body, std::stop_token token) {
    const std::stop_token outer = co_await get_stop_token();
    detail::linked_stop_source link{outer, token};
    body.handle().promise().set_stop_token(link.token());
    co_return co_await std::move(body);
}

} // namespace coproc

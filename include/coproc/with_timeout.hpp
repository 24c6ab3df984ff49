// coproc/with_timeout.hpp - a deadline on any awaitable.
//
//     auto reply = co_await coproc::with_timeout(read_reply(loop, fd), 250ms);
//
// Races the work against a timer on the event loop that runs the awaiting
// coroutine. When the timer wins, the work is cancelled (its stop token is
// stopped), awaited, and coproc::timeout_error is thrown. When the work wins,
// the timer is cancelled and the work's value is returned or its exception
// rethrown. A stop of the awaiter's own token cancels both, and the awaiter
// gets coproc::cancelled_error, unless the work ended with a value anyway (a
// cancellation never discards a value; see when_any).
#pragma once

#include <coproc/error.hpp>
#include <coproc/event_loop.hpp>
#include <coproc/task.hpp>
#include <coproc/when_any.hpp>

#include <chrono>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace coproc {

namespace detail {

template <class A>
decltype(auto) get_awaiter(A&& awaitable) {
    if constexpr (requires { static_cast<A&&>(awaitable).operator co_await(); }) {
        return static_cast<A&&>(awaitable).operator co_await();
    } else {
        return static_cast<A&&>(awaitable);
    }
}

// What co_await on an A yields.
template <class A>
using await_result_t = decltype(get_awaiter(std::declval<A>()).await_resume());

template <class T>
struct is_task : std::false_type {};
template <class T>
struct is_task<task<T>> : std::true_type {};

template <class R, class A>
task<R> as_task(A awaitable) {
    co_return co_await std::move(awaitable);
}

inline task<void> sleep_until_task(event_loop* loop, std::chrono::steady_clock::time_point deadline) {
    co_await loop->sleep_until(deadline);
}

std::string describe_deadline(std::chrono::steady_clock::duration limit);

} // namespace detail

// Awaits `body` with a deadline `limit` after the moment it is awaited
// (before `body` first runs). Must be awaited by a
// coroutine that an event_loop runs (the timer lives on that loop);
// otherwise throws std::logic_error.
template <class T>
task<T> with_timeout(task<T> body, std::chrono::steady_clock::duration limit) {
    // The deadline counts from here, before the work first runs.
    const auto deadline = std::chrono::steady_clock::now() + limit;
    event_loop* loop = event_loop::current();
    if (loop == nullptr) throw std::logic_error("coproc::with_timeout awaited outside an event loop's thread");
    auto outcome = co_await when_any(std::move(body), detail::sleep_until_task(loop, deadline));
    if (outcome.index() == 1) throw timeout_error(detail::describe_deadline(limit));
    if constexpr (!std::is_void_v<T>) co_return std::get<0>(std::move(outcome));
}

// The same for any other awaitable (an io_operation, a coproc::future, ...):
// it is awaited inside a task, and cancelled through that task's stop token.
template <class A>
    requires(!detail::is_task<std::remove_cvref_t<A>>::value)
task<detail::await_result_t<A>> with_timeout(A awaitable, std::chrono::steady_clock::duration limit) {
    return with_timeout(detail::as_task<detail::await_result_t<A>>(std::move(awaitable)), limit);
}

} // namespace coproc

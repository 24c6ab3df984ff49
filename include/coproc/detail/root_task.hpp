// coproc/detail/root_task.hpp - the coroutines at the bottom of every chain
// of tasks that an event_loop runs: the one behind event_loop::run and the one
// behind each event_loop::spawn.
//
// A root owns the stop_source of its chain (event_loop::stop() and the token
// given to run/spawn both request it) and is linked into its loop's list of
// live roots. It starts suspended; the loop resumes it. At final suspend it
// does not suspend, so the frame frees itself, and the promise's destructor
// unlinks it from the loop. The loop destroys roots still alive when the
// loop itself is destroyed.
#pragma once

#include <coproc/detail/linked_stop_source.hpp>
#include <coproc/detail/promise_base.hpp>

#include <coroutine>
#include <exception>
#include <optional>
#include <stop_token>

namespace coproc {
class event_loop;
}

namespace coproc::detail {

class root_promise;

class root_task {
public:
    using promise_type = root_promise;
    explicit root_task(std::coroutine_handle<root_promise> handle) noexcept : handle(handle) {}
    std::coroutine_handle<root_promise> handle;
};

class root_promise : public promise_base {
public:
    root_promise() { set_stop_token(stop_source.get_token()); }
    ~root_promise();
    root_promise(const root_promise&) = delete;
    root_promise& operator=(const root_promise&) = delete;

    root_task get_return_object() noexcept {
        return root_task{std::coroutine_handle<root_promise>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() const noexcept { return {}; }
    std::suspend_never final_suspend() const noexcept { return {}; }
    void return_void() const noexcept {}
    // The root bodies catch everything; nothing reaches here.
    void unhandled_exception() const noexcept { std::terminate(); }

    // Set by event_loop before the first resume.
    event_loop* loop = nullptr;
    std::stop_source stop_source;
    // Forwards a stop requested on the user's token to stop_source.
    std::optional<std::stop_callback<request_stop_on>> user_token_link;
    // Links of the loop's list of live roots (loop thread only).
    root_promise* prev = nullptr;
    root_promise* next = nullptr;
};

// The value or exception of the task given to event_loop::run.
template <class T>
struct run_outcome {
    std::optional<T> value;
    std::exception_ptr exception;
    bool done = false;
};
template <>
struct run_outcome<void> {
    std::exception_ptr exception;
    bool done = false;
};

} // namespace coproc::detail

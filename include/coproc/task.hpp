// coproc/task.hpp - coproc::task<T>, the lazy coroutine type of coproc.
//
// A task does nothing until it is awaited (or handed to event_loop::run or
// event_loop::spawn). Awaiting it starts it by symmetric transfer and resumes
// the awaiter, again by symmetric transfer, when it finishes: a chain of any
// length of tasks that complete synchronously runs in constant stack space.
// An exception that escapes the task's body is rethrown in the awaiter.
//
// A task is move-only and owns its coroutine frame: destroying a task that has
// not finished destroys the frame (running the destructors of its locals).
//
// GCC note: GCC turns symmetric transfer into a tail call only when sibling
// call optimisation is on (-O2, or -foptimize-sibling-calls) and, under
// AddressSanitizer, only with -fno-sanitize-address-use-after-scope. The
// coproc dependency adds -foptimize-sibling-calls for you; see README.
#pragma once

#include <coproc/detail/promise_base.hpp>

#include <cassert>
#include <coroutine>
#include <exception>
#include <type_traits>
#include <utility>
#include <variant>

namespace coproc {

template <class T = void>
class task;

namespace detail {

template <class T>
class task_promise;

template <class T>
struct task_final_awaiter {
    bool await_ready() const noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<task_promise<T>> self) noexcept {
        return self.promise().continuation();
    }
    void await_resume() const noexcept {}
};

template <class T>
class task_promise_common : public promise_base {
public:
    std::suspend_always initial_suspend() const noexcept { return {}; }
    task_final_awaiter<T> final_suspend() const noexcept { return {}; }
};

template <class T>
class task_promise final : public task_promise_common<T> {
public:
    task<T> get_return_object() noexcept;

    template <class U>
        requires std::convertible_to<U&&, T>
    void return_value(U&& value) noexcept(std::is_nothrow_constructible_v<T, U&&>) {
        result_.template emplace<1>(std::forward<U>(value));
    }
    void unhandled_exception() noexcept { result_.template emplace<2>(std::current_exception()); }

    T take_result() {
        if (result_.index() == 2) std::rethrow_exception(std::get<2>(result_));
        assert(result_.index() == 1 && "coproc::task awaited before it completed");
        return std::move(std::get<1>(result_));
    }

private:
    std::variant<std::monostate, T, std::exception_ptr> result_;
};

template <>
class task_promise<void> final : public task_promise_common<void> {
public:
    task<void> get_return_object() noexcept;
    void return_void() noexcept {}
    void unhandled_exception() noexcept { exception_ = std::current_exception(); }
    void take_result() {
        if (exception_) std::rethrow_exception(exception_);
    }

private:
    std::exception_ptr exception_;
};

} // namespace detail

// A lazily started coroutine producing a T (or void). See the file comment.
template <class T>
class [[nodiscard]] task {
    static_assert(!std::is_reference_v<T>, "coproc::task<T&> is not supported; return a pointer or std::reference_wrapper");

public:
    using promise_type = detail::task_promise<T>;
    using value_type = T;

    task() noexcept = default;
    explicit task(std::coroutine_handle<promise_type> handle) noexcept : handle_(handle) {}
    task(task&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
    task& operator=(task&& other) noexcept {
        if (this != &other) {
            if (handle_) handle_.destroy();
            handle_ = std::exchange(other.handle_, {});
        }
        return *this;
    }
    task(const task&) = delete;
    task& operator=(const task&) = delete;
    ~task() {
        if (handle_) handle_.destroy();
    }

    // True when the task holds a coroutine (it was not moved from).
    [[nodiscard]] bool valid() const noexcept { return static_cast<bool>(handle_); }
    // True when the coroutine has run to completion (value or exception).
    [[nodiscard]] bool done() const noexcept { return handle_ && handle_.done(); }

    // Awaiting starts the task on the awaiting thread and resumes the awaiter
    // when the task finishes; it yields the task's value or rethrows its
    // exception. The task inherits the awaiter's stop token unless it was
    // given its own (coproc::with_stop_token).
    auto operator co_await() && noexcept { return awaiter{handle_}; }
    auto operator co_await() & noexcept { return awaiter{handle_}; }

    // The coroutine handle, for coproc's own combinators. Not API.
    [[nodiscard]] std::coroutine_handle<promise_type> handle() const noexcept { return handle_; }

private:
    struct awaiter {
        std::coroutine_handle<promise_type> handle;

        bool await_ready() const noexcept {
            assert(handle && "co_await on an empty coproc::task");
            return handle.done();
        }
        template <class P>
        std::coroutine_handle<> await_suspend(std::coroutine_handle<P> awaiting) noexcept {
            handle.promise().set_continuation(awaiting);
            handle.promise().inherit_stop_token(detail::stop_token_of(awaiting));
            return handle;
        }
        T await_resume() { return handle.promise().take_result(); }
    };

    std::coroutine_handle<promise_type> handle_{};
};

namespace detail {
template <class T>
task<T> task_promise<T>::get_return_object() noexcept {
    return task<T>{std::coroutine_handle<task_promise<T>>::from_promise(*this)};
}
inline task<void> task_promise<void>::get_return_object() noexcept {
    return task<void>{std::coroutine_handle<task_promise<void>>::from_promise(*this)};
}
} // namespace detail

} // namespace coproc

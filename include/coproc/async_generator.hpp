// coproc/async_generator.hpp - coproc::async_generator<T>, a coroutine that
// co_yields values which its consumer co_awaits one at a time.
//
//     coproc::async_generator<int> numbers(coproc::event_loop* loop) {
//         for (int i = 0; i < 3; ++i) {
//             co_await loop->sleep_for(1ms);
//             co_yield i;
//         }
//     }
//     auto gen = numbers(&loop);
//     while (std::optional<int> value = co_await gen.next()) use(*value);
//
// Lazy: the body runs only inside next(), up to its next co_yield or its end.
// next() yields the value, or std::nullopt at the end, or rethrows the body's
// exception. The body inherits the stop token of the coroutine awaiting
// next(). Destroying the generator destroys a suspended body (its locals'
// destructors run). Move-only.
#pragma once

#include <coproc/detail/promise_base.hpp>

#include <cassert>
#include <coroutine>
#include <exception>
#include <optional>
#include <type_traits>
#include <utility>

namespace coproc {

template <class T>
class [[nodiscard]] async_generator {
public:
    class promise_type : public detail::promise_base {
    public:
        async_generator get_return_object() noexcept {
            return async_generator{std::coroutine_handle<promise_type>::from_promise(*this)};
        }
        std::suspend_always initial_suspend() const noexcept { return {}; }

        // Both a yield and the end hand control back to the consumer.
        struct to_consumer {
            bool await_ready() const noexcept { return false; }
            std::coroutine_handle<> await_suspend(std::coroutine_handle<promise_type> self) noexcept {
                return self.promise().continuation();
            }
            void await_resume() const noexcept {}
        };
        to_consumer final_suspend() const noexcept { return {}; }

        template <class U = T>
            requires std::convertible_to<U&&, T>
        to_consumer yield_value(U&& value) noexcept(std::is_nothrow_constructible_v<T, U&&>) {
            value_.emplace(std::forward<U>(value));
            return {};
        }
        void return_void() const noexcept {}
        void unhandled_exception() noexcept { exception_ = std::current_exception(); }

        std::optional<T> take() {
            if (exception_) std::rethrow_exception(std::exchange(exception_, nullptr));
            return std::exchange(value_, std::nullopt);
        }

    private:
        std::optional<T> value_;
        std::exception_ptr exception_;
    };

    async_generator(async_generator&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
    async_generator& operator=(async_generator&& other) noexcept {
        if (this != &other) {
            if (handle_) handle_.destroy();
            handle_ = std::exchange(other.handle_, {});
        }
        return *this;
    }
    async_generator(const async_generator&) = delete;
    async_generator& operator=(const async_generator&) = delete;
    ~async_generator() {
        if (handle_) handle_.destroy();
    }

    // Runs the body to its next co_yield (yields the value) or to its end
    // (yields std::nullopt; so does every later call); rethrows what the
    // body threw.
    auto next() noexcept { return next_awaiter{handle_}; }

private:
    explicit async_generator(std::coroutine_handle<promise_type> handle) noexcept : handle_(handle) {}

    struct next_awaiter {
        std::coroutine_handle<promise_type> handle;
        bool await_ready() const noexcept { return !handle || handle.done(); }
        template <class P>
        std::coroutine_handle<> await_suspend(std::coroutine_handle<P> consumer) noexcept {
            handle.promise().set_continuation(consumer);
            handle.promise().inherit_stop_token(detail::stop_token_of(consumer));
            return handle;
        }
        std::optional<T> await_resume() {
            if (!handle) return std::nullopt;
            return handle.promise().take();
        }
    };

    std::coroutine_handle<promise_type> handle_;
};

} // namespace coproc

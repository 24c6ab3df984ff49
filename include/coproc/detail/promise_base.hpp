// coproc/detail/promise_base.hpp - what every coproc coroutine promise
// carries: the continuation to resume when it finishes, and the stop token
// that cancels the operation it is suspended on.
#pragma once

#include <coroutine>
#include <concepts>
#include <stop_token>
#include <utility>

namespace coproc::detail {

class promise_base {
public:
    // The token that cancels this coroutine's awaits. A child task inherits
    // its parent's token when awaited, unless one was set explicitly
    // (with_stop_token, when_all, when_any, event_loop::run/spawn).
    [[nodiscard]] const std::stop_token& stop_token() const noexcept { return stop_token_; }

    void set_stop_token(std::stop_token token) noexcept {
        stop_token_ = std::move(token);
        has_own_token_ = true;
    }

    void inherit_stop_token(const std::stop_token& parent) noexcept {
        if (!has_own_token_) stop_token_ = parent;
    }

    void set_continuation(std::coroutine_handle<> continuation) noexcept { continuation_ = continuation; }

    // Symmetric transfer target at final suspend: the awaiting coroutine, or
    // nothing (a task nobody awaits has no continuation).
    [[nodiscard]] std::coroutine_handle<> continuation() const noexcept {
        return continuation_ ? continuation_ : std::noop_coroutine();
    }

private:
    std::coroutine_handle<> continuation_{};
    std::stop_token stop_token_{};
    bool has_own_token_ = false;
};

// True when P is a coproc promise, so an awaiter can read its stop token.
template <class P>
concept coproc_promise = std::derived_from<P, promise_base>;

// The stop token of the coroutine behind `handle`, or an empty token (never
// stopped) when that coroutine is not a coproc task.
template <class P>
std::stop_token stop_token_of(std::coroutine_handle<P> handle) noexcept {
    if constexpr (coproc_promise<P>) {
        return handle.promise().stop_token();
    } else {
        (void)handle;
        return {};
    }
}

} // namespace coproc::detail

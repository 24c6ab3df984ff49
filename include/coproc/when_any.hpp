// coproc/when_any.hpp - await several tasks at once, the first to finish.
//
//     auto first = co_await coproc::when_any(read_reply(loop, fd), loop_sleep(loop, 1s));
//     if (first.index() == 0) use(std::get<0>(first));
//
// The tasks start in argument order and run concurrently. The first one to
// end, with a value or an exception, wins: the others are cancelled (their
// stop tokens are stopped) and awaited before when_any returns, so nothing
// they own outlives the call. when_any yields the winner's value or rethrows
// its exception. A stop of the awaiter's token is passed on to every task;
// the winner is then whichever ends first, normally with cancelled_error.
// A cancellation never discards a value: when a task ends with a value after
// the winner ended with cancelled_error (a stop racing a completion, say a
// recv that got its bytes), that value wins instead.
#pragma once

#include <coproc/cancellation.hpp>
#include <coproc/detail/join.hpp>
#include <coproc/error.hpp>
#include <coproc/task.hpp>

#include <array>
#include <atomic>
#include <cstddef>
#include <exception>
#include <limits>
#include <optional>
#include <span>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace coproc {

// What the vector form of when_any yields: the winner's position and value.
template <class T>
struct when_any_result {
    std::size_t index;
    T value;
};
template <>
struct when_any_result<void> {
    std::size_t index;
};

namespace detail {

// Shared by the children of one when_any. Holds the winner's outcome.
template <class Value>
class when_any_control {
public:
    static constexpr std::size_t no_winner = std::numeric_limits<std::size_t>::max();

    when_any_control(std::size_t children, const std::stop_token& outer) : join(children), stop(outer) {}

    // True for the first child to end, which then stores its outcome; the
    // others are cancelled. Relaxed suffices: compare_exchange elects one
    // winner, and the join's acq_rel count publishes its outcome.
    bool claim(std::size_t index) noexcept {
        std::size_t expected = no_winner;
        if (!winner_.compare_exchange_strong(expected, index, std::memory_order_relaxed)) return false;
        stop.request_stop();
        return true;
    }
    // For a child that ended with a value after the winner ended with
    // cancelled_error: makes it the winner. Children run on their loop's
    // thread, one at a time, so this needs no more than claim() does.
    bool claim_over_cancellation(std::size_t index) noexcept {
        if (!winner_cancelled_) return false;
        winner_cancelled_ = false;
        error = nullptr;
        winner_.store(index, std::memory_order_relaxed);
        return true;
    }
    // Stores the winner's exception.
    void set_error(std::exception_ptr winner_error) noexcept {
        try {
            std::rethrow_exception(winner_error);
        } catch (const cancelled_error&) {
            winner_cancelled_ = true;
        } catch (...) {
        }
        error = std::move(winner_error);
    }
    [[nodiscard]] std::size_t winner() const noexcept { return winner_.load(std::memory_order_relaxed); }
    Value take() {
        if (error) std::rethrow_exception(error);
        return std::move(*value);
    }

    join_state join;
    linked_stop_source stop;
    std::optional<Value> value;
    std::exception_ptr error;

private:
    std::atomic<std::size_t> winner_{no_winner};
    bool winner_cancelled_ = false; // the winner ended with cancelled_error
};

// Stores the winner's value; a value whose move throws becomes the outcome's
// exception instead, so the winner never leaves the outcome empty.
template <class Value, class... Args>
void store_winner(when_any_control<Value>* control, Args&&... args) noexcept {
    try {
        control->value.emplace(std::forward<Args>(args)...);
    } catch (...) {
        control->error = std::current_exception();
    }
}

template <std::size_t I, class T, class Variant>
join_child when_any_child(task<T> body, when_any_control<Variant>* control) {
    std::exception_ptr error;
    try {
        if constexpr (std::is_void_v<T>) {
            co_await std::move(body);
            if (control->claim(I) || control->claim_over_cancellation(I)) store_winner(control, std::in_place_index<I>);
        } else {
            auto value = co_await std::move(body);
            if (control->claim(I) || control->claim_over_cancellation(I)) {
                store_winner(control, std::in_place_index<I>, std::move(value));
            }
        }
    } catch (...) {
        error = std::current_exception();
    }
    if (error && control->claim(I)) control->set_error(std::move(error));
}

template <class T>
join_child when_any_element(task<T> body, when_any_control<non_void_t<T>>* control, std::size_t index) {
    std::exception_ptr error;
    try {
        if constexpr (std::is_void_v<T>) {
            co_await std::move(body);
            if (control->claim(index) || control->claim_over_cancellation(index)) store_winner(control);
        } else {
            auto value = co_await std::move(body);
            if (control->claim(index) || control->claim_over_cancellation(index)) store_winner(control, std::move(value));
        }
    } catch (...) {
        error = std::current_exception();
    }
    if (error && control->claim(index)) control->set_error(std::move(error));
}

template <class Bodies, class Variant, std::size_t... I>
std::array<join_child, sizeof...(I)> make_when_any_children(Bodies& bodies, when_any_control<Variant>* control,
                                                            std::index_sequence<I...>) {
    return {when_any_child<I>(std::move(std::get<I>(bodies)), control)...};
}

} // namespace detail

// Yields a variant whose index() is the winner's position and whose value is
// the winner's (std::monostate for task<void>), or rethrows its exception.
template <class... Ts>
task<std::variant<detail::non_void_t<Ts>...>> when_any(task<Ts>... bodies) {
    static_assert(sizeof...(Ts) > 0, "coproc::when_any needs at least one task");
    using variant = std::variant<detail::non_void_t<Ts>...>;
    const std::stop_token outer = co_await get_stop_token();
    detail::when_any_control<variant> control{sizeof...(Ts), outer};
    std::tuple<task<Ts>...> owned{std::move(bodies)...};
    auto children = detail::make_when_any_children(owned, &control, std::index_sequence_for<Ts...>{});
    co_await detail::join_awaiter{children, control.join, control.stop.token()};
    co_return control.take();
}

// The vector form: yields the winner's index and value, or rethrows its
// exception. An empty vector is an error (std::invalid_argument).
template <class T>
task<when_any_result<T>> when_any(std::vector<task<T>> bodies) {
    if (bodies.empty()) throw std::invalid_argument("coproc::when_any: no tasks to wait for");
    const std::stop_token outer = co_await get_stop_token();
    detail::when_any_control<detail::non_void_t<T>> control{bodies.size(), outer};
    std::vector<detail::join_child> children;
    children.reserve(bodies.size());
    for (std::size_t i = 0; i < bodies.size(); ++i) {
        children.push_back(detail::when_any_element(std::move(bodies[i]), &control, i));
    }
    co_await detail::join_awaiter{children, control.join, control.stop.token()};
    if constexpr (std::is_void_v<T>) {
        control.take();
        co_return when_any_result<void>{control.winner()};
    } else {
        co_return when_any_result<T>{control.winner(), control.take()};
    }
}

} // namespace coproc

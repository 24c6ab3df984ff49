// coproc/when_all.hpp - await several tasks at once, all of them.
//
//     auto [a, b] = co_await coproc::when_all(fetch(1), fetch(2));
//     std::vector<int> all = co_await coproc::when_all(std::move(tasks));
//
// The tasks start in argument order on the awaiting thread and run
// concurrently. when_all completes when every task has ended. If one throws,
// the others are cancelled (their stop tokens are stopped), awaited, and the
// first exception is rethrown. A stop of the awaiter's token is passed on to
// every task.
#pragma once

#include <coproc/cancellation.hpp>
#include <coproc/detail/join.hpp>
#include <coproc/task.hpp>

#include <array>
#include <atomic>
#include <cstddef>
#include <exception>
#include <optional>
#include <span>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace coproc {

namespace detail {

// Shared by the children of one when_all.
class when_all_control {
public:
    when_all_control(std::size_t children, const std::stop_token& outer) : join(children), stop(outer) {}

    // Records the first failure and cancels the other children. Relaxed is
    // enough for the flag: exchange elects a single writer of first_error,
    // and the join's acq_rel count publishes that write to the awaiter.
    void fail(std::exception_ptr error) noexcept {
        if (!failed_.exchange(true, std::memory_order_relaxed)) first_error_ = std::move(error);
        stop.request_stop();
    }
    void rethrow_if_failed() const {
        if (first_error_) std::rethrow_exception(first_error_);
    }

    join_state join;
    linked_stop_source stop;

private:
    std::atomic<bool> failed_{false};
    std::exception_ptr first_error_;
};

template <class T>
join_child when_all_child(task<T> body, when_all_control* control, std::optional<non_void_t<T>>* slot) {
    try {
        if constexpr (std::is_void_v<T>) {
            co_await std::move(body);
            slot->emplace();
        } else {
            slot->emplace(co_await std::move(body));
        }
    } catch (...) {
        control->fail(std::current_exception());
    }
}

template <class Bodies, class Slots, std::size_t... I>
std::array<join_child, sizeof...(I)> make_when_all_children(Bodies& bodies, Slots& slots, when_all_control* control,
                                                            std::index_sequence<I...>) {
    return {when_all_child(std::move(std::get<I>(bodies)), control, &std::get<I>(slots))...};
}

template <class... Ts, std::size_t... I>
std::tuple<non_void_t<Ts>...> take_slots(std::tuple<std::optional<non_void_t<Ts>>...>& slots, std::index_sequence<I...>) {
    return std::tuple<non_void_t<Ts>...>{std::move(*std::get<I>(slots))...};
}

} // namespace detail

// Runs every task concurrently; yields a tuple of their values (void results
// appear as std::monostate), or rethrows the first exception.
template <class... Ts>
task<std::tuple<detail::non_void_t<Ts>...>> when_all(task<Ts>... bodies) {
    const std::stop_token outer = co_await get_stop_token();
    detail::when_all_control control{sizeof...(Ts), outer};
    std::tuple<std::optional<detail::non_void_t<Ts>>...> slots;
    std::tuple<task<Ts>...> owned{std::move(bodies)...};
    auto children = detail::make_when_all_children(owned, slots, &control, std::index_sequence_for<Ts...>{});
    co_await detail::join_awaiter{children, control.join, control.stop.token()};
    control.rethrow_if_failed();
    co_return detail::take_slots<Ts...>(slots, std::index_sequence_for<Ts...>{});
}

// Runs every task of the vector concurrently; yields their values in the
// vector's order (nothing for task<void>), or rethrows the first exception.
template <class T>
task<std::conditional_t<std::is_void_v<T>, void, std::vector<T>>> when_all(std::vector<task<T>> bodies) {
    const std::stop_token outer = co_await get_stop_token();
    detail::when_all_control control{bodies.size(), outer};
    std::vector<std::optional<detail::non_void_t<T>>> slots(bodies.size());
    std::vector<detail::join_child> children;
    children.reserve(bodies.size());
    for (std::size_t i = 0; i < bodies.size(); ++i) {
        children.push_back(detail::when_all_child(std::move(bodies[i]), &control, &slots[i]));
    }
    co_await detail::join_awaiter{children, control.join, control.stop.token()};
    control.rethrow_if_failed();
    if constexpr (!std::is_void_v<T>) {
        std::vector<T> results;
        results.reserve(slots.size());
        for (auto& slot : slots) results.push_back(std::move(*slot));
        co_return results;
    }
}

} // namespace coproc

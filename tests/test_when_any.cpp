// coproc::when_any: the first task to finish wins; the losers are cancelled
// and awaited before when_any returns.
#include "support.hpp"

#include <memory>
#include <stdexcept>
#include <variant>
#include <vector>

using coproc::task;
using namespace test_support;

namespace {

struct frame_guard {
    bool* alive;
    explicit frame_guard(bool* flag) : alive(flag) { *alive = true; }
    ~frame_guard() { *alive = false; }
};

task<int> slow_loser(coproc::event_loop* loop, bool* alive, bool* cancelled) {
    frame_guard guard{alive};
    try {
        co_await loop->sleep_for(std::chrono::hours{1});
    } catch (const coproc::cancelled_error&) {
        *cancelled = true;
        throw;
    }
    co_return -1;
}

task<int> quick(coproc::event_loop* loop, int value) {
    co_await loop->sleep_for(1ms);
    co_return value;
}

task<void> quick_failure(coproc::event_loop* loop) {
    co_await loop->sleep_for(1ms);
    throw std::out_of_range("winner failed");
}

struct race_report {
    std::size_t index;
    int value;
    bool loser_alive_after;
};

task<race_report> race(coproc::event_loop* loop, bool* alive, bool* cancelled) {
    auto outcome = co_await coproc::when_any(slow_loser(loop, alive, cancelled), quick(loop, 7));
    co_return race_report{outcome.index(), std::get<1>(outcome), *alive};
}

task<void> failing_race(coproc::event_loop* loop, bool* alive, bool* cancelled) {
    co_await coproc::when_any(slow_loser(loop, alive, cancelled), quick_failure(loop));
}

// alive[i] and cancelled[i] describe task i of four; task 2 wins.
task<coproc::when_any_result<int>> vector_race(coproc::event_loop* loop, bool* alive, bool* cancelled) {
    std::vector<task<int>> tasks;
    for (int i = 0; i < 4; ++i) {
        if (i == 2) {
            tasks.push_back(quick(loop, 22));
        } else {
            tasks.push_back(slow_loser(loop, &alive[i], &cancelled[i]));
        }
    }
    co_return co_await coproc::when_any(std::move(tasks));
}

} // namespace

TEST_CASE("when_any yields the first task to finish and cancels the loser before returning") {
    coproc::event_loop loop;
    bool alive = false;
    bool cancelled = false;
    const auto report = run_bounded(loop, race(&loop, &alive, &cancelled), 5s);
    CHECK(report.index == 1);
    CHECK(report.value == 7);
    CHECK(cancelled);
    CHECK_FALSE(report.loser_alive_after); // the loser's frame was gone when when_any returned
}

TEST_CASE("when_any rethrows the winner's exception and still cancels the loser") {
    coproc::event_loop loop;
    bool alive = false;
    bool cancelled = false;
    CHECK_THROWS_WITH_AS(run_bounded(loop, failing_race(&loop, &alive, &cancelled), 5s), "winner failed", std::out_of_range);
    CHECK(cancelled);
    CHECK_FALSE(alive);
}

TEST_CASE("when_any over a vector reports the winner's index and cancels every loser") {
    coproc::event_loop loop;
    bool alive[4]{};
    bool cancelled[4]{};
    const auto result = run_bounded(loop, vector_race(&loop, alive, cancelled), 5s);
    CHECK(result.index == 2);
    CHECK(result.value == 22);
    for (std::size_t i = 0; i < 4; ++i) {
        CAPTURE(i);
        CHECK_FALSE(alive[i]);
        CHECK(cancelled[i] == (i != 2));
    }
}

TEST_CASE("when_any over an empty vector is an error") {
    coproc::event_loop loop;
    CHECK_THROWS_AS(loop.run(coproc::when_any(std::vector<task<int>>{})), std::invalid_argument);
}

namespace {

task<int> cancelled_at_once() {
    throw coproc::cancelled_error("coproc: cancelled by a stop request");
    co_return 0;
}

task<int> value_after_a_turn(coproc::event_loop* loop, int value) {
    co_await loop->schedule();
    co_return value;
}

task<std::variant<int, int>> cancellation_then_value(coproc::event_loop* loop) {
    co_return co_await coproc::when_any(cancelled_at_once(), value_after_a_turn(loop, 42));
}

task<coproc::when_any_result<int>> cancellation_then_value_vector(coproc::event_loop* loop) {
    std::vector<task<int>> bodies;
    bodies.push_back(cancelled_at_once());
    bodies.push_back(value_after_a_turn(loop, 7));
    co_return co_await coproc::when_any(std::move(bodies));
}

task<int> fails_at_once() {
    throw std::out_of_range("the winner failed");
    co_return 0;
}

task<void> failure_then_value(coproc::event_loop* loop) {
    co_await coproc::when_any(fails_at_once(), value_after_a_turn(loop, 1));
}

} // namespace

TEST_CASE("a cancellation never discards a value: a task that ends with one after a cancelled winner wins") {
    coproc::event_loop loop;
    const auto outcome = run_bounded(loop, cancellation_then_value(&loop));
    CHECK(outcome.index() == 1);
    CHECK(std::get<1>(outcome) == 42);
    const auto vector_outcome = run_bounded(loop, cancellation_then_value_vector(&loop));
    CHECK(vector_outcome.index == 1);
    CHECK(vector_outcome.value == 7);
    // Any other exception still wins over a later value.
    CHECK_THROWS_AS(run_bounded(loop, failure_then_value(&loop)), std::out_of_range);
}

// Timers: sleep_for and sleep_until never complete early, and timers fire in
// deadline order whatever order they were started in.
#include "support.hpp"

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

using coproc::task;
using namespace test_support;
using clock_type = std::chrono::steady_clock;

namespace {

struct wake_record {
    int index;
    clock_type::time_point deadline;
    clock_type::time_point woke;
};

task<void> wake_at(coproc::event_loop* loop, int index, clock_type::time_point deadline, std::vector<wake_record>* log) {
    co_await loop->sleep_until(deadline);
    log->push_back({index, deadline, clock_type::now()});
}

task<std::vector<clock_type::duration>> measure_sleeps(coproc::event_loop* loop, std::vector<clock_type::duration> requested) {
    std::vector<clock_type::duration> measured;
    for (auto duration : requested) {
        const auto start = clock_type::now();
        co_await loop->sleep_for(duration);
        measured.push_back(clock_type::now() - start);
    }
    co_return measured;
}

} // namespace

TEST_CASE("sleep_for never completes before its duration has passed") {
    coproc::event_loop loop;
    const std::vector<clock_type::duration> requested{0ms, 1us, 100us, 1ms, 3ms, 10ms, 25ms};
    const auto measured = run_bounded(loop, measure_sleeps(&loop, requested));
    REQUIRE(measured.size() == requested.size());
    for (std::size_t i = 0; i < requested.size(); ++i) {
        CAPTURE(i);
        CHECK(measured[i] >= requested[i]);
    }
}

TEST_CASE("a negative duration or a past deadline completes at once") {
    coproc::event_loop loop;
    const auto measured = run_bounded(loop, measure_sleeps(&loop, {-5ms}));
    CHECK(measured.size() == 1);
    std::vector<wake_record> log;
    run_bounded(loop, wake_at(&loop, 0, clock_type::now() - 1s, &log));
    CHECK(log.size() == 1);
}

TEST_CASE("timers started in random order fire in deadline order and never early") {
    coproc::event_loop loop;
    constexpr int timers = 60;
    std::vector<int> order(timers);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937{20261121});

    std::vector<wake_record> log;
    // Far enough ahead that all are started before the first is due, even
    // under a sanitizer on a loaded machine: a timer already due when it
    // starts completes at once, in the order started.
    const auto base = clock_type::now() + 200ms;
    for (int index : order) loop.spawn(wake_at(&loop, index, base + index * 1ms, &log));
    run_bounded(loop, wake_at(&loop, timers, base + timers * 1ms + 5ms, &log));

    REQUIRE(log.size() == timers + 1);
    for (std::size_t i = 0; i < log.size(); ++i) {
        CAPTURE(i);
        CHECK(log[i].woke >= log[i].deadline);
        if (i > 0) CHECK(log[i - 1].deadline <= log[i].deadline);
    }
}

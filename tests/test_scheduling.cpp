// Where tasks run: a task never waits while a worker is idle or could be
// started for it, and a task sent ahead to a busy worker moves to a worker
// that frees up first, unrun, never run twice, never lost. Asserted by which
// worker ran what, not by timing.
#include "remote_functions.hpp"
#include "support.hpp"

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

using coproc::future;
using coproc::task;
using namespace test_support;
using namespace pool_test;

namespace {

// Awaits `quick`; says whether `slow` was still unfinished when it ended.
task<bool> ends_first(future<int>* quick, future<int>* slow, int* quick_pid) {
    *quick_pid = co_await *quick;
    co_return !slow->done();
}

task<void> settle(future<int>* pending) {
    try {
        (void)co_await *pending;
    } catch (const std::exception&) {
    }
}

} // namespace

TEST_CASE("a quick task submitted behind a lone long one gets a worker of its own, not a place behind it") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}}; // default options otherwise
    auto slow = pool.submit<sleep_then_pid>(2000);
    run_bounded(loop, until_running(&loop, &slow));
    auto quick = pool.submit<sleep_then_pid>(0);
    int quick_pid = 0;
    CHECK(run_bounded(loop, ends_first(&quick, &slow, &quick_pid)));
    CHECK(pool.stats().workers_started == 2);
    run_bounded(loop, settle(&slow));
    CHECK(slow.result() != quick_pid);
}

TEST_CASE("a task sent ahead to a busy worker moves, unrun, to the worker that frees up first") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    auto slow = pool.submit<sleep_then_pid>(3000);
    run_bounded(loop, until_running(&loop, &slow));
    auto shorter = pool.submit<sleep_then_pid>(300);
    run_bounded(loop, until_running(&loop, &shorter));
    // Both workers are busy: these are sent ahead, some to the slow one.
    std::vector<future<int>> queued;
    for (int i = 0; i < 4; ++i) queued.push_back(pool.submit<sleep_then_pid>(0));
    run_bounded(loop, settle(&shorter));
    const int freed = shorter.result();
    for (auto& pending : queued) {
        int pid = 0;
        CHECK(run_bounded(loop, ends_first(&pending, &slow, &pid)));
        CHECK(pid == freed);
    }
    CHECK(pool.stats().tasks_moved >= 1);
    run_bounded(loop, settle(&slow));
}

TEST_CASE("under random timing, tasks taken back from busy workers run exactly once and none is lost") {
    constexpr int total = 300;
    run_counters counters{total};
    std::mt19937 random{17};
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2, .max_prefetch = 8}};
    // In waves, each awaited whole: at the end of each, one worker is idle
    // while the other may still hold tasks sent ahead.
    std::size_t values = 0;
    for (int first = 0; first < total; first += 10) {
        std::vector<future<int>> wave;
        for (int i = first; i < first + 10; ++i) {
            const int milliseconds = random() % 3 == 0 ? static_cast<int>(random() % 30) : 0;
            wave.push_back(pool.submit<count_run_slowly>(counters.path(), i, milliseconds));
        }
        for (auto& pending : wave) {
            run_bounded(loop, settle(&pending), 60s);
            values += pending.exception() == nullptr;
        }
    }
    CHECK(values == total);
    const auto moved = pool.stats().tasks_moved;
    MESSAGE(moved << " tasks moved to a worker that freed up");
    CHECK(moved > 0);
    run_bounded(loop, pool.shutdown({.wait = true}));
    const auto runs = counters.read();
    std::size_t exactly_once = 0;
    for (auto count : runs) exactly_once += count == 1;
    CHECK(exactly_once == total);
}

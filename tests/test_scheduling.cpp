// Where tasks run: a task never waits while a worker is idle or could be
// started for it, and a task sent ahead to a busy worker moves to a worker
// that frees up first, unrun, never run twice, never lost. Asserted by which
// worker ran what, not by timing.
#include "remote_functions.hpp"
#include "support.hpp"

#include <algorithm>
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

// --- max_worker_memory

namespace {

// What a fresh worker of this test program holds resident (it differs with
// sanitizers): the memory limits below are set relative to it.
std::uint64_t fresh_worker_memory() {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    return run_bounded(loop, await_future(pool.submit<resident_memory>()));
}

task<void> until_gone(coproc::event_loop* loop, coproc::process_pool* pool, int pid) {
    for (int i = 0; i < 1000; ++i) {
        const auto pids = pool->worker_pids();
        if (std::find(pids.begin(), pids.end(), pid) == pids.end()) co_return;
        co_await loop->sleep_for(std::chrono::milliseconds{10});
    }
}

} // namespace

TEST_CASE("max_worker_memory: a worker over the limit after a task is retired once it answered; the next task runs on a fresh worker") {
    const std::uint64_t fresh = fresh_worker_memory();
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .max_worker_memory = fresh + (64 << 20)}};
    const int first = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    CHECK(run_bounded(loop, await_future(pool.submit<worker_pid>())) == first); // under the limit: kept
    CHECK(pool.stats().workers_retired_for_memory == 0);
    // 128 MiB touched and kept: over the limit once it answered, not before.
    CHECK(run_bounded(loop, await_future(pool.submit<hold_memory>(128, 0))) == first);
    const int next = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    CHECK(next != first);
    CHECK(pool.stats().workers_retired_for_memory == 1);
    CHECK(pool.stats().workers_started == 2);
    CHECK(pool.stats().tasks_completed == 4);
    CHECK(pool.stats().tasks_failed == 0);
    run_bounded(loop, until_gone(&loop, &pool, first));
    CHECK(pool.worker_pids() == std::vector<int>{next});
}

TEST_CASE("max_worker_memory: tasks sent ahead to a worker retired for memory run on its replacement, each exactly once") {
    const std::uint64_t fresh = fresh_worker_memory();
    constexpr int followers = 12;
    run_counters counters{followers};
    coproc::event_loop loop;
    // One worker that holds up to four tasks: the hog and three sent ahead.
    coproc::process_pool pool{
        loop, {.max_workers = 1, .max_worker_memory = fresh + (64 << 20), .prefetch = 4, .max_prefetch = 4}};
    auto hog = pool.submit<hold_memory>(128, 300);
    std::vector<future<int>> after;
    // The first runs 1 s, the others 100 ms: the RECALLs reach the worker
    // while it runs the first of them (on a loaded machine too), not after
    // it raced through all three.
    for (int i = 0; i < followers; ++i) {
        after.push_back(pool.submit<count_run_slowly>(counters.path(), i, i == 0 ? 1000 : 100));
    }
    const int hog_pid = run_bounded(loop, await_future(std::move(hog)), 60s);
    const auto pids = run_bounded(loop, await_all(std::move(after)), 60s);
    // The worker may have started the task after the hog before the parent
    // read the hog's answer; no other task ran there.
    CHECK(std::count(pids.begin(), pids.end(), hog_pid) <= 1);
    CHECK(pool.stats().workers_retired_for_memory == 1);
    CHECK(pool.stats().workers_started == 2);
    CHECK(pool.stats().tasks_completed == followers + 1);
    run_bounded(loop, pool.shutdown({.wait = true}));
    const auto runs = counters.read();
    CHECK(std::count(runs.begin(), runs.end(), 1u) == followers);
}

// Cancelling pool tasks in every state, deadlines, and cancellation from the
// awaiting side. Each state is checked by an observable side effect (a
// marker file the task would write, the pid of the worker that serves next),
// not only by the flag cancel() returns.
#include "remote_functions.hpp"
#include "support.hpp"

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

using coproc::future;
using coproc::task;
using namespace test_support;
using namespace pool_test;

namespace {

// Waits until the canceller is done, then for every future to end.
task<void> settle(coproc::event_loop* loop, std::vector<future<int>>* futures, const std::atomic<bool>* done_cancelling) {
    while (!done_cancelling->load()) co_await loop->sleep_for(1ms);
    for (auto& pending : *futures) {
        try {
            (void)co_await pending;
        } catch (const std::exception&) {
        }
    }
}

bool is_cancelled(coproc::event_loop& loop, future<int> pending) {
    try {
        run_bounded(loop, await_future(std::move(pending)));
    } catch (const coproc::cancelled_error&) {
        return true;
    }
    return false;
}

} // namespace

TEST_CASE("cancel of a pending task: it never runs") {
    marker_file marker{"pending"};
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 1}};
    auto blocker = pool.submit<sleep_then>(30, 1);
    auto victim = pool.submit<touch_file>(marker.path());
    CHECK(victim.cancel());
    CHECK(victim.cancelled());
    CHECK(run_bounded(loop, await_future(std::move(blocker))) == 1);
    run_bounded(loop, pause_for(&loop, 50ms));
    CHECK_FALSE(marker.exists());
}

TEST_CASE("cancel of a dispatched task that has not started: the worker drops it unrun and is not killed") {
    marker_file marker{"dispatched"};
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 2}};
    // Long enough for the CANCEL to reach the worker while the blocker runs,
    // on a loaded machine too.
    auto blocker = pool.submit<sleep_then>(1500, 1);
    auto victim = pool.submit<touch_file>(marker.path());
    run_bounded(loop, until_running(&loop, &blocker));
    REQUIRE(pool.stats().tasks_running == 2); // the victim is in the worker, queued behind the blocker
    REQUIRE(pool.stats().tasks_queued == 0);
    CHECK_FALSE(victim.running());
    CHECK(victim.cancel());
    CHECK(victim.cancelled());
    CHECK(run_bounded(loop, await_future(std::move(blocker))) == 1);
    const int pid_after = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    CHECK_FALSE(marker.exists());
    CHECK(pool.stats().workers_started == 1); // same worker served on
    CHECK(pool.stats().workers_killed_for_cancel == 0);
    CHECK(pid_after > 0);
}

TEST_CASE("cancel of a running cooperative task: it sees its stop token and its worker is not killed") {
    marker_file marker{"cooperative"};
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = 5000ms}};
    const int pid_before = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    auto running = pool.submit<cooperative_wait>(10'000, marker.path());
    run_bounded(loop, until_running(&loop, &running));
    CHECK(running.cancel());
    CHECK(is_cancelled(loop, std::move(running)));
    const int pid_after = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    CHECK(pid_after == pid_before);
    CHECK(marker.exists()); // the task itself saw the stop
    CHECK(pool.stats().workers_killed_for_cancel == 0);
}

TEST_CASE("cancel of a running task that ignores its token: the worker is killed after the grace period and replaced") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = 100ms}};
    const int pid_before = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    auto spinning = pool.submit<busy_forever>();
    run_bounded(loop, until_running(&loop, &spinning));
    CHECK(spinning.cancel());
    CHECK(is_cancelled(loop, std::move(spinning))); // at once, not after the grace period
    const int pid_after = run_bounded(loop, await_future(pool.submit<worker_pid>()), 10s);
    CHECK(pid_after != pid_before);
    CHECK(pool.stats().workers_killed_for_cancel == 1);
}

TEST_CASE("cancel(force) kills a running task's worker at once, even a cooperative one") {
    marker_file marker{"forced"};
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = 60'000ms}};
    const int pid_before = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    auto running = pool.submit<cooperative_wait>(10'000, marker.path());
    run_bounded(loop, until_running(&loop, &running));
    CHECK(running.cancel(true));
    CHECK(is_cancelled(loop, std::move(running)));
    // With a 60 s grace, only the forced kill makes room this soon.
    const int pid_after = run_bounded(loop, await_future(pool.submit<worker_pid>()), 10s);
    CHECK(pid_after != pid_before);
    CHECK_FALSE(marker.exists()); // killed, not asked
    CHECK(pool.stats().workers_killed_for_cancel == 1);
}

TEST_CASE("request_stop asks a running task to stop and never kills its worker, even past cancel_grace") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = 100ms}};
    {
        // A task that ignores its token keeps its worker: no kill after the grace.
        auto spinning = pool.submit<busy_forever>();
        run_bounded(loop, until_running(&loop, &spinning));
        CHECK(spinning.request_stop());
        CHECK(is_cancelled(loop, std::move(spinning))); // the future ends at once
        run_bounded(loop, pause_for(&loop, 600ms));    // six grace periods
        CHECK(pool.stats().workers_killed_for_cancel == 0);
        CHECK(pool.stats().tasks_cancelling == 1); // its worker still holds it
        CHECK(pool.stats().workers_alive == 1);
    }
    {
        // A cooperative task sees its token.
        marker_file marker{"request-stop"};
        coproc::process_pool cooperative{loop, {.max_workers = 1, .cancel_grace = 100ms}};
        auto running = cooperative.submit<cooperative_wait>(10'000, marker.path());
        run_bounded(loop, until_running(&loop, &running));
        CHECK(running.request_stop());
        CHECK(is_cancelled(loop, std::move(running)));
        for (int i = 0; i < 500 && !marker.exists(); ++i) run_bounded(loop, pause_for(&loop, 20ms));
        CHECK(marker.exists());
        CHECK(run_bounded(loop, await_future(cooperative.submit<square>(3))) == 9); // the worker is free again
        CHECK(cooperative.stats().workers_killed_for_cancel == 0);
    }
}

TEST_CASE("cancel of a finished task returns false and leaves its result") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto done = pool.submit<square>(12);
    run_bounded(loop, pause_for(&loop, 1ms));
    while (!done.done()) run_bounded(loop, pause_for(&loop, 1ms));
    CHECK_FALSE(done.cancel());
    CHECK_FALSE(done.cancelled());
    CHECK(run_bounded(loop, await_future(std::move(done))) == 144);
}

TEST_CASE("a per-submit timeout cancels the task and the awaiter gets timeout_error") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = 100ms}};
    auto slow = pool.submit_with<sleep_then>({.timeout = 50ms}, 5000, 1);
    CHECK_THROWS_AS(run_bounded(loop, await_future(std::move(slow))), coproc::timeout_error);
    CHECK(run_bounded(loop, await_future(pool.submit<square>(3))) == 9); // the pool serves on
    auto quick = pool.submit_with<square>({.timeout = 5000ms}, 4);
    CHECK(run_bounded(loop, await_future(std::move(quick))) == 16);
}

TEST_CASE("with_timeout around a future cancels the task in the worker when the deadline passes") {
    marker_file marker{"with-timeout"};
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = 5000ms}};
    const int pid_before = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    // The deadline starts once the task runs: cancelled before it starts, a
    // task is dropped unrun and would never write the marker.
    auto waiting = pool.submit<cooperative_wait>(10'000, marker.path());
    run_bounded(loop, until_running(&loop, &waiting), 20s);
    CHECK_THROWS_AS(loop.run(coproc::with_timeout(std::move(waiting), 50ms)), coproc::timeout_error);
    CHECK(run_bounded(loop, await_future(pool.submit<worker_pid>())) == pid_before);
    CHECK(marker.exists()); // the worker stopped the task
}

namespace {
// Awaits the future where it is, so that another thread may ask it running().
coproc::task<int> await_in_place(coproc::future<int>* pending) { co_return co_await *pending; }
} // namespace

TEST_CASE("a stop of the awaiting coroutine's token cancels the task in the worker") {
    marker_file marker{"awaiter-stop"};
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = 5000ms}};
    std::stop_source stop;
    auto pending = pool.submit<cooperative_wait>(10'000, marker.path());
    // The stop comes once the task runs (not after a fixed 100 ms, which a
    // worker slow to start under ASan on a loaded machine had not reached:
    // the task was then cancelled while queued and never wrote the marker).
    std::thread stopper([&] {
        const auto deadline = std::chrono::steady_clock::now() + 20s;
        while (!pending.running() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
        stop.request_stop();
    });
    CHECK_THROWS_AS(loop.run(await_in_place(&pending), stop.get_token()), coproc::cancelled_error);
    stopper.join();
    run_bounded(loop, await_future(pool.submit<square>(1))); // the cancel has reached the worker by now
    CHECK(marker.exists());
}

TEST_CASE("a future that loses a when_any is cancelled in the worker") {
    marker_file marker{"when-any"};
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2, .cancel_grace = 5000ms}};
    // Running before the race ends, however slow the machine: a task still
    // queued would be cancelled without ever reaching a worker.
    auto slow = pool.submit<cooperative_wait>(10'000, marker.path());
    run_bounded(loop, until_running(&loop, &slow));
    auto race = coproc::when_any(await_future(std::move(slow)), await_future(pool.submit<sleep_then>(50, 7)));
    const auto winner = run_bounded(loop, std::move(race));
    CHECK(winner.index() == 1);
    CHECK(std::get<1>(winner) == 7);
    // The worker writes the marker when its stop token fires; bounded wait.
    for (int i = 0; i < 500 && !marker.exists(); ++i) run_bounded(loop, pause_for(&loop, 20ms));
    CHECK(marker.exists());
    CHECK(pool.stats().workers_killed_for_cancel == 0);
}

TEST_CASE("restart_workers cancels what is running and requeues what is pending onto a replacement") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 1}};
    auto running = pool.submit<busy_forever>();
    auto pending = pool.submit<square>(2);
    run_bounded(loop, until_running(&loop, &running));
    pool.restart_workers();
    CHECK(running.cancelled());
    CHECK(is_cancelled(loop, std::move(running)));
    CHECK(run_bounded(loop, await_future(std::move(pending))) == 4); // requeued onto a replacement
}

TEST_CASE("racing cancels against 10,000 tasks: every future ends final, nothing hangs or leaks") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2, .cancel_grace = 200ms}};
    std::vector<future<int>> futures;
    futures.reserve(10'000);
    for (int i = 0; i < 10'000; ++i) futures.push_back(pool.submit<sleep_then>(i % 50 == 0 ? 1 : 0, i));
    std::mt19937 random{7};
    std::vector<std::size_t> order(futures.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), random);
    // Another thread cancels a random half, at random moments, while the loop runs.
    std::atomic<bool> finished_cancelling{false};
    std::thread canceller([&] {
        std::mt19937 pauses{11};
        for (std::size_t k = 0; k < order.size() / 2; ++k) {
            futures[order[k]].cancel(k % 97 == 0);
            if (pauses() % 64 == 0) std::this_thread::sleep_for(std::chrono::microseconds{pauses() % 200});
        }
        finished_cancelling = true;
    });
    run_bounded(loop, settle(&loop, &futures, &finished_cancelling), 120s);
    canceller.join();
    std::size_t values = 0;
    std::size_t cancelled = 0;
    for (std::size_t i = 0; i < futures.size(); ++i) {
        REQUIRE(futures[i].done());
        if (futures[i].cancelled()) {
            ++cancelled;
        } else if (futures[i].exception() == nullptr) {
            ++values;
        }
    }
    CHECK(values + cancelled == futures.size());
    CHECK(cancelled >= 1);
    MESSAGE(values << " finished, " << cancelled << " cancelled");
}

// Faults around the pool rather than inside a task: workers killed from
// outside while they start, resource limits when starting workers, a worker
// the pool has condemned, the CPython compatibility policy, and waits on the
// pool that must honour cancellation.
#include "remote_functions.hpp"
#include "support.hpp"

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <set>
#include <string>
#include <fstream>
#include <cerrno>
#include <thread>
#include <atomic>
#include <vector>

#include <fcntl.h>
#include <sys/resource.h>

using coproc::future;
using coproc::task;
using namespace test_support;
using namespace pool_test;

namespace {

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

task<int> square_after(coproc::process_pool* pool, int x) { co_return co_await pool->submit<square>(x); }

// Kills (SIGKILL) every worker that appears, `kills` times, before any
// can say HELLO (they start slowly: COPROC_TEST_WORKER_START_DELAY_MS).
task<int> kill_starting_workers(coproc::event_loop* loop, coproc::process_pool* pool, int kills) {
    std::set<int> killed;
    while (static_cast<int>(killed.size()) < kills) {
        for (int pid : pool->worker_pids()) {
            if (killed.insert(pid).second) ::kill(pid, SIGKILL);
        }
        co_await loop->sleep_for(std::chrono::milliseconds{5});
    }
    co_return static_cast<int>(killed.size());
}

// Lowers this process's open-file limit so that no new descriptor can be
// made, and restores it when destroyed.
class descriptor_limit {
public:
    descriptor_limit() {
        REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved_) == 0);
        // The kernel gives out the lowest free number, and refuses numbers
        // at or above the limit: so nothing new can be opened.
        int lowest_free = 0;
        while (::fcntl(lowest_free, F_GETFD) >= 0) ++lowest_free;
        ::rlimit low = saved_;
        low.rlim_cur = static_cast<rlim_t>(lowest_free);
        REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
    }
    ~descriptor_limit() { restore(); }
    void restore() { ::setrlimit(RLIMIT_NOFILE, &saved_); }

private:
    ::rlimit saved_{};
};

task<std::vector<int>> squares(coproc::process_pool* pool, int count) {
    std::vector<future<int>> futures;
    for (int i = 0; i < count; ++i) futures.push_back(pool->submit<square>(i));
    std::vector<int> values;
    for (auto& pending : futures) values.push_back(co_await std::move(pending));
    co_return values;
}

task<void> fail_then_submit(coproc::process_pool* pool, future<void> failing, int* value) {
    try {
        co_await std::move(failing);
    } catch (const coproc::worker_died&) {
    }
    // Resumed as soon as the failure is known, before the worker's exit is
    // seen: the new task must not go to the worker being killed.
    *value = co_await pool->submit<square>(5);
}

// Returns once the future is final, whatever its outcome.
task<void> settle(future<int>* pending) {
    try {
        (void)co_await *pending;
    } catch (const std::exception&) {
    }
}

// Returns once the future is final, without awaiting it.
task<void> pause_until_done(coproc::event_loop* loop, future<int>* pending) {
    while (!pending->done()) co_await loop->sleep_for(std::chrono::milliseconds{1});
}

// Says it runs on the loop (`in_loop`), then returns once the pool refuses
// submits.
task<void> until_closed(coproc::event_loop* loop, coproc::process_pool* pool, std::atomic<bool>* in_loop) {
    in_loop->store(true);
    for (;;) {
        co_await loop->sleep_for(std::chrono::milliseconds{1});
        try {
            auto probe = pool->submit<square>(1);
            probe.cancel();
        } catch (const coproc::pool_closed&) {
            co_return;
        }
    }
}

task<void> shutdown_task(coproc::process_pool* pool) { co_await pool->shutdown({.wait = true}); }

} // namespace

TEST_CASE("workers killed from outside before they said HELLO cost starts, not the pool") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop,
                              {.max_workers = 1, .environment = {{"COPROC_TEST_WORKER_START_DELAY_MS", "300"}}}};
    auto pending = pool.submit<square>(6);
    CHECK(run_bounded(loop, kill_starting_workers(&loop, &pool, 4), 20s) == 4);
    CHECK(run_bounded(loop, await_future(std::move(pending)), 20s) == 36);
    CHECK(pool.stats().workers_started >= 5);
}

TEST_CASE("a worker program that exits by itself before HELLO still breaks the pool, with the advice") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .worker_executable = "/bin/false"}};
    try {
        run_bounded(loop, await_future(pool.submit<square>(2)), 20s);
        FAIL("no exception");
    } catch (const coproc::broken_process_pool& e) {
        CHECK(contains(e.what(), "run_worker_if_requested"));
        CHECK(contains(e.what(), "exited with code 1"));
    }
}

TEST_CASE("a passing shortage of descriptors costs capacity: queued tasks run on the worker there is") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2, .prefetch = 1, .max_prefetch = 1}};
    CHECK(run_bounded(loop, square_after(&pool, 3)) == 9); // one worker is up
    REQUIRE(pool.stats().workers_alive == 1);
    {
        descriptor_limit limit;
        // Four tasks want a second worker; it cannot be started.
        CHECK(run_bounded(loop, squares(&pool, 4)) == std::vector<int>{0, 1, 4, 9});
        CHECK(pool.stats().workers_started == 1);
    }
    // The limit lifted (and past the longest retry delay): the pool starts
    // a second worker for the next burst.
    run_bounded(loop, pause_for(&loop, 1100ms));
    CHECK(run_bounded(loop, squares(&pool, 8)).size() == 8);
    CHECK(pool.stats().workers_started == 2);
}

TEST_CASE("with no worker and none startable, a task fails with worker_start_failed naming the limit; later submits work") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    {
        descriptor_limit limit;
        try {
            run_bounded(loop, square_after(&pool, 3));
            FAIL("no exception");
        } catch (const coproc::worker_start_failed& e) {
            CHECK(e.code() == EMFILE);
            CHECK(contains(e.what(), "RLIMIT_NOFILE"));
        }
    }
    run_bounded(loop, pause_for(&loop, 1100ms)); // past the longest retry delay
    CHECK(run_bounded(loop, square_after(&pool, 4)) == 16);
}

TEST_CASE("nothing is dispatched to a worker the pool decided to kill (an undecodable ERROR frame)") {
    // The window is the time the killed worker takes to exit: repeated, so
    // that a pool that still dispatches to it is caught.
    int served = 0;
    for (int attempt = 0; attempt < 40; ++attempt) {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1}};
        // A new pool numbers its tasks from 1.
        auto failing = pool.submit<send_undecodable_error>(std::uint64_t{1});
        REQUIRE(failing.id() == 1);
        int value = 0;
        try {
            run_bounded(loop, fail_then_submit(&pool, std::move(failing), &value));
        } catch (const coproc::worker_died& e) {
            FAIL_CHECK("attempt " << attempt << ": " << std::string(e.what()));
        }
        served += value == 25;
    }
    CHECK(served == 40);
}

TEST_CASE("crash_policy::break_pool: every pending and running future fails with its own broken_process_pool") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2, .on_worker_crash = coproc::crash_policy::break_pool, .prefetch = 1}};
    auto running = pool.submit<hang_forever>();
    run_bounded(loop, until_running(&loop, &running));
    const auto other_pids = pool.worker_pids();
    auto crashing = pool.submit<crash_exit>(3);
    std::vector<future<int>> queued;
    for (int i = 0; i < 6; ++i) queued.push_back(pool.submit<square>(i));
    queued.push_back(std::move(running));
    queued.push_back(std::move(crashing));
    std::vector<std::exception_ptr> errors;
    for (auto& pending : queued) {
        run_bounded(loop, settle(&pending));
        CHECK_THROWS_AS(std::rethrow_exception(pending.exception()), coproc::broken_process_pool);
        errors.push_back(pending.exception());
    }
    // Each future has an exception object of its own (CPython gh-101267).
    for (std::size_t i = 0; i < errors.size(); ++i) {
        for (std::size_t j = i + 1; j < errors.size(); ++j) CHECK(errors[i] != errors[j]);
    }
    CHECK_THROWS_AS((void)pool.submit<square>(1), coproc::broken_process_pool);
    run_bounded(loop, shutdown_task(&pool));
    CHECK(pool.worker_pids().empty());
    for (int pid : other_pids) CHECK(::kill(pid, 0) == -1); // the other worker was killed too
}

TEST_CASE("crash_policy::break_pool: a worker killed by the pool for a cancelled task does not break it") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .on_worker_crash = coproc::crash_policy::break_pool}};
    auto running = pool.submit<busy_forever>();
    run_bounded(loop, until_running(&loop, &running));
    CHECK(running.cancel(true));
    CHECK(run_bounded(loop, square_after(&pool, 7)) == 49);
}

TEST_CASE("terminate_workers and kill_workers shut the pool down as CPython 3.14 does") {
    for (const bool kill : {false, true}) {
        CAPTURE(kill);
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 1}};
        auto running = pool.submit<hang_forever>();
        auto pending = pool.submit<square>(2);
        run_bounded(loop, until_running(&loop, &running));
        if (kill) {
            pool.kill_workers();
        } else {
            pool.terminate_workers();
        }
        CHECK(pending.cancelled()); // cancel_futures
        try {
            run_bounded(loop, await_future(std::move(running)));
            FAIL("no exception");
        } catch (const coproc::worker_died& e) {
            CHECK(e.signal() == (kill ? SIGKILL : SIGTERM));
            CHECK(contains(e.what(), kill ? "kill_workers()" : "terminate_workers()"));
        }
        CHECK_THROWS_AS((void)pool.submit<square>(1), coproc::pool_closed);
        run_bounded(loop, shutdown_task(&pool));
        CHECK(pool.stats().workers_started == 1); // no replacement
    }
}

TEST_CASE("restart_workers cancels what runs, requeues what was sent, and the pool serves on with new workers") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 2, .max_prefetch = 2}};
    auto running = pool.submit<busy_forever>();
    auto sent = pool.submit<square>(3);
    run_bounded(loop, until_running(&loop, &running));
    pool.restart_workers();
    CHECK(running.cancelled());
    CHECK(run_bounded(loop, await_future(std::move(sent))) == 9);
    CHECK(run_bounded(loop, square_after(&pool, 4)) == 16);
    CHECK(pool.stats().workers_started == 2);
}

TEST_CASE("with_timeout bounds shutdown(wait) and submit_async's wait for room: both honour cancellation") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 1, .max_pending = 1}};
    auto running = pool.submit<hang_forever>();
    run_bounded(loop, until_running(&loop, &running));
    auto queued = pool.submit<square>(1);
    // The queue is full: the wait for room ends with the deadline.
    CHECK_THROWS_AS((void)loop.run(coproc::with_timeout(pool.submit_async<square>(2), 100ms)), coproc::timeout_error);
    // A task that never ends: the graceful shutdown ends with the deadline.
    CHECK_THROWS_AS(loop.run(coproc::with_timeout(shutdown_task(&pool), 200ms)), coproc::timeout_error);
    CHECK_THROWS_AS((void)pool.submit<square>(3), coproc::pool_closed); // it stays closed
}

TEST_CASE("a worker that sends part of a frame and then nothing is killed after frame_timeout; its task fails saying so") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .frame_timeout = 200ms}};
    auto silent = pool.submit<send_partial_frame>(std::uint64_t{1}, std::uint32_t{1000});
    REQUIRE(silent.id() == 1);
    try {
        run_bounded(loop, await_future(std::move(silent)), 20s);
        FAIL("no exception");
    } catch (const coproc::worker_died& e) {
        CHECK(contains(e.what(), "frame_timeout"));
    }
    CHECK(run_bounded(loop, square_after(&pool, 8)) == 64);
}

TEST_CASE("a failing initializer is reported on stderr, where a user looks, even when no future is awaited") {
    const std::string printed = capture_stderr([] {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .initializer = coproc::call<failing_initializer>("no config")}};
        auto pending = pool.submit<square>(2);
        run_bounded(loop, pause_until_done(&loop, &pending));
    });
    CHECK(contains(printed, "initializer"));
    CHECK(contains(printed, "no config"));
}

TEST_CASE("shutdown_blocking fails instead of hanging when the pool's loop stops for good before the shutdown ran") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto running = pool.submit<sleep_then>(2000, 1); // the shutdown must wait for it
    run_bounded(loop, until_running(&loop, &running));
    std::atomic<bool> in_loop{false};
    std::string error;
    std::thread closer([&] {
        while (!in_loop.load()) std::this_thread::yield(); // the loop runs: this posts to it
        try {
            pool.shutdown_blocking({.wait = true});
        } catch (const std::logic_error& e) {
            error = e.what();
        }
    });
    // The loop runs until the shutdown has begun (the pool refuses
    // submits), then stops for good.
    run_bounded(loop, until_closed(&loop, &pool, &in_loop));
    closer.join();
    CHECK(contains(error, "stopped running before the shutdown completed"));
}

TEST_CASE("workers are recognisable in ps and top: coproc workers of which program") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    const int pid = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    const std::string program = program_invocation_short_name;
    std::ifstream comm{"/proc/" + std::to_string(pid) + "/comm"};
    std::string thread_name;
    std::getline(comm, thread_name);
    CHECK(thread_name == ("coproc:" + program).substr(0, 15));
    std::ifstream cmdline{"/proc/" + std::to_string(pid) + "/cmdline"};
    std::string first;
    std::getline(cmdline, first, '\0');
    CHECK(first == "coproc-worker:" + program);
}

TEST_CASE("stats() shows a cancelled task still running in its worker during the grace, until the worker is killed") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = 300ms}};
    auto running = pool.submit<busy_forever>();
    run_bounded(loop, until_running(&loop, &running));
    CHECK(pool.stats().tasks_cancelling == 0);
    CHECK(running.cancel());
    CHECK(pool.stats().tasks_cancelling == 1);
    CHECK(pool.stats().tasks_running == 0);
    CHECK(run_bounded(loop, square_after(&pool, 3)) == 9); // after the grace, on a replacement
    CHECK(pool.stats().tasks_cancelling == 0);
    CHECK(pool.stats().workers_killed_for_cancel == 1);
}

// AddressSanitizer and ThreadSanitizer reserve terabytes of address space,
// and their allocators abort rather than throw on absurd sizes.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool sanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool sanitized = true;
#else
constexpr bool sanitized = false;
#endif
#else
constexpr bool sanitized = false;
#endif

TEST_CASE("worker_address_space_limit: an allocation beyond it fails only its task, with memory_limit_exceeded naming the limit") {
    if (sanitized) {
        MESSAGE("skipped: a sanitizer reserves more address space than any limit would allow (the worker ignores it)");
        return;
    }
    coproc::event_loop loop;
    constexpr std::size_t limit = std::size_t{1} << 30;
    coproc::process_pool pool{loop, {.max_workers = 1, .worker_address_space_limit = limit}};
    const int pid = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    // Under the limit: served as usual.
    CHECK(run_bounded(loop, await_future(pool.submit<allocate_mebibytes>(64))) == std::size_t{64} << 20);
    // Beyond it: the task fails, saying which limit refused it.
    try {
        run_bounded(loop, await_future(pool.submit<allocate_mebibytes>(2048)));
        FAIL("an allocation of 2 GiB under a 1 GiB limit succeeded");
    } catch (const coproc::memory_limit_exceeded& e) {
        CHECK(e.limit() == limit);
        const std::string what = e.what();
        CHECK(what.find("allocate_mebibytes") != std::string::npos);
        CHECK(what.find("worker_address_space_limit") != std::string::npos);
        CHECK(what.find(std::to_string(limit)) != std::string::npos);
    }
    // Only that task: the same worker serves on.
    CHECK(run_bounded(loop, await_future(pool.submit<worker_pid>())) == pid);
    CHECK(pool.stats().workers_started == 1);
}

TEST_CASE("without worker_address_space_limit, a worker's allocation failure travels as std::bad_alloc") {
    if (sanitized) {
        MESSAGE("skipped: a sanitizer's allocator aborts on such a size instead of throwing");
        return;
    }
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    // 2^46 bytes (64 TiB): more than memory and swap, which the kernel's
    // default overcommit heuristic refuses at once: std::bad_alloc.
    CHECK_THROWS_AS(run_bounded(loop, await_future(pool.submit<allocate_mebibytes>(1 << 26))), std::bad_alloc);
}

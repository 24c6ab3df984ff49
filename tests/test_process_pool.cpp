// coproc::process_pool: results and errors come back from worker processes,
// a crash fails only its own tasks, bad frames are rejected, shutdown ends
// every future, and no process or descriptor is left behind.
#include "remote_functions.hpp"
#include "support.hpp"

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>
#include <typeinfo>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <spawn.h>
#include <set>
#include <stdexcept>
#include <string>
#include <sys/wait.h>
#include <system_error>
#include <thread>
#include <vector>

extern char** environ;

using coproc::future;
using coproc::task;
using namespace test_support;
using namespace pool_test;

namespace {

// True when this process has no child at all, running or zombie.
bool no_children() { return ::waitpid(-1, nullptr, WNOHANG) == -1 && errno == ECHILD; }

// Checks, at the end of a test, that the pool left no process and no fd.
class leak_check {
public:
    leak_check() : fds_(count_open_fds()) {}
    void verify() const {
        CHECK(no_children());
        CHECK(count_open_fds() == fds_);
    }

private:
    int fds_;
};

// What became of one future: its value, or the type and message of its error.
// Sends `signal` to every worker of the pool, as an operator would.
void signal_workers(coproc::process_pool& pool, int signal) {
    for (int pid : pool.worker_pids()) ::kill(pid, signal);
}

struct outcome {
    int value = 0;
    std::string error; // empty for a value
    std::string what;
};

task<std::vector<outcome>> settle_all(std::vector<future<int>> futures) {
    std::vector<outcome> outcomes;
    for (auto& pending : futures) {
        outcome result;
        try {
            result.value = co_await std::move(pending);
        } catch (const coproc::worker_died& e) {
            result.error = "worker_died";
            result.what = e.what();
        } catch (const coproc::cancelled_error& e) {
            result.error = "cancelled";
            result.what = e.what();
        } catch (const coproc::broken_process_pool& e) {
            result.error = "broken";
            result.what = e.what();
        } catch (const std::exception& e) {
            result.error = "other";
            result.what = e.what();
        }
        outcomes.push_back(result);
    }
    co_return outcomes;
}

task<int> submit_square(coproc::process_pool* pool, int x) { co_return co_await pool->submit<square>(x); }

task<void> void_task(coproc::process_pool* pool, int milliseconds) { co_await pool->submit<sleep_ms>(milliseconds); }

// Submits `count` tasks of `milliseconds` each and returns the most tasks
// that were ever in the worker at once (dispatched or running).
task<std::size_t> most_in_worker(coproc::event_loop* loop, coproc::process_pool* pool, int count, int milliseconds) {
    std::vector<future<int>> futures;
    for (int i = 0; i < count; ++i) futures.push_back(pool->submit<sleep_then>(milliseconds, i));
    std::size_t most = 0;
    while (pool->stats().tasks_completed < static_cast<std::size_t>(count)) {
        most = std::max(most, pool->stats().tasks_running);
        co_await loop->schedule();
    }
    co_return most;
}

// The pool's live workers once none is left, or when `wait` has passed.
task<std::size_t> workers_alive_within(coproc::event_loop* loop, coproc::process_pool* pool, std::chrono::milliseconds wait) {
    const auto deadline = std::chrono::steady_clock::now() + wait;
    while (pool->stats().workers_alive > 0 && std::chrono::steady_clock::now() < deadline) {
        co_await loop->sleep_for(std::chrono::milliseconds{10});
    }
    co_return pool->stats().workers_alive;
}

task<std::vector<int>> submit_async_many(coproc::process_pool* pool, int count, std::size_t* most_queued) {
    std::vector<future<int>> futures;
    for (int i = 0; i < count; ++i) {
        futures.push_back(co_await pool->submit_async<square>(i + 10));
        *most_queued = std::max(*most_queued, pool->stats().tasks_queued);
    }
    co_return co_await await_all(std::move(futures));
}

task<void> wait_for_flag(coproc::event_loop* loop, const std::atomic<bool>* flag) {
    while (!flag->load()) co_await loop->sleep_for(1ms);
}

task<void> shutdown_blocking_on_loop(coproc::process_pool* pool, bool* refused) {
    try {
        pool->shutdown_blocking();
    } catch (const std::logic_error&) {
        *refused = true;
    }
    co_return;
}

// True while `pid` exists and is not a zombie (an orphan's zombie waits for
// whichever process adopted it).
bool process_alive(int pid) {
    std::FILE* stat = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
    if (stat == nullptr) return false;
    int ignored = 0;
    char state = '?';
    char name[256];
    const int matched = std::fscanf(stat, "%d %255s %c", &ignored, name, &state);
    std::fclose(stat);
    return matched == 3 && state != 'Z' && state != 'X';
}

task<std::vector<int>> map_squares(coproc::process_pool* pool, std::vector<int> inputs) {
    co_return co_await pool->map<square>(inputs, {.chunksize = 2});
}

task<void> wait_for_count(coproc::event_loop* loop, const std::atomic<int>* count, int expected) {
    while (count->load() < expected) co_await loop->sleep_for(1ms);
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

bool ends_with(const std::string& text, const std::string& end) {
    return text.size() >= end.size() && text.compare(text.size() - end.size(), end.size(), end) == 0;
}

// The exception `error` holds, when it is exactly an E (not a subclass).
template <class E>
std::optional<E> exactly(std::exception_ptr error) {
    try {
        std::rethrow_exception(std::move(error));
    } catch (const E& e) {
        if (typeid(e) == typeid(E)) return e;
    } catch (...) {
    }
    return std::nullopt;
}

// What a future ended with, or nullptr when it yielded a value.
template <class T>
std::exception_ptr failure_of(coproc::event_loop& loop, future<T> pending) {
    try {
        run_bounded(loop, await_future(std::move(pending)));
    } catch (...) {
        return std::current_exception();
    }
    return nullptr;
}

} // namespace

TEST_CASE("submit runs the function in a worker process and yields its value") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 2}};
        CHECK(run_bounded(loop, submit_square(&pool, 7)) == 49);
        CHECK(run_bounded(loop, await_future(pool.submit<greet>("pool", 2))) == "hello pool;hello pool;");
        const int pid = run_bounded(loop, await_future(pool.submit<worker_pid>()));
        CHECK(pid != ::getpid());
        run_bounded(loop, void_task(&pool, 1));
        const auto stats = pool.stats();
        CHECK(stats.tasks_completed == 4);
        CHECK(stats.workers_started >= 1);
    }
    leaks.verify();
}

TEST_CASE("each standard exception type is rethrown as the same type with the same what()") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 2}};
        auto raise = [&](const char* type) { return run_bounded(loop, await_future(pool.submit<throw_standard>(type, "message"))); };
        CHECK_THROWS_WITH_AS(raise("invalid_argument"), "message", std::invalid_argument);
        CHECK_THROWS_WITH_AS(raise("out_of_range"), "message", std::out_of_range);
        CHECK_THROWS_WITH_AS(raise("domain_error"), "message", std::domain_error);
        CHECK_THROWS_WITH_AS(raise("length_error"), "message", std::length_error);
        CHECK_THROWS_WITH_AS(raise("logic_error"), "message", std::logic_error);
        CHECK_THROWS_WITH_AS(raise("runtime_error"), "message", std::runtime_error);
        CHECK_THROWS_WITH_AS(raise("range_error"), "message", std::range_error);
        CHECK_THROWS_WITH_AS(raise("overflow_error"), "message", std::overflow_error);
        CHECK_THROWS_WITH_AS(raise("underflow_error"), "message", std::underflow_error);
        try {
            raise("system_error");
            FAIL("no exception");
        } catch (const std::system_error& e) {
            CHECK(e.code() == std::errc::no_such_file_or_directory);
            CHECK(contains(e.what(), "message"));
        }
        // The exact type travels: a logic_error is not turned into its base.
        try {
            raise("out_of_range");
        } catch (const std::logic_error& e) {
            CHECK(typeid(e) == typeid(std::out_of_range));
        }
    }
    leaks.verify();
}

TEST_CASE("any other exception arrives as remote_error with its type name, what() and the worker's pid") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    const int pid = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    try {
        run_bounded(loop, await_future(pool.submit<throw_custom>("custom trouble")));
        FAIL("no exception");
    } catch (const coproc::remote_error& e) {
        CHECK(e.type_name() == "pool_test::custom_failure");
        CHECK(e.message() == "custom trouble");
        CHECK(e.pid() == pid);
        CHECK(contains(e.what(), "throw_custom"));
    }
}

TEST_CASE("each coproc exception type thrown by a task is rethrown as the same type with the same what() and accessors") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto raise = [&](const char* type, const char* message) { return failure_of(loop, pool.submit<throw_coproc>(type, message)); };

    const auto plain = exactly<coproc::error>(raise("error", "plain trouble"));
    REQUIRE(plain);
    CHECK(std::string(plain->what()) == "plain trouble");

    const auto timeout = exactly<coproc::timeout_error>(raise("timeout_error", "inner deadline"));
    REQUIRE(timeout);
    CHECK(std::string(timeout->what()) == "inner deadline");

    const auto cancelled = exactly<coproc::cancelled_error>(raise("cancelled_error", "inner stop"));
    REQUIRE(cancelled);
    CHECK(std::string(cancelled->what()) == "inner stop");

    const auto closed = exactly<coproc::pool_closed>(raise("pool_closed", ""));
    REQUIRE(closed);
    CHECK(std::string(closed->what()) == coproc::pool_closed().what());

    const auto full = exactly<coproc::queue_full>(raise("queue_full", ""));
    REQUIRE(full);
    CHECK(std::string(full->what()) == coproc::queue_full().what());

    const auto broken = exactly<coproc::broken_process_pool>(raise("broken_process_pool", "inner pool broke"));
    REQUIRE(broken);
    CHECK(std::string(broken->what()) == "inner pool broke");
    const auto cause = exactly<std::invalid_argument>(broken->cause());
    REQUIRE(cause);
    CHECK(std::string(cause->what()) == "the cause");

    const auto died = exactly<coproc::worker_died>(raise("worker_died", "inner worker died"));
    REQUIRE(died);
    CHECK(std::string(died->what()) == "inner worker died");
    CHECK(died->pid() == 1234);
    CHECK(died->signal() == SIGSEGV);
    CHECK(died->exit_code() == -1);
    CHECK(died->function() == "inner_function");

    const auto remote = exactly<coproc::remote_error>(raise("remote_error", "inner trouble"));
    REQUIRE(remote);
    CHECK(std::string(remote->what()) == coproc::remote_error("inner::failure", "inner trouble", 4321, "inner_function").what());
    CHECK(remote->type_name() == "inner::failure");
    CHECK(remote->message() == "inner trouble");
    CHECK(remote->pid() == 4321);
    CHECK(remote->function() == "inner_function");
    CHECK(remote->std_exception());

    const auto start_failed = exactly<coproc::worker_start_failed>(raise("worker_start_failed", "no descriptors"));
    REQUIRE(start_failed);
    CHECK(std::string(start_failed->what()) == "no descriptors");
    CHECK(start_failed->code() == EMFILE);

    const auto no_ring = exactly<coproc::io_uring_unavailable>(raise("io_uring_unavailable", "seccomp says no"));
    REQUIRE(no_ring);
    CHECK(std::string(no_ring->what()) == "seccomp says no");
    CHECK(no_ring->cause() == EPERM);
}

TEST_CASE("a user type derived from coproc::error arrives as remote_error, never as its base, unless registered") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    const auto derived = exactly<coproc::remote_error>(failure_of(loop, pool.submit<throw_coproc>("derived", "own trouble")));
    REQUIRE(derived);
    CHECK(derived->type_name() == "pool_test::derived_pool_error");
    CHECK(derived->message() == "own trouble");

    const auto registered = exactly<budget_exhausted>(failure_of(loop, pool.submit<throw_coproc>("registered derived", "alice")));
    REQUIRE(registered);
    CHECK(registered->account == "alice");
    CHECK(std::string(registered->what()) == "the budget of alice is exhausted");
}

TEST_CASE("an exception not derived from std::exception arrives as remote_error naming its type, in a sentence that ends well") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    const int pid = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    const auto thrown = exactly<coproc::remote_error>(failure_of(loop, pool.submit<throw_standard>("int", "")));
    REQUIRE(thrown);
    CHECK(thrown->type_name() == "int");
    CHECK(thrown->message().empty());
    CHECK_FALSE(thrown->std_exception());
    const std::string what = thrown->what();
    CHECK(contains(what, "throw_standard raised an exception of type int (not derived from std::exception) in worker " +
                             std::to_string(pid)));
    CHECK(ends_with(what, std::to_string(pid)));
}

TEST_CASE("an exception whose what() is empty arrives as remote_error saying so, not ending in a dangling colon") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    const int pid = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    const auto empty = exactly<coproc::remote_error>(failure_of(loop, pool.submit<throw_custom>("")));
    REQUIRE(empty);
    CHECK(empty->std_exception());
    const std::string what = empty->what();
    CHECK(contains(what, "raised pool_test::custom_failure in worker " + std::to_string(pid) + " (its what() was empty)"));
    CHECK_FALSE(ends_with(what, ": "));
}

// Submits 100 ordinary tasks, four that crash their worker in four ways
// (one hangs until it is killed from outside), then 100 more; returns every
// outcome, crashes first.
task<std::vector<outcome>> crash_scenario(coproc::event_loop* loop, coproc::process_pool* pool, std::string pid_file) {
    std::vector<future<int>> futures;
    futures.push_back(pool->submit<crash_segfault>());
    futures.push_back(pool->submit<crash_abort>());
    futures.push_back(pool->submit<crash_exit>(3));
    futures.push_back(pool->submit<write_pid_and_hang>(pid_file));
    for (int i = 0; i < 200; ++i) futures.push_back(pool->submit<sleep_then>(i % 3, i));
    // The outside killer: wait for the hanging task to say where it runs.
    int pid = 0;
    for (int attempt = 0; attempt < 2000 && pid == 0; ++attempt) {
        if (std::FILE* file = std::fopen(pid_file.c_str(), "r")) {
            if (std::fscanf(file, "%d", &pid) != 1) pid = 0;
            std::fclose(file);
        }
        if (pid == 0) co_await loop->sleep_for(5ms);
    }
    if (pid > 0) ::kill(pid, SIGKILL);
    co_return co_await settle_all(std::move(futures));
}

TEST_CASE("a callable object runs in a worker with the state it had when submitted") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    const scaler in_metres{3, " m"};
    scaler in_feet{10, " ft"};
    auto metres = pool.submit(in_metres, 7);
    auto feet = pool.submit(in_feet, 7);
    in_feet.factor = 1000; // changing it afterwards changes nothing
    CHECK(run_bounded(loop, await_future(std::move(metres))) == "21 m");
    CHECK(run_bounded(loop, await_future(std::move(feet))) == "70 ft");
}

TEST_CASE("a registered exception type travels as itself, state included") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    try {
        run_bounded(loop, await_future(pool.submit<exceed_quota>("alice", 5)));
        FAIL("no exception");
    } catch (const quota_exceeded& e) {
        CHECK(e.who == "alice");
        CHECK(e.limit == 5);
        CHECK(std::string(e.what()) == "alice exceeded 5");
    }
}

TEST_CASE("crash isolation: a segfault, abort, exit(3) or outside SIGKILL fails only its own task") {
    leak_check leaks;
    const auto pid_file = std::filesystem::temp_directory_path() / ("coproc-test-pid-" + std::to_string(::getpid()));
    // Under AddressSanitizer a worker would catch its own SIGSEGV and exit(1);
    // let the signal kill it, as it would in a normal build.
    const char* asan = std::getenv("ASAN_OPTIONS");
    const std::string asan_options = std::string(asan != nullptr ? asan : "") + ":handle_segv=0";
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 2, .environment = {{"ASAN_OPTIONS", asan_options}}}};
        const auto outcomes = run_bounded(loop, crash_scenario(&loop, &pool, pid_file.string()), 60s);
        REQUIRE(outcomes.size() == 204);
        for (std::size_t i = 0; i < 4; ++i) {
            CAPTURE(i);
            CAPTURE(outcomes[i].what);
            CHECK(outcomes[i].error == "worker_died");
        }
        CHECK(contains(outcomes[0].what, "signal 11"));
        CHECK(contains(outcomes[0].what, "crash_segfault"));
        CHECK(contains(outcomes[1].what, "signal 6"));
        CHECK(contains(outcomes[2].what, "exited with code 3"));
        CHECK(contains(outcomes[3].what, "signal 9"));
        int ok = 0;
        for (std::size_t i = 4; i < outcomes.size(); ++i) {
            CAPTURE(i);
            CAPTURE(outcomes[i].what);
            CHECK(outcomes[i].error.empty());
            if (outcomes[i].error.empty() && outcomes[i].value == static_cast<int>(i - 4)) ++ok;
        }
        CHECK(ok == 200);
        const auto stats = pool.stats();
        CHECK(stats.tasks_failed == 4);
        CHECK(stats.tasks_completed == 200);
        // Each crash takes its worker with it, so four workers at least ran
        // them; whether a fifth is needed depends on when the last crash
        // comes (a task requeued from a dead worker may run last).
        CHECK(stats.workers_started >= 4);
    }
    std::filesystem::remove(pid_file);
    leaks.verify();
}

TEST_CASE("worker_died carries the pid, the signal or exit code and the function") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    try {
        run_bounded(loop, await_future(pool.submit<crash_exit>(7)));
        FAIL("no exception");
    } catch (const coproc::worker_died& e) {
        CHECK(e.exit_code() == 7);
        CHECK(e.signal() == 0);
        CHECK(e.pid() > 0);
        CHECK(e.function() == "pool_test::crash_exit");
    }
    try {
        run_bounded(loop, await_future(pool.submit<crash_abort>()));
        FAIL("no exception");
    } catch (const coproc::worker_died& e) {
        CHECK(e.signal() == SIGABRT);
        CHECK(e.exit_code() == -1);
    }
    CHECK(run_bounded(loop, submit_square(&pool, 5)) == 25); // the pool keeps serving
}

TEST_CASE("max_pending bounds the queue: submit throws queue_full, try_submit returns nothing, submit_async waits") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 1, .max_pending = 3}};
        std::vector<future<int>> futures;
        // The loop is not running yet, so every submit stays pending.
        for (int i = 0; i < 3; ++i) futures.push_back(pool.submit<square>(i));
        CHECK_THROWS_AS((void)pool.submit<square>(3), coproc::queue_full);
        CHECK_FALSE(pool.try_submit<square>(3).has_value());
        CHECK(pool.stats().tasks_queued == 3);
        // submit_async waits for room: 30 more, never more than 3 queued.
        std::size_t most_queued = 0;
        const auto values = run_bounded(loop, submit_async_many(&pool, 30, &most_queued), 30s);
        CHECK(most_queued <= 3);
        REQUIRE(values.size() == 30);
        for (int i = 0; i < 30; ++i) CHECK(values[static_cast<std::size_t>(i)] == (i + 10) * (i + 10));
        CHECK(run_bounded(loop, await_all(std::move(futures))) == std::vector<int>{0, 1, 4});
    }
    leaks.verify();
}

TEST_CASE("idle_timeout: idle workers exit, and workers start again on demand") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .idle_timeout = 300ms}};
        const int first = run_bounded(loop, await_future(pool.submit<worker_pid>()));
        CHECK(run_bounded(loop, workers_alive_within(&loop, &pool, 10'000ms), 20s) == 0);
        const int second = run_bounded(loop, await_future(pool.submit<worker_pid>()));
        CHECK(second != first);
        CHECK(pool.stats().workers_started == 2);
        // A worker kept busy does not time out.
        std::vector<future<int>> futures;
        for (int i = 0; i < 10; ++i) futures.push_back(pool.submit<sleep_then>(10, i));
        const auto values = run_bounded(loop, await_all(std::move(futures)));
        CHECK(values.size() == 10);
        CHECK(pool.stats().workers_started == 2);
    }
    leaks.verify();
}

TEST_CASE("the initializer runs once in each worker before any task") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2, .initializer = coproc::call<initialize>("ready")}};
    std::vector<future<std::string>> futures;
    for (int i = 0; i < 20; ++i) futures.push_back(pool.submit<initialized_label>());
    for (const auto& label : run_bounded(loop, await_all(std::move(futures)))) CHECK(label == "ready x1");
}

TEST_CASE("a failing initializer breaks the pool: pending and later submits fail with broken_process_pool carrying its error") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 2, .initializer = coproc::call<failing_initializer>("no database")}};
        std::vector<future<int>> futures;
        for (int i = 0; i < 5; ++i) futures.push_back(pool.submit<square>(i));
        const auto outcomes = run_bounded(loop, settle_all(std::move(futures)));
        for (const auto& result : outcomes) {
            CHECK(result.error == "broken");
            CHECK(contains(result.what, "initializer pool_test::failing_initializer failed"));
            CHECK(contains(result.what, "no database"));
        }
        try {
            (void)pool.submit<square>(1);
            FAIL("no exception");
        } catch (const coproc::broken_process_pool& e) {
            REQUIRE(e.cause() != nullptr);
            CHECK_THROWS_WITH_AS(std::rethrow_exception(e.cause()), "no database", std::runtime_error);
        }
    }
    leaks.verify();
}

TEST_CASE("an initializer that crashes its workers breaks the pool instead of restarting them for ever") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .initializer = coproc::call<crashing_initializer>()}};
        try {
            run_bounded(loop, submit_square(&pool, 3));
            FAIL("no exception");
        } catch (const coproc::broken_process_pool& e) {
            CHECK(contains(e.what(), "while running the pool's initializer"));
        }
    }
    leaks.verify();
}

TEST_CASE("prefetch adapts: short tasks are pipelined deeper than prefetch, long ones are not, and a fixed depth stays fixed") {
    coproc::event_loop loop;
    {
        coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 2}};
        CHECK(run_bounded(loop, most_in_worker(&loop, &pool, 2000, 0), 30s) > 2);
    }
    {
        coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 2, .max_prefetch = 2}};
        CHECK(run_bounded(loop, most_in_worker(&loop, &pool, 2000, 0), 30s) <= 2);
    }
    {
        coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 2}};
        CHECK(run_bounded(loop, most_in_worker(&loop, &pool, 12, 20), 30s) <= 2); // 20 ms tasks
    }
}

TEST_CASE("a burst whose first tasks are short is shared with a worker still starting, not all prefetched to the ready one") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    CHECK(run_bounded(loop, await_future(pool.submit<square>(2))) == 4);
    REQUIRE(pool.stats().workers_started == 1); // one worker ready; the second starts with the burst
    std::vector<future<int>> futures;
    // 50 ms each after the first six: the second worker says HELLO long
    // before the first could have done 30 of them, even when a sanitizer on a
    // loaded machine slows its start.
    for (int i = 0; i < 40; ++i) futures.push_back(pool.submit<sleep_then_pid>(i < 6 ? 0 : 50));
    const auto pids = run_bounded(loop, await_all(std::move(futures)), 30s);
    std::map<int, int> tasks_per_worker;
    for (const int pid : pids) ++tasks_per_worker[pid];
    REQUIRE(tasks_per_worker.size() == 2);
    for (const auto& [pid, count] : tasks_per_worker) CHECK(count >= 10);
}

TEST_CASE("max_retries reruns a task whose worker died on a fresh worker; without it the task fails") {
    const auto marker = std::filesystem::temp_directory_path() / ("coproc-test-retry-" + std::to_string(::getpid()));
    std::filesystem::remove(marker);
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1}};
        CHECK(run_bounded(loop, await_future(pool.submit_with<crash_once>({.max_retries = 1}, marker.string(), 42))) == 42);
        CHECK(pool.stats().workers_started == 2);
        std::filesystem::remove(marker);
        CHECK_THROWS_AS(run_bounded(loop, await_future(pool.submit<crash_once>(marker.string(), 42))), coproc::worker_died);
    }
    std::filesystem::remove(marker);
}

TEST_CASE("max_tasks_per_child=1 over 200 tasks: every task runs exactly once, each on a fresh worker") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 2, .max_tasks_per_child = 1}};
        std::vector<future<int>> futures;
        for (int i = 0; i < 200; ++i) futures.push_back(pool.submit<worker_pid>());
        const auto pids = run_bounded(loop, await_all(std::move(futures)), 60s);
        CHECK(pids.size() == 200);
        CHECK(std::set<int>(pids.begin(), pids.end()).size() == 200);
        CHECK(pool.stats().workers_started == 200);
        CHECK(pool.stats().tasks_completed == 200);
    }
    leaks.verify();
}

TEST_CASE("a result the parent cannot deserialize fails that future only, naming the function and the worker") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    const int pid = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    try {
        run_bounded(loop, await_future(pool.submit<make_unreadable>(3)));
        FAIL("no exception");
    } catch (const coproc::error& e) {
        CHECK(contains(e.what(), "make_unreadable"));
        CHECK(contains(e.what(), std::to_string(pid)));
        CHECK(contains(e.what(), "refuses to be loaded"));
    }
    CHECK(run_bounded(loop, await_future(pool.submit<worker_pid>())) == pid); // same worker, still in sync
}

TEST_CASE("a result that fails to serialize in the worker fails that future; the worker stays in sync") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    const int pid = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    CHECK_THROWS_WITH_AS(run_bounded(loop, await_future(pool.submit<make_unwritable>(3))), "this type refuses to be saved",
                         std::runtime_error);
    CHECK(run_bounded(loop, await_future(pool.submit<worker_pid>())) == pid);
    CHECK(run_bounded(loop, submit_square(&pool, 9)) == 81);
}

TEST_CASE("an argument that fails to serialize fails its future at once; no worker is involved") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto rejected = pool.submit<take_unwritable>(unwritable{4});
    CHECK(rejected.done());
    CHECK_FALSE(rejected.cancelled());
    CHECK_THROWS_WITH_AS(std::rethrow_exception(rejected.exception()), "this type refuses to be saved", std::runtime_error);
    CHECK(pool.stats().workers_started == 0);
    CHECK(pool.stats().tasks_failed == 1);
}

TEST_CASE("an argument that fails to deserialize in the worker fails that future; the worker stays alive") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    const int pid = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    CHECK_THROWS_WITH_AS(run_bounded(loop, await_future(pool.submit<take_unreadable>(unreadable{5}))),
                         "this type refuses to be loaded", std::runtime_error);
    CHECK(run_bounded(loop, await_future(pool.submit<worker_pid>())) == pid);
}

TEST_CASE("a worker that sends a malformed or oversized frame is killed; its task fails clearly; the pool serves on") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .max_frame_size = 1 << 20}};
        try {
            run_bounded(loop, await_future(pool.submit<send_garbage_frame>()));
            FAIL("no exception");
        } catch (const coproc::worker_died& e) {
            CHECK(contains(e.what(), "unknown kind 999"));
            CHECK(contains(e.what(), "killed by the pool"));
        }
        try {
            run_bounded(loop, await_future(pool.submit<send_oversized_frame>()));
            FAIL("no exception");
        } catch (const coproc::worker_died& e) {
            CHECK(contains(e.what(), "max_frame_size"));
        }
        try {
            run_bounded(loop, await_future(pool.submit<send_frame_for_unknown_work>()));
            FAIL("no exception");
        } catch (const coproc::worker_died& e) {
            CHECK(contains(e.what(), "which it does not hold"));
        }
        CHECK(run_bounded(loop, submit_square(&pool, 4)) == 16);
    }
    leaks.verify();
}

TEST_CASE("a large result cut off by its worker's death fails that task with worker_died; the pool serves on") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1}};
        try {
            // The pool's first task has work id 1.
            run_bounded(loop, await_future(pool.submit<send_block_result_by_hand>(1, 4u << 20, 0, 7)), 30s);
            FAIL("no exception");
        } catch (const coproc::worker_died& e) {
            CHECK(e.exit_code() == 7);
        }
        CHECK(run_bounded(loop, submit_square(&pool, 5)) == 25);
    }
    leaks.verify();
}

TEST_CASE("a worker terminated while a large result arrives fails that task; cancelling one that is arriving ends it cancelled") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = std::chrono::milliseconds{100}}};
        auto arriving = pool.submit<send_block_result_by_hand>(1, 8u << 20, 60'000, -1);
        run_bounded(loop, until_running(&loop, &arriving));
        run_bounded(loop, pause_for(&loop, 100ms)); // half of it is in, the rest is 60 s away
        signal_workers(pool, SIGTERM); // from outside
        CHECK_THROWS_AS(run_bounded(loop, await_future(std::move(arriving)), 30s), coproc::worker_died);
        CHECK(run_bounded(loop, submit_square(&pool, 6)) == 36);

        // Work id 3 (the square was 2): cancelled while half of it is in.
        auto cancelled = pool.submit<send_block_result_by_hand>(3, 8u << 20, 60'000, -1);
        run_bounded(loop, until_running(&loop, &cancelled));
        run_bounded(loop, pause_for(&loop, 100ms));
        CHECK(cancelled.cancel());
        CHECK_THROWS_AS(run_bounded(loop, await_future(std::move(cancelled))), coproc::cancelled_error);
        CHECK(run_bounded(loop, submit_square(&pool, 7), 30s) == 49); // on a replacement: that one was killed
        CHECK(pool.stats().workers_started == 3);

        // Work id 5: its future dropped while half of it is in, then its
        // worker terminated.
        {
            auto dropped = pool.submit<send_block_result_by_hand>(5, 8u << 20, 60'000, -1);
            run_bounded(loop, until_running(&loop, &dropped));
            run_bounded(loop, pause_for(&loop, 100ms));
        }
        signal_workers(pool, SIGTERM);
        CHECK(run_bounded(loop, submit_square(&pool, 8), 30s) == 64);
        CHECK(pool.stats().workers_started == 4);

        // A pool destroyed while half of a large result is in: the value
        // being filled outlives the pool's own references to its item
        // (a use after free would end the test under AddressSanitizer).
        {
            coproc::process_pool doomed{loop, {.max_workers = 1}};
            auto arriving = doomed.submit<send_block_result_by_hand>(1, 8u << 20, 60'000, -1);
            run_bounded(loop, until_running(&loop, &arriving));
            run_bounded(loop, pause_for(&loop, 100ms));
        }
        run_bounded(loop, pause_for(&loop, 100ms));
        CHECK(run_bounded(loop, submit_square(&pool, 9), 30s) == 81);
    }
    leaks.verify();
}

TEST_CASE("10,000 concurrent futures all complete with their own values") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    std::vector<future<int>> futures;
    for (int i = 0; i < 10'000; ++i) futures.push_back(pool.submit<square>(i % 1000));
    CHECK(pool.stats().tasks_queued == 10'000);
    const auto values = run_bounded(loop, await_all(std::move(futures)), 60s);
    REQUIRE(values.size() == 10'000);
    int right = 0;
    for (int i = 0; i < 10'000; ++i) right += values[static_cast<std::size_t>(i)] == (i % 1000) * (i % 1000);
    CHECK(right == 10'000);
    CHECK(pool.stats().tasks_completed == 10'000);
}

TEST_CASE("submit from 4 threads, get() from those threads while the loop runs") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    std::atomic<int> right{0};
    std::atomic<int> finished_threads{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
            std::vector<future<int>> futures;
            for (int i = 0; i < 250; ++i) futures.push_back(pool.submit<square>(t * 1000 + i));
            for (int i = 0; i < 250; ++i) {
                const int x = t * 1000 + i;
                if (futures[static_cast<std::size_t>(i)].get(30s) == x * x) ++right;
            }
            ++finished_threads;
        });
    }
    run_bounded(loop, wait_for_count(&loop, &finished_threads, 4), 60s);
    for (auto& thread : threads) thread.join();
    CHECK(right.load() == 1000);
}

namespace {

task<std::vector<outcome>> shutdown_under_load(coproc::process_pool* pool, bool cancel_futures, std::size_t* workers_after) {
    std::vector<future<int>> futures;
    for (int i = 0; i < 100; ++i) futures.push_back(pool->submit<sleep_then>(1, i));
    co_await pool->shutdown({.wait = true, .cancel_futures = cancel_futures});
    *workers_after = pool->stats().workers_alive;
    co_return co_await settle_all(std::move(futures));
}

task<void> try_get_on_loop(future<int>* pending, bool* was_refused) {
    try {
        (void)pending->get();
    } catch (const std::logic_error&) {
        *was_refused = true;
    }
    co_return;
}

task<void> wait_then_terminate(coproc::event_loop* loop, coproc::process_pool* pool, future<int>* hanging) {
    while (!hanging->running()) co_await loop->sleep_for(1ms);
    signal_workers(*pool, SIGTERM);
}

task<void> wait_then_kill(coproc::event_loop* loop, coproc::process_pool* pool, future<int>* hanging) {
    while (!hanging->running()) co_await loop->sleep_for(1ms);
    pool->restart_workers();
}

task<bool> running_is_acknowledged(coproc::event_loop* loop, coproc::process_pool* pool) {
    auto slow = pool->submit<sleep_then>(300, 1);
    const bool running_at_submit = slow.running();
    for (int attempt = 0; attempt < 2000 && !slow.running(); ++attempt) co_await loop->sleep_for(1ms);
    const bool running_later = slow.running();
    co_await std::move(slow);
    co_return !running_at_submit && running_later;
}

} // namespace

TEST_CASE("shutdown under load without cancel_futures: every task finishes, then the workers exit") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 2}};
        std::size_t workers_after = 99;
        const auto outcomes = run_bounded(loop, shutdown_under_load(&pool, false, &workers_after), 30s);
        int finished = 0;
        for (std::size_t i = 0; i < outcomes.size(); ++i) finished += outcomes[i].error.empty() && outcomes[i].value == static_cast<int>(i);
        CHECK(finished == 100);
        CHECK(workers_after == 0);
        CHECK_THROWS_AS((void)pool.submit<square>(1), coproc::pool_closed);
    }
    leaks.verify();
}

TEST_CASE("shutdown under load with cancel_futures: pending tasks end cancelled and never run, the rest finish") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 2}};
        std::size_t workers_after = 99;
        const auto outcomes = run_bounded(loop, shutdown_under_load(&pool, true, &workers_after), 30s);
        int finished = 0;
        int cancelled = 0;
        for (const auto& result : outcomes) {
            if (result.error.empty()) ++finished;
            if (result.error == "cancelled") ++cancelled;
        }
        CHECK(finished + cancelled == 100);
        CHECK(cancelled > 0);
        CHECK(workers_after == 0);
        CHECK(pool.stats().tasks_cancelled == static_cast<std::size_t>(cancelled));
    }
    leaks.verify();
}

TEST_CASE("destroying the pool under load ends every future, leaves no worker, zombie or fd") {
    leak_check leaks;
    std::vector<future<int>> futures;
    {
        coproc::event_loop loop;
        {
            coproc::process_pool pool{loop, {.max_workers = 2}};
            auto first = pool.submit<worker_pid>();
            for (int i = 0; i < 50; ++i) futures.push_back(pool.submit<sleep_then>(20, i));
            // Let the workers start and take tasks, then destroy the pool
            // with most of the 50 still pending or running.
            run_bounded(loop, await_future(std::move(first)));
            CHECK(pool.stats().workers_alive == 2);
        }
        for (auto& pending : futures) {
            REQUIRE(pending.done());
        }
        int cancelled = 0;
        for (auto& pending : futures) cancelled += pending.cancelled();
        CHECK(cancelled > 0);
    }
    leaks.verify();
}

TEST_CASE("cancel of a pending task succeeds and the task never runs") {
    leak_check leaks;
    const auto marker = std::filesystem::temp_directory_path() / ("coproc-test-marker-" + std::to_string(::getpid()));
    std::filesystem::remove(marker);
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 1}};
        auto blocker = pool.submit<sleep_then>(50, 1);
        auto victim = pool.submit<touch_file>(marker.string());
        CHECK(victim.cancel());
        CHECK(victim.cancelled());
        CHECK(victim.done());
        CHECK_FALSE(victim.cancel()); // already final
        CHECK(run_bounded(loop, await_future(std::move(blocker))) == 1);
        CHECK_THROWS_AS(run_bounded(loop, await_future(std::move(victim))), coproc::cancelled_error);
        // Anything queued after it still runs; the marker never appears.
        CHECK(run_bounded(loop, submit_square(&pool, 3)) == 9);
        CHECK_FALSE(std::filesystem::exists(marker));
        CHECK(pool.stats().tasks_cancelled == 1);
    }
    std::filesystem::remove(marker);
    leaks.verify();
}

TEST_CASE("running() is true only after the worker acknowledged the start") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    CHECK(run_bounded(loop, running_is_acknowledged(&loop, &pool)));
}

TEST_CASE("done callbacks run once the task is final; exception() and done() report the outcome") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    int seen_value = 0;
    bool saw_error = false;
    auto good = pool.submit<square>(6);
    auto bad = pool.submit<throw_standard>("invalid_argument", "bad input");
    good.add_done_callback([&](const future<int>& done) {
        CHECK(done.done());
        CHECK(done.exception() == nullptr);
        seen_value = 36;
    });
    bad.add_done_callback([&](const future<void>& done) { saw_error = done.exception() != nullptr; });
    CHECK_FALSE(good.done());
    run_bounded(loop, await_future(pool.submit<worker_pid>()));
    CHECK(seen_value == 36);
    CHECK(saw_error);
    // On a final future the callback runs at once.
    bool immediate = false;
    good.add_done_callback([&](const future<int>&) { immediate = true; });
    CHECK(immediate);
}

TEST_CASE("get() with a timeout throws timeout_error when the task is not done in time, and get() on the loop thread is refused") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto slow = pool.submit<sleep_then>(200, 5);
    CHECK_THROWS_AS(slow.get(1ms), coproc::timeout_error); // the loop is not running: nothing can finish
    bool refused = false;
    run_bounded(loop, try_get_on_loop(&slow, &refused));
    CHECK(refused);
    CHECK(run_bounded(loop, await_future(std::move(slow))) == 5);
}

namespace {

// How often the worker's reading thread slept between the tasks of a
// submit-await loop of `count` tasks, 10 ms apart: the growth of its
// voluntary context switches (each task reads them on that thread, the one
// that waits for CALLs).
coproc::task<long> sleeps_between_tasks(coproc::event_loop* loop, coproc::process_pool* pool, int count) {
    const long first = co_await pool->submit<thread_voluntary_switches>();
    long last = first;
    for (int i = 0; i < count; ++i) {
        co_await loop->sleep_for(std::chrono::milliseconds{10});
        last = co_await pool->submit<thread_voluntary_switches>();
    }
    co_return last - first;
}

} // namespace

TEST_CASE("worker_spin: a worker looks for the next CALL before it sleeps; zero: it sleeps at once") {
    // A spin far longer than the 10 ms between two tasks, even on a loaded
    // machine or under a sanitizer: the worker never sleeps waiting. Without
    // one, it sleeps in each gap.
    long spinning = 0;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .worker_spin = 500ms}};
        spinning = run_bounded(loop, sleeps_between_tasks(&loop, &pool, 40), 60s);
    }
    long sleeping = 0;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .worker_spin = 0us}};
        sleeping = run_bounded(loop, sleeps_between_tasks(&loop, &pool, 40), 60s);
    }
    INFO("voluntary switches over 40 tasks: spinning " << spinning << ", sleeping " << sleeping);
    CHECK(sleeping >= 30); // one sleep per wait for the next CALL
    // A worker that may run on one CPU only never spins (the workers
    // inherit this process's affinity).
    ::cpu_set_t cpus;
    CPU_ZERO(&cpus);
    REQUIRE(::sched_getaffinity(0, sizeof cpus, &cpus) == 0);
    if (CPU_COUNT(&cpus) >= 2) {
        CHECK(spinning >= 0);
        // Nearly never; a few sleeps may still come from elsewhere (under
        // ThreadSanitizer a task slowed past a millisecond brings in the
        // watcher thread, and waiting for its lock is a sleep too).
        CHECK(spinning * 3 < sleeping);
    } else {
        CHECK(spinning >= 30);
    }
}

TEST_CASE("workers get the configured environment and inherit only their socket and the standard streams") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .environment = {{"COPROC_TEST_COLOUR", "teal"}}}};
    CHECK(run_bounded(loop, await_future(pool.submit<environment_variable>("COPROC_TEST_COLOUR"))) == "teal");
    const auto fds = run_bounded(loop, await_future(pool.submit<open_descriptors>()));
    // The others the worker made itself: its watcher's timer and epoll set,
    // and the ring its reading thread waits in (none where io_uring is denied).
    REQUIRE(fds.size() >= 6);
    REQUIRE(fds.size() <= 7);
    CHECK(std::vector<int>(fds.begin(), fds.begin() + 4) == std::vector<int>{0, 1, 2, 3});
    auto targets = run_bounded(loop, await_future(pool.submit<descriptor_targets>()));
    REQUIRE(targets.size() == fds.size());
    std::vector<std::string> own;
    for (std::size_t i = 0; i < targets.size(); ++i) {
        const auto kind = targets[i].find("anon_inode:");
        if (i >= 4) own.push_back(kind == std::string::npos ? targets[i] : targets[i].substr(kind));
    }
    std::sort(own.begin(), own.end());
    std::vector<std::string> expected{"anon_inode:[eventpoll]", "anon_inode:[timerfd]"};
    if (own.size() == 3) expected.push_back("anon_inode:[io_uring]");
    std::sort(expected.begin(), expected.end());
    CHECK(own == expected);
    CHECK(count_open_fds() > 4); // the parent has more (ring, eventfd, sockets): they were not inherited
}

TEST_CASE("a worker's stderr reaches the parent's stderr") {
    const std::string text = capture_stderr([] {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1}};
        run_bounded(loop, await_future(pool.submit<write_to_stderr>("a line from the worker\n")));
    });
    CHECK(contains(text, "a line from the worker"));
}

TEST_CASE("max_workers of zero or less is rejected; prefetch of zero too") {
    coproc::event_loop loop;
    CHECK_THROWS_AS(coproc::process_pool(loop, {.max_workers = 0}), std::invalid_argument);
    CHECK_THROWS_AS(coproc::process_pool(loop, {.max_workers = -2}), std::invalid_argument);
    CHECK_THROWS_AS(coproc::process_pool(loop, {.max_workers = 1, .prefetch = 0}), std::invalid_argument);
}

TEST_CASE("the default max_workers is the number of CPUs this process may use") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop};
    std::vector<future<int>> futures;
    for (int i = 0; i < 64; ++i) futures.push_back(pool.submit<sleep_then>(5, i));
    run_bounded(loop, await_all(std::move(futures)), 30s);
    ::cpu_set_t set;
    CPU_ZERO(&set);
    REQUIRE(::sched_getaffinity(0, sizeof set, &set) == 0);
    CHECK(pool.stats().workers_started == static_cast<std::size_t>(CPU_COUNT(&set)));
}

TEST_CASE("a separate worker program serves the functions it registers; an unknown function fails clearly") {
    const char* program = std::getenv("COPROC_TEST_WORKER_PROGRAM");
    REQUIRE(program != nullptr);
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .worker_executable = program}};
        CHECK(run_bounded(loop, submit_square(&pool, 11)) == 121);
        try {
            run_bounded(loop, await_future(pool.submit<cube>(2)));
            FAIL("no exception");
        } catch (const coproc::error& e) {
            CHECK(contains(e.what(), "does not know the function pool_test::cube"));
            CHECK(contains(e.what(), "COPROC_REGISTER"));
        }
        CHECK(run_bounded(loop, await_future(pool.submit<greet>("again", 1))) == "hello again;");
    }
    leaks.verify();
}

TEST_CASE("overloads are told apart; same-named specializations run as themselves or fail clearly, never as each other") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    CHECK(run_bounded(loop, await_future(pool.submit<static_cast<int (*)(int)>(halve)>(7))) == 3);
    CHECK(run_bounded(loop, await_future(pool.submit<static_cast<double (*)(double)>(halve)>(7.0))) == 3.5);
    for (int factor : {2, 3}) {
        CAPTURE(factor);
        try {
            const int value = factor == 2 ? run_bounded(loop, await_future(pool.submit<scale<2>>(5)))
                                          : run_bounded(loop, await_future(pool.submit<scale<3>>(5)));
            CHECK(value == 5 * factor);
        } catch (const coproc::error& e) {
            // Clang names scale<2> and scale<3> alike: refused, not confused.
            CHECK(contains(e.what(), "cannot submit"));
        }
    }
}

TEST_CASE("map works through a separate worker program that registers the function") {
    const char* program = std::getenv("COPROC_TEST_WORKER_PROGRAM");
    REQUIRE(program != nullptr);
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .worker_executable = program}};
    const std::vector<int> inputs{1, 2, 3, 4, 5};
    CHECK(run_bounded(loop, map_squares(&pool, inputs)) == std::vector<int>{1, 4, 9, 16, 25});
}

TEST_CASE("shutdown_blocking from another thread returns once the workers have exited") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 2}};
        std::atomic<bool> release{false};
        std::thread loop_thread([&] { run_bounded(loop, wait_for_flag(&loop, &release), 30s); });
        for (int attempt = 0; attempt < 5000 && !loop.running(); ++attempt) std::this_thread::sleep_for(1ms);
        REQUIRE(loop.running());
        std::vector<future<int>> futures;
        for (int i = 0; i < 20; ++i) futures.push_back(pool.submit<sleep_then>(2, i));
        pool.shutdown_blocking();
        CHECK(pool.stats().workers_alive == 0);
        CHECK(pool.stats().tasks_completed == 20);
        for (auto& pending : futures) CHECK(pending.done());
        release = true;
        loop_thread.join();
        CHECK_THROWS_AS((void)pool.submit<square>(1), coproc::pool_closed);
    }
    leaks.verify();
}

TEST_CASE("shutdown_blocking when no thread runs the loop runs it; on the loop thread it is refused") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto pending = pool.submit<sleep_then>(5, 7);
    pool.shutdown_blocking();
    CHECK(pending.done());
    CHECK(pending.get() == 7);
    bool refused = false;
    run_bounded(loop, shutdown_blocking_on_loop(&pool, &refused));
    CHECK(refused);
}

TEST_CASE("a worker exits when its parent dies") {
    const char* program = std::getenv("COPROC_TEST_WORKER_PROGRAM");
    REQUIRE(program != nullptr);
    int out[2];
    REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
    ::posix_spawn_file_actions_t actions;
    ::posix_spawn_file_actions_init(&actions);
    ::posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
    std::string flag = "--orphan-test";
    char* argv[] = {const_cast<char*>(program), flag.data(), nullptr};
    ::pid_t parent = -1;
    REQUIRE(::posix_spawn(&parent, program, &actions, nullptr, argv, environ) == 0);
    ::posix_spawn_file_actions_destroy(&actions);
    ::close(out[1]);
    char text[32] = {};
    std::size_t got = 0;
    while (got < sizeof text - 1) {
        ::pollfd readable{out[0], POLLIN, 0};
        if (::poll(&readable, 1, 10'000) != 1) break; // bounded: 10 s
        const ssize_t n = ::read(out[0], text + got, sizeof text - 1 - got);
        if (n <= 0) break;
        got += static_cast<std::size_t>(n);
        if (std::memchr(text, '\n', got) != nullptr) break;
    }
    ::close(out[0]);
    const int worker = std::atoi(text);
    REQUIRE(worker > 0);
    CHECK(process_alive(worker));
    ::kill(parent, SIGKILL);
    ::waitpid(parent, nullptr, 0);
    bool gone = false;
    for (int attempt = 0; attempt < 500 && !gone; ++attempt) { // bounded: 5 s
        gone = !process_alive(worker);
        if (!gone) std::this_thread::sleep_for(10ms);
    }
    CHECK(gone);
}

TEST_CASE("a worker program that runs but never says HELLO is killed after start_timeout; three break the pool") {
    const char* program = std::getenv("COPROC_TEST_WORKER_PROGRAM");
    REQUIRE(program != nullptr);
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1,
                                         .worker_executable = program,
                                         .environment = {{"COPROC_TEST_SILENT_WORKER", "1"}},
                                         .start_timeout = 100ms}};
        try {
            run_bounded(loop, submit_square(&pool, 2), 20s);
            FAIL("no exception");
        } catch (const coproc::broken_process_pool& e) {
            CHECK(contains(e.what(), "did not say HELLO (the last one"));
            CHECK(contains(e.what(), "did not say HELLO within 100 ms"));
        }
    }
    leaks.verify();
}

TEST_CASE("a worker whose main forgot run_worker_if_requested cannot start pools of its own") {
    const char* program = std::getenv("COPROC_TEST_WORKER_PROGRAM");
    REQUIRE(program != nullptr);
    leak_check leaks;
    const std::string stderr_text = capture_stderr([&] {
        coproc::event_loop loop;
        coproc::process_pool pool{
            loop, {.max_workers = 1, .worker_executable = program, .environment = {{"COPROC_TEST_FORGETFUL_WORKER", "1"}}}};
        CHECK_THROWS_AS(run_bounded(loop, submit_square(&pool, 2), 20s), coproc::broken_process_pool);
    });
    CHECK(contains(stderr_text, "must call coproc::run_worker_if_requested"));
    leaks.verify();
}

TEST_CASE("event_loop::stop() cancels the tasks awaiting the pool but leaves the pool serving") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = 200ms}};
    CHECK(run_bounded(loop, submit_square(&pool, 2)) == 4); // a live worker
    std::thread stopper([&] {
        std::this_thread::sleep_for(50ms);
        loop.stop();
    });
    CHECK_THROWS_AS(run_bounded(loop, await_future(pool.submit<sleep_then>(5000, 1))), coproc::cancelled_error);
    stopper.join();
    CHECK(run_bounded(loop, submit_square(&pool, 3)) == 9);
}

TEST_CASE("without pidfd_open (hidden by a sandbox or tool) the pool still sees workers exit and reaps them") {
    leak_check leaks;
    std::vector<outcome> outcomes;
    std::thread sandboxed([&] {
        deny_syscall(SYS_pidfd_open, ENOSYS); // this thread and the workers it starts
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1}};
        std::vector<future<int>> futures;
        futures.push_back(pool.submit<square>(5));
        futures.push_back(pool.submit<crash_exit>(4));
        futures.push_back(pool.submit<square>(6));
        outcomes = run_bounded(loop, settle_all(std::move(futures)));
    });
    sandboxed.join();
    REQUIRE(outcomes.size() == 3);
    CHECK(outcomes[0].value == 25);
    CHECK(outcomes[1].error == "worker_died");
    CHECK(contains(outcomes[1].what, "exited with code 4"));
    CHECK(outcomes[2].value == 36);
    leaks.verify();
}

TEST_CASE("a worker that cannot create its watcher thread says which limit applies and exits with code 71; its task fails") {
    leak_check leaks;
    std::vector<outcome> outcomes;
    bool denied = false;
    const std::string text = capture_stderr([&] {
        std::thread sandboxed([&] {
            // This thread and the workers it starts: processes can be
            // started, threads cannot (EAGAIN, as at RLIMIT_NPROC).
            denied = deny_thread_creation();
            if (!denied) return;
            coproc::event_loop loop;
            coproc::process_pool pool{loop, {.max_workers = 1}};
            std::vector<future<int>> futures;
            futures.push_back(pool.submit<square>(5));
            outcomes = run_bounded(loop, settle_all(std::move(futures)));
        });
        sandboxed.join();
    });
    REQUIRE(denied);
    REQUIRE(outcomes.size() == 1);
    // Said HELLO, then exited: the task was never started; depending on
    // when the parent saw the HELLO, the pool calls it a worker that died
    // or one that could not start.
    CHECK((outcomes[0].error == "worker_died" || outcomes[0].error == "broken"));
    CHECK(contains(outcomes[0].what, "exited with code 71"));
    CHECK(contains(text, "cannot start its watcher thread"));
    CHECK(contains(text, "RLIMIT_NPROC"));
    CHECK(contains(text, "pids.max"));
    CHECK(contains(text, "exits with code 71"));
    CHECK_FALSE(contains(text, "terminate called"));
    leaks.verify();
}

TEST_CASE("a worker that cannot create its janitor thread says so and serves on, keeping no spare") {
    std::string result;
    int first_pid = 0;
    int second_pid = 0;
    std::size_t spare = 1;
    // Around the whole pool: a worker writes to the stderr it was started with.
    const std::string text = capture_stderr([&] {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .keep_result_memory = 10s}};
        first_pid = run_bounded(loop, await_future(pool.submit<worker_pid>()));
        // The first large result would start the janitor; the task denies
        // its own thread (the one that starts it) new threads first.
        result = run_bounded(loop, await_future(pool.submit<large_result_without_threads>(std::size_t{1} << 20)));
        spare = run_bounded(loop, await_future(pool.submit<spare_bytes_in_worker>()));
        second_pid = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    });
    CHECK(result == pattern(std::size_t{1} << 20, 5));
    CHECK(second_pid == first_pid);
    CHECK(spare == 0);
    CHECK(contains(text, "cannot start its janitor thread"));
    CHECK(contains(text, "RLIMIT_NPROC"));
    CHECK(contains(text, "serves on"));
}

TEST_CASE("a missing worker program breaks the pool with an error naming it") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .worker_executable = "/nonexistent/coproc-worker"}};
    try {
        run_bounded(loop, submit_square(&pool, 2));
        FAIL("no exception");
    } catch (const coproc::broken_process_pool& e) {
        CHECK(contains(e.what(), "/nonexistent/coproc-worker"));
        CHECK(contains(e.what(), "No such file"));
    }
    CHECK_THROWS_AS((void)pool.submit<square>(1), coproc::broken_process_pool);
}

TEST_CASE("a worker program that never says HELLO breaks the pool with advice") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .worker_executable = "/bin/true"}};
        try {
            run_bounded(loop, submit_square(&pool, 2));
            FAIL("no exception");
        } catch (const coproc::broken_process_pool& e) {
            CHECK(contains(e.what(), "run_worker_if_requested"));
        }
    }
    leaks.verify();
}

TEST_CASE("crash_policy::break_pool reproduces CPython: one crash breaks the pool for every pending and later submit") {
    leak_check leaks;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .on_worker_crash = coproc::crash_policy::break_pool, .prefetch = 1}};
        std::vector<future<int>> futures;
        futures.push_back(pool.submit<crash_exit>(1));
        for (int i = 0; i < 10; ++i) futures.push_back(pool.submit<square>(i));
        const auto outcomes = run_bounded(loop, settle_all(std::move(futures)));
        // The crashed task's future too, as in CPython.
        for (std::size_t i = 0; i < outcomes.size(); ++i) {
            CAPTURE(i);
            CHECK(outcomes[i].error == "broken");
        }
        CHECK_THROWS_AS((void)pool.submit<square>(1), coproc::broken_process_pool);
    }
    leaks.verify();
}

TEST_CASE("a SIGTERM from outside fails the running task, restart_workers cancels it; the pool replaces the workers") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto hanging = pool.submit<hang_forever>();
    run_bounded(loop, wait_then_terminate(&loop, &pool, &hanging));
    try {
        run_bounded(loop, await_future(std::move(hanging)));
        FAIL("no exception");
    } catch (const coproc::worker_died& e) {
        CHECK(e.signal() == SIGTERM);
    }
    CHECK(run_bounded(loop, submit_square(&pool, 8)) == 64);

    // restart_workers cancels what is running: the future ends cancelled.
    auto hanging_again = pool.submit<hang_forever>();
    run_bounded(loop, wait_then_kill(&loop, &pool, &hanging_again));
    CHECK(hanging_again.cancelled());
    CHECK_THROWS_AS(run_bounded(loop, await_future(std::move(hanging_again))), coproc::cancelled_error);
    CHECK(run_bounded(loop, submit_square(&pool, 9)) == 81);
}

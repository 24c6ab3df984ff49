// The worker's side of the wire (src/worker.cpp): a task runs on the thread
// that read its CALL, its START leaves late (with its RESULT, or from the
// watcher once it has run a while), the start word tells the parent which
// task a dead worker was running, and frames that arrive while a task runs
// are read by the watcher. Each behaviour is checked by what the parent
// sees: run counts in a shared file, running(), who served what.
#include "remote_functions.hpp"
#include "support.hpp"

#include <cstdint>
#include <string>
#include <vector>

using coproc::future;
using coproc::task;
using namespace test_support;
using namespace pool_test;

namespace {

// The error's name and text of a future that failed, or empty.
struct failure {
    std::string kind;
    std::string what;
};

task<failure> failure_of(future<int> pending) {
    try {
        (void)co_await std::move(pending);
    } catch (const coproc::worker_died& e) {
        co_return failure{"worker_died", e.what()};
    } catch (const coproc::cancelled_error& e) {
        co_return failure{"cancelled", e.what()};
    } catch (const std::exception& e) {
        co_return failure{"other", e.what()};
    }
    co_return failure{};
}

// Returns once no cancelled task is left in a worker: each worker has
// answered the CANCELs it was sent.
task<void> until_no_task_cancelling(coproc::event_loop* loop, coproc::process_pool* pool) {
    while (pool->stats().tasks_cancelling > 0) co_await loop->sleep_for(1ms);
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

} // namespace

TEST_CASE("a task that kills its worker before the worker said START fails with worker_died and never runs again") {
    run_counters counters{1};
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    const failure seen = run_bounded(loop, failure_of(pool.submit<count_run_then_die>(counters.path(), 0)), 30s);
    CHECK(seen.kind == "worker_died");
    CHECK_FALSE(contains(seen.what, "never ran"));
    // The pool serves on with a new worker.
    CHECK(run_bounded(loop, await_future(pool.submit<square>(6))) == 36);
    run_bounded(loop, pool.shutdown({.wait = true}));
    CHECK(counters.read()[0] == 1); // the start word said it ran: not sent to another worker
}

TEST_CASE("a worker without a start word says START before each task, and a task that kills it never runs again") {
    run_counters counters{1};
    coproc::event_loop loop;
    // No descriptor to map: the worker works as protocol 2 did.
    coproc::process_pool pool{loop, {.max_workers = 1, .environment = {{"COPROC_START_WORD_FD", "-1"}}}};
    CHECK(run_bounded(loop, await_future(pool.submit<square>(5))) == 25);
    const failure seen = run_bounded(loop, failure_of(pool.submit<count_run_then_die>(counters.path(), 0)), 30s);
    CHECK(seen.kind == "worker_died");
    CHECK_FALSE(contains(seen.what, "never ran"));
    run_bounded(loop, pool.shutdown({.wait = true}));
    CHECK(counters.read()[0] == 1);
}

TEST_CASE("a long task is seen running while it runs, long before it returns") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    (void)run_bounded(loop, await_future(pool.submit<square>(1))); // the worker is up
    auto running = pool.submit<sleep_then>(1500, 7);
    // START comes from the watcher about a millisecond after the task
    // began; a second leaves room for a loaded machine.
    run_bounded(loop, until_running(&loop, &running), 1s);
    CHECK(running.running());
    CHECK_FALSE(running.done());
    CHECK(run_bounded(loop, await_future(std::move(running))) == 7);
}

TEST_CASE("while a task runs, the worker reads every frame that arrives: a queued task is cancelled, then the running one") {
    marker_file stopped{"wire-stopped"};
    marker_file touched{"wire-touched"};
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 2, .cancel_grace = 5000ms}};
    const int pid_before = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    auto running = pool.submit<cooperative_wait>(10'000, stopped.path());
    auto queued = pool.submit<touch_file>(touched.path());
    run_bounded(loop, until_running(&loop, &running));
    REQUIRE(pool.stats().tasks_running == 2); // the second CALL is in the worker, behind the first
    // First CANCEL: the worker drops the queued task unrun and says so,
    // while the first task still runs.
    CHECK(queued.cancel());
    run_bounded(loop, until_no_task_cancelling(&loop, &pool));
    CHECK(running.running());
    // Second CANCEL, while the same task still runs: its token stops.
    CHECK(running.cancel());
    const failure seen = run_bounded(loop, failure_of(std::move(running)));
    CHECK(seen.kind == "cancelled");
    const int pid_after = run_bounded(loop, await_future(pool.submit<worker_pid>()));
    CHECK(pid_after == pid_before);
    CHECK(stopped.exists());            // the running task saw its stop token
    CHECK_FALSE(touched.exists());      // the queued one never ran
    CHECK(pool.stats().workers_killed_for_cancel == 0); // no wait for cancel_grace
}

TEST_CASE("CALLs that arrive while a task runs are queued and run after it, in order, on the same worker") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 4}};
    auto first = pool.submit<sleep_then_pid>(50);
    run_bounded(loop, until_running(&loop, &first));
    std::vector<future<std::int64_t>> later;
    for (int i = 0; i < 3; ++i) later.push_back(pool.submit<monotonic_ns>(i));
    const int pid = run_bounded(loop, await_future(std::move(first)));
    const auto ran_at = run_bounded(loop, await_all(std::move(later)));
    REQUIRE(ran_at.size() == 3);
    CHECK(ran_at[0] < ran_at[1]); // in the order they were submitted
    CHECK(ran_at[1] < ran_at[2]);
    CHECK(run_bounded(loop, await_future(pool.submit<worker_pid>())) == pid);
    CHECK(pool.stats().workers_started == 1);
}

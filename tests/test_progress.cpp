// Progress: coproc::report_progress in a task, future::on_progress and
// latest_progress in the parent, throttled by the worker
// (process_pool_options::progress_interval), the last report always before
// the answer.
#include "remote_functions.hpp"
#include "support.hpp"

#include <chrono>
#include <thread>
#include <vector>

using coproc::future;
using coproc::task;
using namespace test_support;
using namespace pool_test;

namespace {

// What on_progress saw, and what it had seen when the done callback ran.
struct progress_log {
    std::vector<double> values;
    bool all_on_loop_thread = true;
    std::size_t seen_when_done = 0;
    bool done_called = false;
    std::size_t seen_when_resumed = 0;
};

void watch(future<int>& pending, progress_log& log, std::thread::id loop_thread) {
    pending.on_progress([&log, loop_thread](double value) {
        log.values.push_back(value);
        log.all_on_loop_thread = log.all_on_loop_thread && std::this_thread::get_id() == loop_thread;
    });
    pending.add_done_callback([&log](const future<int>&) {
        log.seen_when_done = log.values.size();
        log.done_called = true;
    });
}

// Awaits the future, then lets the loop run the callbacks posted with its end.
task<int> value_then_callbacks(coproc::event_loop* loop, future<int>* pending, progress_log* log) {
    const int value = co_await *pending;
    log->seen_when_resumed = log->values.size();
    while (!log->done_called) co_await loop->sleep_for(std::chrono::milliseconds{1});
    co_return value;
}

task<int> value_of(future<int>* pending) { co_return co_await *pending; }

task<void> settle(future<int>* pending) {
    try {
        (void)co_await *pending;
    } catch (const std::exception&) {
    }
}

} // namespace

TEST_CASE("progress reports reach on_progress on the loop thread, in order, all before the awaiter resumes and the done callbacks run") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    progress_log log;
    auto pending = pool.submit<report_steps>(5, 100); // 100 ms apart: none is held back
    CHECK_FALSE(pending.latest_progress().has_value());
    watch(pending, log, std::this_thread::get_id());
    CHECK(run_bounded(loop, value_then_callbacks(&loop, &pending, &log)) == 5);
    CHECK(log.values == std::vector<double>{1, 2, 3, 4, 5});
    CHECK(log.all_on_loop_thread);
    CHECK(log.seen_when_done == 5);
    CHECK(log.seen_when_resumed == 5);
    CHECK(pending.latest_progress() == 5.0);
}

TEST_CASE("a chatty task does not flood the parent: one report per progress_interval at most, the latest before the result") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .progress_interval = std::chrono::milliseconds{50}}};
    progress_log log;
    // Reports as fast as it can for 500 ms: hundreds of thousands of reports.
    auto pending = pool.submit<report_chattily>(500, 1000);
    watch(pending, log, std::this_thread::get_id());
    const int reports = run_bounded(loop, value_then_callbacks(&loop, &pending, &log));
    MESSAGE(reports << " reports made, " << log.values.size() << " reached the parent");
    CHECK(reports > 1000);
    // One at once, then one per 50 ms over 500 ms, then the one held back.
    CHECK(log.values.size() >= 2);
    CHECK(log.values.size() <= 13);
    REQUIRE_FALSE(log.values.empty());
    CHECK(log.values.front() == 1.0);
    CHECK(log.values.back() == static_cast<double>(reports)); // the last report, though held back
    CHECK(pending.latest_progress() == static_cast<double>(reports));
    CHECK(log.seen_when_done == log.values.size());
    CHECK(log.seen_when_resumed == log.values.size());
}

TEST_CASE("progress_interval = 0 sends every report") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .progress_interval = std::chrono::milliseconds{0}}};
    progress_log log;
    auto pending = pool.submit<report_chattily>(0, 200);
    watch(pending, log, std::this_thread::get_id());
    CHECK(run_bounded(loop, value_then_callbacks(&loop, &pending, &log)) == 200);
    CHECK(log.values.size() == 200);
    CHECK(log.values.back() == 200.0);
}

TEST_CASE("latest_progress: nothing before the first report, the last one after a failure") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto failing = pool.submit<report_then_fail>(0.25);
    CHECK_FALSE(failing.latest_progress().has_value());
    CHECK_THROWS_WITH_AS(run_bounded(loop, value_of(&failing)), "failed after reporting progress",
                         std::runtime_error);
    CHECK(failing.latest_progress() == 0.25);
    auto quiet = pool.submit<square>(3);
    CHECK(run_bounded(loop, value_of(&quiet)) == 9);
    CHECK_FALSE(quiet.latest_progress().has_value());
    CHECK_FALSE(coproc::make_ready_future(1).latest_progress().has_value());
}

TEST_CASE("after cancel() no more progress is reported, and the pool serves on") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .progress_interval = std::chrono::milliseconds{0}}};
    auto pending = pool.submit<report_until_stopped>();
    std::size_t calls = 0;
    std::size_t calls_at_cancel = 0;
    // The third call cancels: the task reports on (every 10 ms) until it
    // saw the stop and five times more; none of those reports, nor one
    // already posted, reaches the callback.
    pending.on_progress([&](double) {
        if (++calls == 3) {
            pending.cancel();
            calls_at_cancel = calls;
        }
    });
    run_bounded(loop, settle(&pending));
    run_bounded(loop, pause_for(&loop, std::chrono::milliseconds{300}));
    CHECK(pending.cancelled());
    CHECK(calls_at_cancel == 3);
    CHECK(calls == 3);
    const auto frozen = pending.latest_progress();
    CHECK(frozen == 3.0);
    CHECK(run_bounded(loop, await_future(pool.submit<square>(4))) == 16);
    CHECK(pool.stats().workers_started == 1);
}

TEST_CASE("report_progress does nothing outside a task: in the parent, and in a pool's initializer") {
    coproc::report_progress(0.5); // no task on this thread
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .initializer = coproc::call<initialize_reporting>()}};
    CHECK(run_bounded(loop, await_future(pool.submit<square>(5))) == 25);
    CHECK(pool.stats().workers_started == 1); // no protocol violation killed it
}

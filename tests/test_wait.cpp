// as_completed and wait over futures of a process pool.
#include "remote_functions.hpp"
#include "support.hpp"

#include <algorithm>
#include <chrono>
#include <set>
#include <stop_token>
#include <string>
#include <vector>

using coproc::future;
using coproc::task;
using namespace test_support;
using namespace pool_test;

namespace {

task<std::vector<std::size_t>> completion_order(std::vector<future<int>>* futures) {
    std::vector<std::size_t> order;
    auto completed = coproc::as_completed(*futures);
    while (auto index = co_await completed.next()) order.push_back(*index);
    co_return order;
}

task<coproc::wait_result> wait_for(std::vector<future<int>>* futures, coproc::return_when when) {
    co_return co_await coproc::wait(*futures, when);
}

task<coproc::wait_result> wait_within(std::vector<future<int>>* futures, coproc::return_when when,
                                      std::chrono::steady_clock::duration timeout) {
    co_return co_await coproc::wait(*futures, when, timeout);
}

// The positions as_completed(futures, timeout) yields, and the what() of the
// timeout_error that ended it ("" when it ended normally).
struct yielded {
    std::vector<std::size_t> order;
    std::string timeout_message;
};

task<yielded> completion_order_within(std::vector<future<int>>* futures, std::chrono::steady_clock::duration timeout) {
    yielded result;
    auto completed = coproc::as_completed(*futures, timeout);
    try {
        while (auto index = co_await completed.next()) result.order.push_back(*index);
    } catch (const coproc::timeout_error& e) {
        result.timeout_message = e.what();
    }
    co_return result;
}

// Returns once the future is final.
task<void> until_done(coproc::event_loop* loop, future<int>* pending) {
    while (!pending->done()) co_await loop->sleep_for(1ms);
}

// Cancels the future after `delay`.
task<void> cancel_after(coproc::event_loop* loop, future<int>* pending, std::chrono::milliseconds delay) {
    co_await loop->sleep_for(delay);
    pending->cancel();
}

task<coproc::wait_result> wait_while_cancelling(coproc::event_loop* loop, std::vector<future<int>>* futures,
                                                std::size_t cancelled) {
    auto [result, ignored] = co_await coproc::when_all(wait_for(futures, coproc::return_when::first_exception),
                                                       cancel_after(loop, &(*futures)[cancelled], 50ms));
    (void)ignored;
    co_return result;
}

// Requests a stop on `source` after `delay`.
task<void> stop_after(coproc::event_loop* loop, std::stop_source* source, std::chrono::milliseconds delay) {
    co_await loop->sleep_for(delay);
    source->request_stop();
}

// What a stopped wait or as_completed ended with: "cancelled", "timeout"
// (the wrong answer: a stop is not a timeout), or "returned".
task<std::string> outcome_of(task<void> body) {
    try {
        co_await std::move(body);
    } catch (const coproc::cancelled_error&) {
        co_return "cancelled";
    } catch (const coproc::timeout_error&) {
        co_return "timeout";
    }
    co_return "returned";
}

task<void> wait_long(std::vector<future<int>>* futures) {
    (void)co_await coproc::wait(*futures, coproc::return_when::all_completed, 30s);
}

task<void> drain_long(std::vector<future<int>>* futures) {
    auto completed = coproc::as_completed(*futures, 30s);
    while (co_await completed.next()) {
    }
}

// Runs `body` with a token that `stopper` stops after 50 ms.
task<std::string> stopped_after_50ms(coproc::event_loop* loop, task<void> body) {
    std::stop_source source;
    auto [outcome, ignored] = co_await coproc::when_all(coproc::with_stop_token(outcome_of(std::move(body)), source.get_token()),
                                                        stop_after(loop, &source, 50ms));
    (void)ignored;
    co_return outcome;
}

} // namespace

TEST_CASE("as_completed yields each future once, in the order they finish") {
    coproc::event_loop loop;
    // prefetch 1: the third task waits for a free worker instead of being
    // queued behind the slow one, so the finishing order is known.
    coproc::process_pool pool{loop, {.max_workers = 2, .prefetch = 1}};
    // Both workers up first, so that no start-up delay can reorder the race.
    std::vector<future<int>> warm_up;
    warm_up.push_back(pool.submit<sleep_then>(100, 0));
    warm_up.push_back(pool.submit<sleep_then>(100, 0));
    run_bounded(loop, wait_for(&warm_up, coproc::return_when::all_completed));
    REQUIRE(pool.stats().workers_alive == 2);
    std::vector<future<int>> futures;
    futures.push_back(pool.submit<sleep_then>(1000, 0));
    futures.push_back(pool.submit<sleep_then>(1, 1));
    futures.push_back(pool.submit<sleep_then>(2, 2));
    const auto order = run_bounded(loop, completion_order(&futures));
    REQUIRE(order.size() == 3);
    CHECK(std::set<std::size_t>(order.begin(), order.end()).size() == 3);
    CHECK(order == std::vector<std::size_t>{1, 2, 0}); // the slow one last, although it was submitted first
    for (auto& pending : futures) CHECK(pending.done());
}

TEST_CASE("wait(first_completed) returns as soon as one future is final") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    std::vector<future<int>> futures;
    futures.push_back(pool.submit<sleep_then>(2000, 0));
    futures.push_back(pool.submit<sleep_then>(1, 1));
    const auto result = run_bounded(loop, wait_for(&futures, coproc::return_when::first_completed));
    CHECK(result.done == std::vector<std::size_t>{1});
    CHECK(result.not_done == std::vector<std::size_t>{0});
}

TEST_CASE("wait(first_exception) returns at the first failure; wait(all_completed) waits for all") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    std::vector<future<int>> futures;
    futures.push_back(pool.submit<sleep_then>(2000, 0));
    futures.push_back(pool.submit<fail_at>(5, 5));
    const auto first_failure = run_bounded(loop, wait_for(&futures, coproc::return_when::first_exception));
    CHECK(first_failure.done == std::vector<std::size_t>{1});
    CHECK(first_failure.not_done == std::vector<std::size_t>{0});

    std::vector<future<int>> quick;
    for (int i = 0; i < 5; ++i) quick.push_back(pool.submit<sleep_then>(i, i));
    const auto all = run_bounded(loop, wait_for(&quick, coproc::return_when::all_completed));
    CHECK(all.done.size() == 5);
    CHECK(all.not_done.empty());
}

TEST_CASE("wait honours a deadline through with_timeout") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    std::vector<future<int>> futures;
    futures.push_back(pool.submit<sleep_then>(2000, 0));
    CHECK_THROWS_AS(loop.run(coproc::with_timeout(wait_for(&futures, coproc::return_when::all_completed), 20ms)),
                    coproc::timeout_error);
}

TEST_CASE("wait(first_exception) does not end at a cancelled future: a cancelled future has not failed") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    std::vector<future<int>> futures;
    futures.push_back(pool.submit<sleep_then>(60000, 0)); // never ends during the test
    futures.push_back(pool.submit<sleep_then>(60000, 1));
    REQUIRE(futures[1].cancel()); // pending: cancelled before the wait begins
    // Nothing has failed and not all are final: the wait must still be
    // waiting when the 300 ms bound passes.
    CHECK_THROWS_AS(run_bounded(loop, wait_for(&futures, coproc::return_when::first_exception), 300ms),
                    coproc::timeout_error);
    CHECK_FALSE(futures[0].done());
}

TEST_CASE("wait(first_exception) ignores cancellations during the wait and ends at the first failure") {
    coproc::event_loop loop;
    // prefetch 1: the failing task waits in the parent for a free worker,
    // instead of being sent ahead to a busy one.
    coproc::process_pool pool{loop, {.max_workers = 2, .prefetch = 1, .max_prefetch = 1, .cancel_grace = 50ms}};
    std::vector<future<int>> futures;
    futures.push_back(pool.submit<sleep_then>(60000, 0));
    futures.push_back(pool.submit<sleep_then>(60000, 1));
    futures.push_back(pool.submit<fail_at>(7, 7)); // queued behind the two long ones
    // 50 ms into the wait, the second is cancelled, which frees a worker for
    // the failing task.
    const auto result = run_bounded(loop, wait_while_cancelling(&loop, &futures, 1), 5s);
    CHECK(result.done == std::vector<std::size_t>{1, 2});
    CHECK(result.not_done == std::vector<std::size_t>{0});
    CHECK(futures[1].cancelled());
    CHECK(futures[2].exception() != nullptr);
}

TEST_CASE("wait(first_exception) returns at once when a future had already failed before the call") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    std::vector<future<int>> futures;
    futures.push_back(pool.submit<sleep_then>(60000, 0));
    futures.push_back(pool.submit<fail_at>(3, 3));
    run_bounded(loop, until_done(&loop, &futures[1]));
    const auto result = run_bounded(loop, wait_for(&futures, coproc::return_when::first_exception), 2s);
    CHECK(result.done == std::vector<std::size_t>{1});
    CHECK(result.not_done == std::vector<std::size_t>{0});
}

TEST_CASE("wait and as_completed count ready and exceptional futures as final at once") {
    coproc::event_loop loop;
    std::vector<future<int>> futures;
    futures.push_back(coproc::make_ready_future(1));
    futures.push_back(coproc::make_exceptional_future<int>(std::make_exception_ptr(std::runtime_error("failed"))));
    futures.push_back(coproc::make_ready_future(3));
    const auto all = run_bounded(loop, wait_for(&futures, coproc::return_when::all_completed), 2s);
    CHECK(all.done == std::vector<std::size_t>{0, 1, 2});
    CHECK(all.not_done.empty());
    const auto first_failure = run_bounded(loop, wait_within(&futures, coproc::return_when::first_exception, 0ms), 2s);
    CHECK(first_failure.done.size() == 3);
    const auto order = run_bounded(loop, completion_order(&futures), 2s);
    CHECK(order == std::vector<std::size_t>{0, 1, 2});
    const auto bounded = run_bounded(loop, completion_order_within(&futures, 0ms), 2s);
    CHECK(bounded.order == std::vector<std::size_t>{0, 1, 2});
    CHECK(bounded.timeout_message.empty());
}

TEST_CASE("wait with a timeout returns, when the timeout passes, the unfinished futures in not_done") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    // Both workers up first: the 1 ms task then finishes well within the
    // timeout even on a loaded machine.
    std::vector<future<int>> warm_up;
    warm_up.push_back(pool.submit<sleep_then>(100, 0));
    warm_up.push_back(pool.submit<sleep_then>(100, 0));
    run_bounded(loop, wait_for(&warm_up, coproc::return_when::all_completed));
    REQUIRE(pool.stats().workers_alive == 2);
    std::vector<future<int>> futures;
    futures.push_back(pool.submit<sleep_then>(60000, 0));
    futures.push_back(coproc::make_ready_future(1));
    futures.push_back(pool.submit<sleep_then>(1, 2));
    const auto started = std::chrono::steady_clock::now();
    const auto result = run_bounded(loop, wait_within(&futures, coproc::return_when::all_completed, 1000ms), 5s);
    const auto elapsed = std::chrono::steady_clock::now() - started;
    CHECK(result.done == std::vector<std::size_t>{1, 2});
    CHECK(result.not_done == std::vector<std::size_t>{0});
    CHECK(elapsed >= 1000ms); // the timer is absolute: it never fires early
    CHECK_FALSE(futures[0].cancelled()); // the timeout does not cancel
    // A timeout of zero only looks.
    const auto now = run_bounded(loop, wait_within(&futures, coproc::return_when::all_completed, 0ms), 2s);
    CHECK(now.not_done == std::vector<std::size_t>{0});
}

TEST_CASE("wait with a timeout returns as soon as its condition holds, long before the timeout") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    std::vector<future<int>> futures;
    futures.push_back(pool.submit<sleep_then>(60000, 0));
    futures.push_back(pool.submit<sleep_then>(1, 1));
    // Bounded at 5 s, with a 30 s timeout: only the condition can end it.
    const auto result = run_bounded(loop, wait_within(&futures, coproc::return_when::first_completed, 30s), 5s);
    CHECK(result.done == std::vector<std::size_t>{1});
    CHECK(result.not_done == std::vector<std::size_t>{0});
}

TEST_CASE("as_completed with a timeout yields the finished futures, then throws timeout_error saying how many are unfinished") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    std::vector<future<int>> futures;
    futures.push_back(pool.submit<sleep_then>(60000, 0));
    futures.push_back(coproc::make_ready_future(1));
    futures.push_back(pool.submit<sleep_then>(1, 2)); // pending behind the long one
    const auto result = run_bounded(loop, completion_order_within(&futures, 200ms), 5s);
    CHECK(result.order == std::vector<std::size_t>{1});
    CHECK(result.timeout_message.find("2 of 3 futures unfinished") != std::string::npos);
    CHECK(result.timeout_message.find("200 ms") != std::string::npos);
    CHECK_FALSE(futures[0].cancelled());
}

TEST_CASE("as_completed with a timeout yields every future that ends before it, without throwing") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    std::vector<future<int>> futures;
    futures.push_back(pool.submit<sleep_then>(100, 0));
    futures.push_back(pool.submit<sleep_then>(1, 1));
    const auto result = run_bounded(loop, completion_order_within(&futures, 30s), 5s);
    CHECK(std::set<std::size_t>(result.order.begin(), result.order.end()) == std::set<std::size_t>{0, 1});
    CHECK(result.timeout_message.empty());
}

TEST_CASE("wait and as_completed with a timeout still end with cancelled_error when the awaiter's token is stopped") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    std::vector<future<int>> futures;
    futures.push_back(pool.submit<sleep_then>(60000, 0));
    CHECK(run_bounded(loop, stopped_after_50ms(&loop, wait_long(&futures)), 5s) == "cancelled");
    CHECK(run_bounded(loop, stopped_after_50ms(&loop, drain_long(&futures)), 5s) == "cancelled");
}

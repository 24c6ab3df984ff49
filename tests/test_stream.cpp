// Streams: process_pool::submit_stream runs a function that pushes items
// into a coproc::sink<T>&, and the parent takes them with stream<T>::next()
// while the task runs: in order, with a window of flow control, cancelled
// when the stream is cancelled or destroyed, ended by the task's end, its
// exception, its worker's death or its deadline after the items it sent.
#include "remote_functions.hpp"
#include "support.hpp"

#include <coproc/stream.hpp>
#include <coproc/when_all.hpp>
#include <coproc/with_timeout.hpp>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

using coproc::stream;
using coproc::task;
using namespace std::chrono_literals;
using namespace test_support;
using namespace pool_test;

namespace {

// Every item of the stream, until it ends (or throws).
task<std::vector<int>> collect(stream<int>* items) {
    std::vector<int> values;
    while (std::optional<int> value = co_await items->next()) values.push_back(*value);
    co_return values;
}

// The items received before the stream threw, and what it threw.
struct ending {
    std::vector<int> values;
    std::string error;
    bool worker_died = false;
    bool timed_out = false;
    bool cancelled = false;
};

task<ending> collect_until_error(stream<int>* items) {
    ending seen;
    try {
        while (std::optional<int> value = co_await items->next()) seen.values.push_back(*value);
    } catch (const coproc::worker_died& e) {
        seen.worker_died = true;
        seen.error = e.what();
    } catch (const coproc::timeout_error& e) {
        seen.timed_out = true;
        seen.error = e.what();
    } catch (const coproc::cancelled_error& e) {
        seen.cancelled = true;
        seen.error = e.what();
    } catch (const std::exception& e) {
        seen.error = e.what();
    }
    co_return seen;
}

task<std::optional<int>> next_of(stream<int>* items) { co_return co_await items->next(); }

task<std::optional<std::string>> next_string(stream<std::string>* items) { co_return co_await items->next(); }

// Lets the loop run until `marker` exists (10 s at most).
task<bool> until_exists(coproc::event_loop* loop, const marker_file* marker) {
    for (int i = 0; i < 10'000 && !marker->exists(); ++i) co_await loop->sleep_for(1ms);
    co_return marker->exists();
}

// Lets the loop run until the pool has killed `count` workers for cancels.
task<void> until_killed(coproc::event_loop* loop, coproc::process_pool* pool, std::size_t count) {
    while (pool->stats().workers_killed_for_cancel < count) co_await loop->sleep_for(1ms);
}

// Lets the loop run until the pool counts no task in a worker.
task<void> until_idle(coproc::event_loop* loop, coproc::process_pool* pool) {
    while (pool->stats().tasks_running > 0 || pool->stats().tasks_cancelling > 0) co_await loop->sleep_for(1ms);
}

int read_count(const std::string& path) {
    std::ifstream file{path};
    int count = -1;
    file >> count;
    return count;
}

task<int> square_of(coproc::process_pool* pool, int x) { co_return co_await pool->submit<square>(x); }

} // namespace

TEST_CASE("a stream yields every item the task pushed, in order, then ends, and stays ended") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto items = pool.submit_stream<count_up>(500);
    std::vector<int> expected(500);
    for (int i = 0; i < 500; ++i) expected[static_cast<std::size_t>(i)] = i;
    CHECK(run_bounded(loop, collect(&items)) == expected);
    CHECK(items.done());
    CHECK_FALSE(run_bounded(loop, next_of(&items)).has_value());
    CHECK(pool.stats().tasks_completed == 1);
}

TEST_CASE("an empty stream ends at once, and a window of one still delivers everything") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto none = pool.submit_stream<count_up>(0);
    CHECK(run_bounded(loop, collect(&none)).empty());
    auto one_at_a_time = pool.submit_stream_with<count_up>({.stream_window = 1}, 50);
    CHECK(run_bounded(loop, collect(&one_at_a_time)).size() == 50);
}

TEST_CASE("items arrive while the task runs; cancel stops its token without killing its worker and drops the items not taken") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    marker_file stopped{"stream-stopped"};
    auto items = pool.submit_stream<push_then_wait>(3, stopped.path());
    CHECK(run_bounded(loop, next_of(&items)) == 0);
    CHECK(run_bounded(loop, next_of(&items)) == 1);
    CHECK(items.running()); // the task waits for its stop: it has not ended
    CHECK_FALSE(items.done());
    run_bounded(loop, pause_for(&loop, 100ms)); // item 2 arrives, and is not taken
    CHECK(items.cancel());
    CHECK(run_bounded(loop, until_exists(&loop, &stopped)));
    CHECK_THROWS_AS(run_bounded(loop, next_of(&items)), coproc::cancelled_error);
    run_bounded(loop, until_idle(&loop, &pool));
    CHECK(pool.stats().workers_killed_for_cancel == 0);
    CHECK(run_bounded(loop, square_of(&pool, 7)) == 49);
}

TEST_CASE("flow control: the task runs at most a window ahead of a consumer that does not take its items") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    marker_file counter{"stream-counter"};
    auto items = pool.submit_stream_with<push_counted>({.stream_window = 4}, 1000, counter.path());
    CHECK(run_bounded(loop, next_of(&items)) == 0);
    run_bounded(loop, pause_for(&loop, 300ms)); // time for a task that ignored the window to push them all
    const int pushed = read_count(counter.path());
    CHECK(pushed >= 1);
    CHECK(pushed <= 4); // the window; the consumer took one, less than the half that earns more credit
    // Taking them lets it go on to the end, in order.
    const std::vector<int> rest = run_bounded(loop, collect(&items));
    REQUIRE(rest.size() == 999);
    CHECK(rest.front() == 1);
    CHECK(rest.back() == 999);
    CHECK(read_count(counter.path()) == 1000);
}

TEST_CASE("a worker that dies mid-stream ends it with worker_died after the items it sent, and is not run again") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto items = pool.submit_stream_with<push_then_crash>({.max_retries = 2}, 3);
    const ending seen = run_bounded(loop, collect_until_error(&items));
    CHECK(seen.values == std::vector<int>{0, 1, 2});
    CHECK(seen.worker_died);
    CHECK(seen.error.find("push_then_crash") != std::string::npos);
    CHECK(run_bounded(loop, square_of(&pool, 3)) == 9); // one crash kills one task, not the pool
}

TEST_CASE("an exception thrown by the task ends the stream after the items pushed before it") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto items = pool.submit_stream<push_then_throw>(3);
    const ending seen = run_bounded(loop, collect_until_error(&items));
    CHECK(seen.values == std::vector<int>{0, 1, 2});
    CHECK(seen.error == "failed after 3 items");
    CHECK_FALSE(seen.worker_died);
}

TEST_CASE("destroying a stream whose task waits on a full window cancels it: the push throws cancelled_error, the worker serves on") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    marker_file cancelled{"stream-cancelled"};
    {
        auto items = pool.submit_stream_with<push_until_cancelled>({.stream_window = 2}, cancelled.path());
        CHECK(run_bounded(loop, next_of(&items)) == 0);
    } // destroyed here, the task blocked in push
    CHECK(run_bounded(loop, until_exists(&loop, &cancelled)));
    run_bounded(loop, until_idle(&loop, &pool));
    CHECK(pool.stats().workers_killed_for_cancel == 0);
    CHECK(pool.stats().tasks_cancelled == 1);
    CHECK(run_bounded(loop, square_of(&pool, 5)) == 25);
}

TEST_CASE("a cancelled stream task that ignores its token is killed after cancel_grace, and the pool replaces its worker") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = 200ms}};
    auto items = pool.submit_stream<push_then_ignore_stop>(1);
    CHECK(run_bounded(loop, next_of(&items)) == 0);
    CHECK(items.cancel());
    run_bounded(loop, until_killed(&loop, &pool, 1));
    CHECK(run_bounded(loop, square_of(&pool, 4)) == 16);
}

TEST_CASE("a stream's submit timeout ends it with timeout_error after the items that came in time") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    // The worker up first, so that its start-up, slow under a sanitizer on
    // a loaded machine, does not eat the timeout.
    CHECK(run_bounded(loop, square_of(&pool, 2)) == 4);
    auto items = pool.submit_stream_with<push_slowly>({.timeout = 1000ms}, 100, 20);
    const ending seen = run_bounded(loop, collect_until_error(&items));
    CHECK(seen.timed_out);
    CHECK_FALSE(seen.values.empty());
    CHECK(seen.values.size() < 100);
    for (std::size_t i = 0; i < seen.values.size(); ++i) CHECK(seen.values[i] == static_cast<int>(i));
}

TEST_CASE("a stop of the coroutine awaiting next() cancels the stream") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    marker_file stopped{"stream-awaiter-stopped"};
    auto items = pool.submit_stream<push_then_wait>(0, stopped.path());
    // The stop comes once the task runs: a stream stopped while still queued
    // is dropped unrun, and would never write the marker.
    run_bounded(loop, until_running(&loop, &items), 20s);
    CHECK_THROWS_AS(run_bounded(loop, coproc::with_timeout(next_of(&items), 200ms)), coproc::timeout_error);
    CHECK(items.done());
    CHECK(run_bounded(loop, until_exists(&loop, &stopped)));
}

TEST_CASE("a stream destroyed while queued never runs") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    marker_file counter{"stream-never-ran"};
    auto busy = pool.submit<sleep_then>(200, 1);
    { auto items = pool.submit_stream<push_counted>(5, counter.path()); }
    CHECK(run_bounded(loop, await_future(std::move(busy))) == 1);
    run_bounded(loop, until_idle(&loop, &pool));
    CHECK_FALSE(counter.exists());
    CHECK(pool.stats().tasks_cancelled == 1);
}

TEST_CASE("large items arrive whole") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    constexpr int size = 1 << 20;
    auto items = pool.submit_stream<push_strings>(6, size);
    for (int i = 0; i < 6; ++i) {
        const std::optional<std::string> value = run_bounded(loop, next_string(&items));
        REQUIRE(value.has_value());
        CHECK(*value == pattern(size, i));
    }
    CHECK_FALSE(run_bounded(loop, next_string(&items)).has_value());
}

TEST_CASE("a worker that sends items beyond the window is killed, and the stream ends with worker_died saying why") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    // The pool's first task has work id 1.
    auto items = pool.submit_stream_with<send_items_by_hand>({.stream_window = 2}, std::uint64_t{1}, 5);
    const ending seen = run_bounded(loop, collect_until_error(&items));
    CHECK(seen.worker_died);
    CHECK(seen.error.find("beyond the window") != std::string::npos);
    CHECK(seen.values.size() <= 2);
}

TEST_CASE("an ITEM for a task that is not a stream is a protocol violation") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto pending = pool.submit<send_item_for_plain_task>(std::uint64_t{1});
    try {
        run_bounded(loop, await_future(std::move(pending)));
        FAIL("the task should have failed");
    } catch (const coproc::worker_died& e) {
        CHECK(std::string(e.what()).find("not a stream") != std::string::npos);
    }
}

TEST_CASE("two streams on two workers are received independently, each in order") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    auto first = pool.submit_stream_with<count_up>({.stream_window = 3}, 200);
    auto second = pool.submit_stream_with<count_up>({.stream_window = 3}, 300);
    const auto both = run_bounded(loop, coproc::when_all(collect(&first), collect(&second)));
    CHECK(std::get<0>(both).size() == 200);
    CHECK(std::get<1>(both).size() == 300);
    CHECK(std::get<1>(both).back() == 299);
}

TEST_CASE("a sink made with a receiving function runs a stream function directly, outside any pool") {
    std::vector<int> received;
    coproc::sink<int> local{[&received](int value) { received.push_back(value); }};
    count_up(4, local);
    CHECK(received == std::vector<int>{0, 1, 2, 3});
}

TEST_CASE("a pool rejects a stream window of zero") {
    coproc::event_loop loop;
    CHECK_THROWS_AS((coproc::process_pool{loop, {.stream_window = 0}}), std::invalid_argument);
}

// The parent's queue of a stream's items not yet taken (work_item.hpp):
// order kept across the compaction of a consumer that lags behind, and
// nothing allocated before the first item.
TEST_CASE("stream_queue keeps its items in order while a lagging consumer's taken slots are dropped") {
    coproc::detail::stream_queue queue;
    CHECK(queue.empty());
    CHECK(queue.capacity() == 0); // nothing allocated yet
    const auto item = [](std::uint32_t n) {
        coproc::detail::byte_buffer bytes;
        bytes.append(&n, sizeof n);
        return bytes;
    };
    const auto value = [](const coproc::detail::byte_buffer& bytes) {
        std::uint32_t n = 0;
        std::memcpy(&n, bytes.data(), sizeof n);
        return n;
    };
    std::uint32_t pushed = 0;
    std::uint32_t taken = 0;
    // Always 40 behind: the queue never empties, so only compaction bounds it.
    for (int round = 0; round < 1000; ++round) {
        while (pushed < taken + 40 + 3) queue.push_back(item(pushed++));
        for (int i = 0; i < 3; ++i) {
            REQUIRE_FALSE(queue.empty());
            REQUIRE(value(queue.front()) == taken);
            queue.pop_front();
            ++taken;
        }
    }
    while (!queue.empty()) {
        REQUIRE(value(queue.front()) == taken++);
        queue.pop_front();
    }
    CHECK(taken == pushed);
    CHECK(queue.capacity() < 256);
}

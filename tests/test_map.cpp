// process_pool::map and map_stream: input order, chunking, tuple elements,
// a bounded window of chunks, failures in input order.
#include "remote_functions.hpp"
#include "support.hpp"

#include <memory>
#include <numeric>
#include <ranges>
#include <string>
#include <stdexcept>
#include <tuple>
#include <vector>

using coproc::task;
using namespace test_support;
using namespace pool_test;

namespace {

task<std::vector<int>> squares(coproc::process_pool* pool, std::vector<int> inputs, coproc::map_options options) {
    co_return co_await pool->map<square>(inputs, options);
}

task<std::vector<int>> sums(coproc::process_pool* pool, std::vector<std::tuple<int, int>> inputs) {
    co_return co_await pool->map<add>(inputs, {.chunksize = 3});
}

task<std::vector<int>> failing(coproc::process_pool* pool, std::vector<std::tuple<int, int>> inputs) {
    co_return co_await pool->map<fail_at>(inputs, {.chunksize = 10, .buffersize = 2});
}

task<std::vector<int>> streamed(coproc::process_pool* pool, std::vector<std::tuple<int, int>> inputs, std::string* error) {
    std::vector<int> seen;
    auto results = pool->map_stream<fail_at>(inputs, {.chunksize = 7, .buffersize = 3});
    try {
        while (auto value = co_await results.next()) seen.push_back(*value);
    } catch (const std::domain_error& e) {
        *error = e.what();
    }
    co_return seen;
}

task<std::vector<int>> streamed_in_chunks(coproc::process_pool* pool, std::vector<std::tuple<int, int>> inputs,
                                          std::size_t chunksize, std::string* error) {
    std::vector<int> seen;
    auto results = pool->map_stream<fail_at>(std::move(inputs), {.chunksize = chunksize});
    try {
        while (auto value = co_await results.next()) seen.push_back(*value);
    } catch (const std::domain_error& e) {
        *error = e.what();
    }
    co_return seen;
}

// Consumes the stream to its end; says how it ended.
task<std::string> collect_stream(coproc::async_generator<int>* stream, std::vector<int>* values) {
    try {
        while (auto value = co_await stream->next()) values->push_back(*value);
    } catch (const coproc::cancelled_error&) {
        co_return "cancelled";
    } catch (const coproc::pool_closed&) {
        co_return "closed";
    }
    co_return "end";
}

task<std::string> drain(coproc::async_generator<int>* stream) {
    std::vector<int> values;
    co_return co_await collect_stream(stream, &values);
}

task<std::vector<int>> take_from(coproc::async_generator<int>* stream, std::size_t count) {
    std::vector<int> values;
    while (values.size() < count) {
        auto value = co_await stream->next();
        if (!value) break;
        values.push_back(*value);
    }
    co_return values;
}

std::vector<int> iota_vector(int n) {
    std::vector<int> values(static_cast<std::size_t>(n));
    std::iota(values.begin(), values.end(), 0);
    return values;
}

} // namespace

TEST_CASE("map yields results in input order for every chunk size") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    const auto inputs = iota_vector(1000);
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{7}, std::size_t{100}, std::size_t{5000}}) {
        CAPTURE(chunksize);
        const auto results = run_bounded(loop, squares(&pool, inputs, {.chunksize = chunksize}), 30s);
        REQUIRE(results.size() == inputs.size());
        int right = 0;
        for (std::size_t i = 0; i < inputs.size(); ++i) right += results[i] == inputs[i] * inputs[i];
        CHECK(right == 1000);
    }
}

TEST_CASE("map with chunksize sends one task per chunk, and an empty input yields nothing") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    run_bounded(loop, squares(&pool, iota_vector(1000), {.chunksize = 100}));
    CHECK(pool.stats().tasks_completed == 10);
    CHECK(run_bounded(loop, squares(&pool, {}, {})).empty());
    CHECK_THROWS_AS(run_bounded(loop, squares(&pool, iota_vector(3), {.chunksize = 0})), std::invalid_argument);
}

TEST_CASE("map over tuples passes their members as arguments") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    std::vector<std::tuple<int, int>> inputs;
    for (int i = 0; i < 20; ++i) inputs.emplace_back(i, 100 * i);
    const auto results = run_bounded(loop, sums(&pool, inputs));
    REQUIRE(results.size() == 20);
    for (int i = 0; i < 20; ++i) CHECK(results[static_cast<std::size_t>(i)] == 101 * i);
}

TEST_CASE("map rethrows the first failure in input order and cancels the chunks still pending") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    std::vector<std::tuple<int, int>> inputs;
    for (int i = 0; i < 1000; ++i) inputs.emplace_back(i, 25);
    CHECK_THROWS_WITH_AS(run_bounded(loop, failing(&pool, inputs)), "bad input 25", std::domain_error);
    // buffersize 2: the failure is in the 3rd chunk, so at most a few of the
    // 100 chunks were ever submitted.
    const auto stats = pool.stats();
    CHECK(stats.tasks_completed + stats.tasks_failed + stats.tasks_cancelled + stats.tasks_running + stats.tasks_queued <= 6);
}

TEST_CASE("map_stream yields every result before the failing one, in order, then throws") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    std::vector<std::tuple<int, int>> inputs;
    for (int i = 0; i < 100; ++i) inputs.emplace_back(i, 40);
    std::string error;
    const auto seen = run_bounded(loop, streamed(&pool, inputs, &error));
    CHECK(error == "bad input 40");
    // Chunks of 7: the 6th holds 35..41 and fails at 40; 35..39 are yielded.
    REQUIRE(seen.size() == 40);
    for (int i = 0; i < 40; ++i) CHECK(seen[static_cast<std::size_t>(i)] == i);
}

TEST_CASE("map_stream yields the results before a failure inside a chunk, for every chunk size") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    std::vector<std::tuple<int, int>> inputs;
    for (int i = 0; i < 10; ++i) inputs.emplace_back(i, 5);
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{2}, std::size_t{3}, std::size_t{6}, std::size_t{10}}) {
        CAPTURE(chunksize);
        std::string error;
        const auto seen = run_bounded(loop, streamed_in_chunks(&pool, inputs, chunksize, &error));
        CHECK(error == "bad input 5");
        CHECK(seen == std::vector<int>{0, 1, 2, 3, 4});
    }
}

TEST_CASE("map_stream and map consumed after their pool was destroyed end with cancelled_error or pool_closed") {
    for (const std::size_t buffersize : {std::size_t{0}, std::size_t{2}}) {
        CAPTURE(buffersize);
        coproc::event_loop loop;
        auto pool = std::make_unique<coproc::process_pool>(loop, coproc::process_pool_options{.max_workers = 2});
        auto stream = pool->map_stream<square>(iota_vector(50), {.buffersize = buffersize});
        auto collected = pool->map<square>(iota_vector(50), {.buffersize = buffersize});
        pool.reset();
        std::string ended = run_bounded(loop, drain(&stream));
        CHECK((ended == "cancelled" || ended == "closed"));
        try {
            (void)run_bounded(loop, std::move(collected));
            FAIL("no exception");
        } catch (const coproc::cancelled_error&) {
        } catch (const coproc::pool_closed&) {
        }
    }
}

TEST_CASE("map and map_stream submit at the call: a stream made before shutdown(wait=false) yields every result") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    auto stream = pool.map_stream<square>(iota_vector(20), {.chunksize = 3});
    const auto stats = pool.stats();
    CHECK(stats.tasks_queued + stats.tasks_running == 7); // all 7 chunks, before anything awaited
    run_bounded(loop, pool.shutdown({.wait = false}));
    std::vector<int> values;
    CHECK(run_bounded(loop, collect_stream(&stream, &values)) == "end");
    REQUIRE(values.size() == 20);
    for (int i = 0; i < 20; ++i) CHECK(values[static_cast<std::size_t>(i)] == i * i);
}

TEST_CASE("map_stream over an unbounded input reads it only as buffersize allows") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    int read = 0;
    auto counted = std::views::iota(0) | std::views::transform([&read](int i) {
                       ++read;
                       return i;
                   });
    {
        auto stream = pool.map_stream<square>(counted, {.chunksize = 2, .buffersize = 3});
        CHECK(read == 6); // three chunks of two, at the call
        const auto first = run_bounded(loop, take_from(&stream, 25));
        REQUIRE(first.size() == 25);
        for (int i = 0; i < 25; ++i) CHECK(first[static_cast<std::size_t>(i)] == i * i);
        CHECK(read <= 26 + 6); // what was consumed, plus the window
    } // destroying the stream cancels what is in flight
    run_bounded(loop, pool.shutdown({.wait = true}));
}

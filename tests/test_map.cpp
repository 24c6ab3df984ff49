// process_pool::map and map_stream: input order, chunking, tuple elements,
// a bounded window of chunks, failures in input order.
#include "remote_functions.hpp"
#include "support.hpp"

#include <numeric>
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
    REQUIRE(seen.size() == 35); // chunks of 7: the 6th chunk holds 35..41 and fails as a whole
    for (int i = 0; i < 35; ++i) CHECK(seen[static_cast<std::size_t>(i)] == i);
}

// coproc::task<T>: laziness, values, exception propagation, move-only
// ownership, and constant stack use across long chains of awaits.
#include "support.hpp"

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

using coproc::task;
using namespace test_support;

namespace {

task<int> value_of(int value) { co_return value; }

task<int> sum_of_awaits(int count) {
    int sum = 0;
    for (int i = 0; i < count; ++i) sum += co_await value_of(1);
    co_return sum;
}

// Depth-first recursion: `depth` task frames are alive at the innermost point.
task<long> nested_chain(long depth) {
    if (depth == 0) co_return 0;
    co_return 1 + co_await nested_chain(depth - 1);
}

task<void> thrower(int depth) {
    if (depth == 0) throw std::out_of_range("thrown at the bottom");
    co_await thrower(depth - 1);
}

task<std::string> catches_from(int depth) {
    try {
        co_await thrower(depth);
    } catch (const std::out_of_range& error) {
        co_return std::string("caught: ") + error.what();
    }
    co_return "not caught";
}

task<void> records(std::vector<int>* trace, int value) {
    trace->push_back(value);
    co_return;
}

task<std::unique_ptr<int>> move_only_result() { co_return std::make_unique<int>(42); }

task<void> holds(std::shared_ptr<int> kept) {
    ++*kept;
    co_return;
}

} // namespace

TEST_CASE("a task does not start until it is awaited") {
    coproc::event_loop loop;
    std::vector<int> trace;
    auto pending = records(&trace, 1);
    CHECK(trace.empty());
    CHECK_FALSE(pending.done());
    loop.run(std::move(pending));
    CHECK(trace == std::vector<int>{1});
}

TEST_CASE("a task yields its co_return value, move-only types included") {
    coproc::event_loop loop;
    CHECK(loop.run(value_of(7)) == 7);
    auto pointer = loop.run(move_only_result());
    REQUIRE(pointer != nullptr);
    CHECK(*pointer == 42);
}

TEST_CASE("an exception propagates through any depth of nested co_await") {
    coproc::event_loop loop;
    SUBCASE("caught by a coroutine 50 levels up") {
        CHECK(loop.run(catches_from(50)) == "caught: thrown at the bottom");
    }
    SUBCASE("rethrown out of run() as the same type with the same message") {
        CHECK_THROWS_WITH_AS(loop.run(thrower(1000)), "thrown at the bottom", std::out_of_range);
    }
}

TEST_CASE("1,000,000 sequential co_awaits of synchronously completing tasks use constant stack") {
    coproc::event_loop loop;
    CHECK(loop.run(sum_of_awaits(1'000'000)) == 1'000'000);
}

TEST_CASE("a chain of 1,000,000 nested tasks completes without stack overflow") {
    coproc::event_loop loop;
    CHECK(loop.run(nested_chain(1'000'000)) == 1'000'000);
}

TEST_CASE("destroying a task that never ran destroys its frame and arguments") {
    auto counter = std::make_shared<int>(0);
    std::weak_ptr<int> watch = counter;
    {
        auto never_run = holds(std::move(counter));
        CHECK_FALSE(watch.expired()); // the frame owns the argument
    }
    CHECK(watch.expired());
}

TEST_CASE("a task is move-only and a moved-from task is empty") {
    static_assert(!std::is_copy_constructible_v<task<int>>);
    static_assert(std::is_nothrow_move_constructible_v<task<int>>);
    auto first = value_of(3);
    auto second = std::move(first);
    CHECK_FALSE(first.valid());
    CHECK(second.valid());
    coproc::event_loop loop;
    CHECK(loop.run(std::move(second)) == 3);
}

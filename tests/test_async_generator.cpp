// coproc::async_generator<T>: lazy, in order, ends with nullopt, rethrows,
// and destroys a suspended body cleanly.
#include "support.hpp"

#include <memory>
#include <optional>
#include <stdexcept>
#include <vector>

using coproc::async_generator;
using coproc::task;
using namespace test_support;

namespace {

async_generator<int> count_to(coproc::event_loop* loop, int n, int* started) {
    ++*started;
    for (int i = 1; i <= n; ++i) {
        co_await loop->sleep_for(1ms);
        co_yield i;
    }
}

async_generator<int> fails_after(int n) {
    for (int i = 0; i < n; ++i) co_yield i;
    throw std::runtime_error("generator failed");
}

task<std::vector<int>> drain(async_generator<int> generator) {
    std::vector<int> values;
    while (auto value = co_await generator.next()) values.push_back(*value);
    co_return values;
}

task<void> consume(async_generator<int>* generator, std::vector<int>* out) {
    while (auto value = co_await generator->next()) out->push_back(*value);
}

struct guard {
    bool* alive;
    explicit guard(bool* flag) : alive(flag) { *alive = true; }
    ~guard() { *alive = false; }
};

async_generator<int> guarded(bool* alive) {
    guard g{alive};
    for (int i = 0;; ++i) co_yield i;
}

task<int> take_two(async_generator<int>* generator) {
    const int first = *co_await generator->next();
    const int second = *co_await generator->next();
    co_return first + second;
}

} // namespace

TEST_CASE("an async generator is lazy and yields its values in order, then nullopt") {
    coproc::event_loop loop;
    int started = 0;
    auto generator = count_to(&loop, 5, &started);
    CHECK(started == 0);
    CHECK(run_bounded(loop, drain(std::move(generator))) == std::vector<int>{1, 2, 3, 4, 5});
    CHECK(started == 1);
}

TEST_CASE("an async generator yields every value before its exception, then rethrows it") {
    coproc::event_loop loop;
    auto generator = fails_after(3);
    std::vector<int> seen;
    CHECK_THROWS_WITH_AS(run_bounded(loop, consume(&generator, &seen)), "generator failed", std::runtime_error);
    CHECK(seen == std::vector<int>{0, 1, 2});
}

TEST_CASE("destroying a suspended async generator destroys its body") {
    coproc::event_loop loop;
    bool alive = false;
    {
        auto generator = guarded(&alive);
        CHECK(run_bounded(loop, take_two(&generator)) == 1);
        CHECK(alive);
    }
    CHECK_FALSE(alive);
}

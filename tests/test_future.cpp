// coproc::future on its own: futures made final without a pool
// (make_ready_future, make_exceptional_future), result(), and done callbacks
// that read the value or throw.
#include "remote_functions.hpp"
#include "support.hpp"

#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using coproc::future;
using coproc::task;
using namespace test_support;
using namespace pool_test;

namespace {

// What a loop's unhandled-exception handler received, by what().
struct reported_errors {
    std::vector<std::string> messages;
    void operator()(std::exception_ptr error) {
        try {
            std::rethrow_exception(error);
        } catch (const std::exception& e) {
            messages.emplace_back(e.what());
        }
    }
};

template <class T>
task<void> until_done(coproc::event_loop* loop, future<T>* pending) {
    while (!pending->done()) co_await loop->sleep_for(1ms);
}

task<int> await_and_get(future<int>* ready) {
    const int awaited = co_await *ready;
    // get() on the loop thread is refused only for a task that could still
    // need the loop; a final future answers at once.
    const int got = ready->get();
    co_return awaited + got;
}

task<void> await_void(future<void> ready) { co_await std::move(ready); }

task<std::string> await_failure(future<int> failed) {
    try {
        co_await std::move(failed);
    } catch (const std::out_of_range& e) {
        co_return e.what();
    }
    co_return "no exception";
}

// Adds a throwing callback to a final future on the loop thread, then lets
// the loop run its posted functions. Records whether add_done_callback threw.
task<void> throw_from_callback_on_loop(coproc::event_loop* loop, future<int>* final_future, bool* escaped,
                                       bool* later_callback_ran) {
    try {
        final_future->add_done_callback([](const future<int>&) { throw std::runtime_error("callback failed inline"); });
        final_future->add_done_callback([later_callback_ran](const future<int>&) { *later_callback_ran = true; });
    } catch (...) {
        *escaped = true;
    }
    co_await loop->sleep_for(10ms);
}

} // namespace

TEST_CASE("make_ready_future is final at once: co_await and get() yield its value, cancel() returns false") {
    auto ready = coproc::make_ready_future(21);
    static_assert(std::is_same_v<decltype(ready), future<int>>);
    CHECK(ready.valid());
    REQUIRE(ready.done()); // else get() below would block
    CHECK_FALSE(ready.running());
    CHECK_FALSE(ready.cancelled());
    CHECK(ready.exception() == nullptr);
    CHECK(ready.id() == 0);
    CHECK(ready.result() == 21);
    CHECK(ready.get(2s) == 21);
    CHECK(ready.get() == 21); // no loop anywhere: it never blocks
    CHECK_FALSE(ready.cancel());
    CHECK_FALSE(ready.cancel(true));
    CHECK_FALSE(ready.cancelled());
    coproc::event_loop loop;
    CHECK(run_bounded(loop, await_and_get(&ready), 2s) == 42);

    auto text = coproc::make_ready_future(std::string("moved out"));
    CHECK(std::move(text).get(2s) == "moved out");

    auto nothing = coproc::make_ready_future();
    static_assert(std::is_same_v<decltype(nothing), future<void>>);
    REQUIRE(nothing.done());
    CHECK_FALSE(nothing.cancel());
    CHECK_NOTHROW(nothing.get());
    CHECK_NOTHROW(nothing.result());
    CHECK_NOTHROW(run_bounded(loop, await_void(std::move(nothing)), 2s));
}

TEST_CASE("make_exceptional_future rethrows its exception from co_await, get() and result(); it is failed, not cancelled") {
    auto failed = coproc::make_exceptional_future<int>(std::make_exception_ptr(std::out_of_range("index 7")));
    REQUIRE(failed.done());
    CHECK_FALSE(failed.cancelled());
    REQUIRE(failed.exception() != nullptr);
    CHECK_THROWS_AS(std::rethrow_exception(failed.exception()), std::out_of_range);
    CHECK_THROWS_WITH_AS(failed.get(), "index 7", std::out_of_range);
    CHECK_THROWS_WITH_AS(failed.result(), "index 7", std::out_of_range);
    CHECK_FALSE(failed.cancel());
    coproc::event_loop loop;
    CHECK(run_bounded(loop, await_failure(std::move(failed)), 2s) == "index 7");

    auto cancelled_like = coproc::make_exceptional_future<void>(std::make_exception_ptr(coproc::cancelled_error("by hand")));
    REQUIRE(cancelled_like.done());
    CHECK_FALSE(cancelled_like.cancelled());
    CHECK_THROWS_AS(cancelled_like.get(), coproc::cancelled_error);

    CHECK_THROWS_AS((void)coproc::make_exceptional_future<int>(nullptr), std::invalid_argument);
}

TEST_CASE("add_done_callback on a ready future runs the callback at once, on the calling thread, with the value") {
    auto ready = coproc::make_ready_future(std::vector<int>{1, 2, 3});
    int sum = 0;
    std::thread::id ran_on;
    ready.add_done_callback([&](const future<std::vector<int>>& done) {
        ran_on = std::this_thread::get_id();
        for (int value : done.result()) sum += value;
    });
    CHECK(sum == 6);
    CHECK(ran_on == std::this_thread::get_id());
    CHECK(ready.result().size() == 3); // read in place, not moved out

    auto failed = coproc::make_exceptional_future<int>(std::make_exception_ptr(std::domain_error("no value")));
    std::string seen;
    failed.add_done_callback([&](const future<int>& done) {
        try {
            (void)done.result();
        } catch (const std::domain_error& e) {
            seen = e.what();
        }
    });
    CHECK(seen == "no value");
}

TEST_CASE("a done callback reads the task's value with result(); result() before the end throws logic_error") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto slow = pool.submit<sleep_then>(100, 9);
    CHECK_THROWS_AS(slow.result(), std::logic_error);
    int seen = 0;
    std::string failure;
    slow.add_done_callback([&](const future<int>& done) { seen = done.result(); });
    auto bad = pool.submit<fail_at>(3, 3);
    bad.add_done_callback([&](const future<int>& done) {
        try {
            (void)done.result();
        } catch (const std::domain_error& e) {
            failure = e.what();
        }
    });
    CHECK(run_bounded(loop, await_future(std::move(slow))) == 9);
    // The callbacks are posted to the loop; `bad` runs after `slow` on the
    // one worker, which may take a while under a sanitizer on a loaded
    // machine: wait for both, up to 10 s.
    for (int i = 0; i < 1000 && (seen == 0 || failure.empty()); ++i) run_bounded(loop, pause_for(&loop, 10ms));
    CHECK(seen == 9);
    CHECK(failure == "bad input 3");
}

TEST_CASE("an exception from a done callback never reaches the caller of add_done_callback: both paths go to the loop's "
          "handler, and the callbacks after it still run") {
    coproc::event_loop loop;
    reported_errors reported;
    loop.set_unhandled_exception_handler(std::ref(reported));

    // Already final: the callback runs inside add_done_callback.
    auto ready = coproc::make_ready_future(1);
    bool escaped = false;
    bool later_ran = false;
    run_bounded(loop, throw_from_callback_on_loop(&loop, &ready, &escaped, &later_ran), 2s);
    CHECK_FALSE(escaped);
    CHECK(later_ran);
    REQUIRE(reported.messages.size() == 1);
    CHECK(reported.messages[0] == "callback failed inline");

    // Not final yet: the callback runs on the loop when the task ends.
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto pending = pool.submit<square>(4);
    bool second_ran = false;
    CHECK_NOTHROW(pending.add_done_callback([](const future<int>&) { throw std::runtime_error("callback failed on the loop"); }));
    pending.add_done_callback([&](const future<int>&) { second_ran = true; });
    CHECK(run_bounded(loop, await_future(std::move(pending))) == 16);
    run_bounded(loop, pause_for(&loop, 10ms));
    CHECK(second_ran);
    REQUIRE(reported.messages.size() == 2);
    CHECK(reported.messages[1] == "callback failed on the loop");

    // A pool future that is already final, on the loop thread: inline, and
    // to the handler as well.
    auto done = pool.submit<square>(6);
    run_bounded(loop, until_done(&loop, &done));
    escaped = false;
    later_ran = false;
    run_bounded(loop, throw_from_callback_on_loop(&loop, &done, &escaped, &later_ran), 2s);
    CHECK_FALSE(escaped);
    CHECK(later_ran);
    REQUIRE(reported.messages.size() == 3);
    CHECK(reported.messages[2] == "callback failed inline");
}

TEST_CASE("an exception from a done callback on a thread that runs no loop is printed to stderr, not thrown") {
    auto ready = coproc::make_ready_future(3);
    bool escaped = false;
    bool later_ran = false;
    const std::string text = capture_stderr([&] {
        try {
            ready.add_done_callback([](const future<int>&) { throw std::runtime_error("callback failed off the loop"); });
            ready.add_done_callback([&](const future<int>&) { later_ran = true; });
        } catch (...) {
            escaped = true;
        }
    });
    CHECK_FALSE(escaped);
    CHECK(later_ran);
    CHECK(text.find("exception calling a done callback of a ready future") != std::string::npos);
    CHECK(text.find("callback failed off the loop") != std::string::npos);
}

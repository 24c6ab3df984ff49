// coproc::when_all: every task runs concurrently, results come back in
// order, and one failure cancels the rest and is rethrown.
#include "support.hpp"

#include <stdexcept>
#include <thread>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

using coproc::task;
using namespace test_support;

namespace {

task<int> number(int value) { co_return value; }
task<std::string> text(std::string value) { co_return value; }
task<void> nothing() { co_return; }

task<std::size_t> receive(coproc::event_loop* loop, int fd) {
    std::byte buffer[16];
    co_return co_await loop->recv(fd, buffer);
}

task<std::size_t> send_text(coproc::event_loop* loop, int fd, std::string message) {
    co_return co_await loop->send(fd, bytes_of(message));
}

task<int> delayed(coproc::event_loop* loop, int value, std::chrono::milliseconds delay) {
    co_await loop->sleep_for(delay);
    co_return value;
}

task<int> fail_after(coproc::event_loop* loop, std::chrono::milliseconds delay) {
    co_await loop->sleep_for(delay);
    throw std::invalid_argument("sibling failed");
}

task<int> waits_for_ever(coproc::event_loop* loop, bool* cancelled) {
    try {
        co_await loop->sleep_for(std::chrono::hours{1});
    } catch (const coproc::cancelled_error&) {
        *cancelled = true;
        throw;
    }
    co_return 0;
}

task<std::tuple<int, std::string, std::monostate>> mixed() {
    co_return co_await coproc::when_all(number(1), text("two"), nothing());
}

task<std::tuple<std::size_t, std::size_t>> receive_and_send(coproc::event_loop* loop, int in, int out) {
    // The receiver starts first and can only finish because the sender runs
    // while it is suspended: sequential execution would never complete.
    co_return co_await coproc::when_all(receive(loop, in), send_text(loop, out, "hello"));
}

task<std::vector<int>> many(coproc::event_loop* loop, int count) {
    std::vector<task<int>> tasks;
    for (int i = 0; i < count; ++i) tasks.push_back(delayed(loop, i, std::chrono::milliseconds{(count - i) % 7}));
    co_return co_await coproc::when_all(std::move(tasks));
}

task<void> many_void(int count, int* ran) {
    std::vector<task<void>> tasks;
    for (int i = 0; i < count; ++i) tasks.push_back(nothing());
    co_await coproc::when_all(std::move(tasks));
    *ran = count;
}

task<std::tuple<int, int>> one_fails(coproc::event_loop* loop, bool* cancelled) {
    co_return co_await coproc::when_all(waits_for_ever(loop, cancelled), fail_after(loop, 2ms));
}

task<std::tuple<int, int>> both_wait(coproc::event_loop* loop, bool* first, bool* second) {
    co_return co_await coproc::when_all(waits_for_ever(loop, first), waits_for_ever(loop, second));
}

} // namespace

TEST_CASE("when_all yields a tuple of every value, void as std::monostate") {
    coproc::event_loop loop;
    auto [one, two, none] = run_bounded(loop, mixed());
    CHECK(one == 1);
    CHECK(two == "two");
    (void)none;
}

TEST_CASE("when_all runs its tasks concurrently") {
    coproc::event_loop loop;
    socket_pair sockets;
    auto [received, sent] = run_bounded(loop, receive_and_send(&loop, sockets.first(), sockets.second()), 5s);
    CHECK(received == 5);
    CHECK(sent == 5);
}

TEST_CASE("when_all over a vector keeps the input order whatever the finishing order") {
    coproc::event_loop loop;
    const auto results = run_bounded(loop, many(&loop, 100));
    REQUIRE(results.size() == 100);
    for (int i = 0; i < 100; ++i) CHECK(results[static_cast<std::size_t>(i)] == i);
    int ran = 0;
    run_bounded(loop, many_void(50, &ran));
    CHECK(ran == 50);
}

TEST_CASE("when_all with a failing task cancels the others and rethrows the failure") {
    coproc::event_loop loop;
    bool cancelled = false;
    CHECK_THROWS_WITH_AS(run_bounded(loop, one_fails(&loop, &cancelled), 5s), "sibling failed", std::invalid_argument);
    CHECK(cancelled);
}

TEST_CASE("a stop of the awaiter's token cancels every task of when_all") {
    coproc::event_loop loop;
    bool first = false;
    bool second = false;
    std::stop_source stop;
    std::thread stopper([&] {
        std::this_thread::sleep_for(10ms);
        stop.request_stop();
    });
    CHECK_THROWS_AS(loop.run(both_wait(&loop, &first, &second), stop.get_token()), coproc::cancelled_error);
    stopper.join();
    CHECK(first);
    CHECK(second);
}

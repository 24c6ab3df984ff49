// Cancellation through std::stop_token: a stop request cancels the io_uring
// operation a task is suspended on, the task resumes promptly with
// coproc::cancelled_error, and no data is lost to a cancelled operation.
// Deadlines: coproc::with_timeout.
#include "support.hpp"

#include <random>
#include <stop_token>
#include <thread>

using coproc::task;
using namespace test_support;

namespace {

task<std::size_t> receive_one(coproc::event_loop* loop, int fd) {
    std::byte buffer[1];
    co_return co_await loop->recv(fd, buffer);
}

task<void> sleep_an_hour(coproc::event_loop* loop) { co_await loop->sleep_for(std::chrono::hours{1}); }

task<void> request_stop_later(coproc::event_loop* loop, std::stop_source* source) {
    co_await loop->sleep_for(2ms);
    source->request_stop();
}

// The inner recv runs under its own token, which a sibling stops; the outer
// task is not cancelled and reports what happened.
task<std::string> cancel_inner_only(coproc::event_loop* loop, int fd) {
    std::stop_source inner;
    std::string outcome;
    try {
        co_await coproc::when_all(coproc::with_stop_token(receive_one(loop, fd), inner.get_token()),
                                  request_stop_later(loop, &inner));
        outcome = "completed";
    } catch (const coproc::cancelled_error&) {
        outcome = "inner cancelled";
    }
    const std::stop_token own = co_await coproc::get_stop_token();
    co_return outcome + (own.stop_requested() ? ", outer stopped" : ", outer running");
}

// True when the task's own token is not stopped at first and is stopped
// right after `source` is: the task runs under `source`.
task<bool> runs_under(std::stop_source* source) {
    const std::stop_token own = co_await coproc::get_stop_token();
    const bool stopped_before = own.stop_requested();
    source->request_stop();
    co_return !stopped_before && own.stop_requested();
}

task<int> answer_after(coproc::event_loop* loop, std::chrono::milliseconds delay, bool* cancelled) {
    try {
        co_await loop->sleep_for(delay);
    } catch (const coproc::cancelled_error&) {
        *cancelled = true;
        throw;
    }
    co_return 42;
}

task<int> answer_with_deadline(coproc::event_loop* loop, std::chrono::milliseconds work, std::chrono::milliseconds deadline,
                               bool* cancelled) {
    co_return co_await coproc::with_timeout(answer_after(loop, work, cancelled), deadline);
}

task<std::size_t> receive_with_deadline(coproc::event_loop* loop, int fd) {
    std::byte buffer[4];
    co_return co_await coproc::with_timeout(loop->recv(fd, buffer), 5ms);
}

} // namespace

TEST_CASE("a stop request from another thread cancels a pending recv promptly and consumes nothing") {
    coproc::event_loop loop;
    socket_pair sockets;
    std::stop_source source;
    std::thread stopper([&] {
        std::this_thread::sleep_for(10ms);
        source.request_stop();
    });
    // The 5 s deadline only bounds the test; the stop ends the recv long before.
    CHECK_THROWS_AS(loop.run(coproc::with_timeout(receive_one(&loop, sockets.first()), 5s), source.get_token()),
                    coproc::cancelled_error);
    stopper.join();
    REQUIRE(::send(sockets.second(), "z", 1, 0) == 1);
    char byte = 0;
    CHECK(::recv(sockets.first(), &byte, 1, MSG_DONTWAIT) == 1);
    CHECK(byte == 'z');
}

TEST_CASE("a stop request cancels a pending timer promptly") {
    coproc::event_loop loop;
    std::stop_source source;
    std::thread stopper([&] {
        std::this_thread::sleep_for(10ms);
        source.request_stop();
    });
    const auto start = std::chrono::steady_clock::now();
    CHECK_THROWS_AS(loop.run(coproc::with_timeout(sleep_an_hour(&loop), 5s), source.get_token()), coproc::cancelled_error);
    stopper.join();
    // Not a speed check: an hour-long timer that was not cancelled would hit
    // the 5 s guard and throw timeout_error instead.
    CHECK(std::chrono::steady_clock::now() - start < 5s);
}

TEST_CASE("an operation awaited after the stop was requested is never submitted") {
    coproc::event_loop loop;
    socket_pair sockets;
    REQUIRE(::send(sockets.second(), "q", 1, 0) == 1);
    std::stop_source source;
    source.request_stop();
    CHECK_THROWS_AS(loop.run(receive_one(&loop, sockets.first()), source.get_token()), coproc::cancelled_error);
    // Had the recv been submitted, it would have taken the byte.
    char byte = 0;
    CHECK(::recv(sockets.first(), &byte, 1, MSG_DONTWAIT) == 1);
}

TEST_CASE("with_stop_token cancels the inner task only") {
    coproc::event_loop loop;
    socket_pair sockets;
    CHECK(run_bounded(loop, cancel_inner_only(&loop, sockets.first()), 5s) == "inner cancelled, outer running");
}

TEST_CASE("with_stop_token also follows the awaiter's own token") {
    coproc::event_loop loop;
    socket_pair sockets;
    std::stop_source outer;
    std::stop_source never_stopped;
    std::thread stopper([&] {
        std::this_thread::sleep_for(10ms);
        outer.request_stop();
    });
    CHECK_THROWS_AS(loop.run(coproc::with_timeout(coproc::with_stop_token(receive_one(&loop, sockets.first()), never_stopped.get_token()), 5s),
                             outer.get_token()),
                    coproc::cancelled_error);
    stopper.join();
}

TEST_CASE("a stop of the awaiter's token during with_timeout is a cancellation, not a timeout") {
    coproc::event_loop loop;
    std::stop_source outer;
    std::thread stopper([&] {
        std::this_thread::sleep_for(10ms);
        outer.request_stop();
    });
    CHECK_THROWS_AS(loop.run(coproc::with_timeout(sleep_an_hour(&loop), 5s), outer.get_token()), coproc::cancelled_error);
    stopper.join();
}

TEST_CASE("get_stop_token yields the token the task runs with") {
    coproc::event_loop loop;
    std::stop_source given_to_run;
    CHECK(loop.run(runs_under(&given_to_run), given_to_run.get_token()));
    std::stop_source given_to_with_stop_token;
    CHECK(loop.run(coproc::with_stop_token(runs_under(&given_to_with_stop_token), given_to_with_stop_token.get_token())));
    std::stop_source unrelated;
    CHECK_FALSE(loop.run(runs_under(&unrelated)));
}

TEST_CASE("with_timeout: the deadline expires with timeout_error and the work is cancelled") {
    coproc::event_loop loop;
    bool cancelled = false;
    CHECK_THROWS_AS(run_bounded(loop, answer_with_deadline(&loop, std::chrono::milliseconds{3'600'000}, 5ms, &cancelled), 5s),
                    coproc::timeout_error);
    CHECK(cancelled);
}

TEST_CASE("with_timeout: work that beats the deadline yields its value") {
    coproc::event_loop loop;
    bool cancelled = false;
    CHECK(run_bounded(loop, answer_with_deadline(&loop, 1ms, 2000ms, &cancelled), 5s) == 42);
    CHECK_FALSE(cancelled);
}

TEST_CASE("with_timeout on a bare operation: a recv with no data times out") {
    coproc::event_loop loop;
    socket_pair sockets;
    try {
        run_bounded(loop, receive_with_deadline(&loop, sockets.first()), 5s);
        FAIL("the recv did not time out");
    } catch (const coproc::timeout_error& error) {
        CHECK(std::string(error.what()).find("5 ms") != std::string::npos);
    }
}

TEST_CASE("racing a stop against a completing recv: every byte is received exactly once") {
    // Each round a helper thread sends one byte and requests a stop, in
    // random order at random moments. The recv either gets the byte or is cancelled, in which case
    // the byte must still be in the socket: a cancelled operation loses nothing.
    coproc::event_loop loop;
    socket_pair sockets;
    std::mt19937 random{42};
    std::uniform_int_distribution<int> pause_us{0, 60};
    constexpr int rounds = 1000;
    int received_by_recv = 0;
    int left_in_socket = 0;
    int cancelled = 0;
    for (int round = 0; round < rounds; ++round) {
        std::stop_source source;
        const int first_pause = pause_us(random);
        const int second_pause = pause_us(random);
        const bool stop_first = (random() & 1) != 0;
        bool sent = false;
        std::thread helper([&, first_pause, second_pause, stop_first] {
            std::this_thread::sleep_for(std::chrono::microseconds{first_pause});
            if (stop_first) {
                source.request_stop();
            } else {
                sent = ::send(sockets.second(), "r", 1, 0) == 1;
            }
            std::this_thread::sleep_for(std::chrono::microseconds{second_pause});
            if (stop_first) {
                sent = ::send(sockets.second(), "r", 1, 0) == 1;
            } else {
                source.request_stop();
            }
        });
        try {
            received_by_recv += static_cast<int>(loop.run(coproc::with_timeout(receive_one(&loop, sockets.first()), 5s), source.get_token()));
        } catch (const coproc::cancelled_error&) {
            ++cancelled;
        }
        helper.join();
        REQUIRE(sent);
        char byte = 0;
        while (::recv(sockets.first(), &byte, 1, MSG_DONTWAIT) == 1) ++left_in_socket;
        // A stale cancellation of this round must not hit the next operation,
        // which may well reuse the same frame address: one that nobody stops
        // has to complete.
        REQUIRE(::send(sockets.second(), "s", 1, 0) == 1);
        CHECK(loop.run(coproc::with_timeout(receive_one(&loop, sockets.first()), 5s)) == 1);
    }
    CHECK(received_by_recv + left_in_socket == rounds);
    // Both outcomes must occur, or the race was not exercised.
    CHECK(cancelled > 0);
    CHECK(received_by_recv > 0);
    MESSAGE("recv got " << received_by_recv << " bytes, " << cancelled << " rounds cancelled");
}

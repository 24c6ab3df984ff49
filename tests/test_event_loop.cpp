// coproc::event_loop: run, spawn, post from many threads, stop(), the
// unhandled-exception handler, thread binding, and ring set-up flags.
#include "support.hpp"

#include "ring_setup.hpp"

#include <atomic>
#include <cstdio>
#include <fcntl.h>
#include <memory>
#include <stdexcept>
#include <string>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/utsname.h>
#include <thread>
#include <vector>

using coproc::task;
using namespace test_support;

namespace {

task<void> add_after(coproc::event_loop* loop, int* counter, std::chrono::milliseconds delay) {
    co_await loop->sleep_for(delay);
    ++*counter;
}

task<void> fails_with(std::string message) {
    throw std::runtime_error(message);
    co_return;
}

task<void> wait_for_count(coproc::event_loop* loop, const std::atomic<long>* count, long expected) {
    while (count->load(std::memory_order_relaxed) < expected) co_await loop->sleep_for(1ms);
}

task<std::size_t> receive_one(coproc::event_loop* loop, int fd) {
    std::byte buffer[16];
    co_return co_await loop->recv(fd, buffer);
}

// Keeps `alive` set for as long as the coroutine frame exists.
struct frame_guard {
    std::shared_ptr<bool> alive;
    explicit frame_guard(std::shared_ptr<bool> flag) : alive(std::move(flag)) { *alive = true; }
    ~frame_guard() { *alive = false; }
};

task<void> sleeps_forever(coproc::event_loop* loop, std::shared_ptr<bool> alive, bool* cancelled) {
    frame_guard guard{std::move(alive)};
    try {
        co_await loop->sleep_for(std::chrono::hours{1});
    } catch (const coproc::cancelled_error&) {
        *cancelled = true;
        throw;
    }
}

task<void> receives_forever(coproc::event_loop* loop, int fd, std::shared_ptr<bool> alive) {
    frame_guard guard{std::move(alive)};
    std::byte buffer[64];
    co_await loop->recv(fd, buffer);
}

task<void> nested_run(coproc::event_loop* loop) {
    loop->run(add_after(loop, nullptr, 0ms));
    co_return;
}

// Runs a second loop to completion from inside a coroutine of the first,
// then awaits on the first again: the first must still be current.
task<int> run_inner_loop(coproc::event_loop* outer) {
    int inner_count = 0;
    {
        coproc::event_loop inner;
        inner.run(add_after(&inner, &inner_count, 1ms));
    }
    co_await outer->sleep_for(1ms);
    co_return inner_count + (coproc::event_loop::current() == outer ? 10 : 0);
}

int kernel_version() {
    ::utsname name{};
    ::uname(&name);
    int major = 0, minor = 0;
    std::sscanf(name.release, "%d.%d", &major, &minor);
    return major * 100 + minor;
}

} // namespace

TEST_CASE("spawn starts a detached task that runs while the loop runs") {
    coproc::event_loop loop;
    int counter = 0;
    loop.spawn(add_after(&loop, &counter, 1ms));
    loop.spawn(add_after(&loop, &counter, 2ms));
    CHECK(counter == 0); // nothing runs before the loop does
    run_bounded(loop, add_after(&loop, &counter, 50ms));
    CHECK(counter == 3);
}

TEST_CASE("an exception escaping a spawned task reaches the handler, never silently dropped") {
    coproc::event_loop loop;
    std::vector<std::string> reported;
    loop.set_unhandled_exception_handler([&](std::exception_ptr error) {
        try {
            std::rethrow_exception(error);
        } catch (const std::runtime_error& e) {
            reported.emplace_back(e.what());
        }
    });
    loop.spawn(fails_with("first"));
    loop.spawn(fails_with("second"));
    int counter = 0;
    run_bounded(loop, add_after(&loop, &counter, 5ms));
    REQUIRE(reported.size() == 2);
    CHECK((reported[0] == "first" || reported[1] == "first"));
    CHECK((reported[0] == "second" || reported[1] == "second"));
}

TEST_CASE("without a handler, an escaping exception is printed to stderr") {
    const std::string text = capture_stderr([] {
        coproc::event_loop loop;
        loop.spawn(fails_with("nobody caught me"));
        int counter = 0;
        run_bounded(loop, add_after(&loop, &counter, 1ms));
    });
    CHECK(text.find("nobody caught me") != std::string::npos);
}

TEST_CASE("an exception escaping a posted function reaches the handler") {
    coproc::event_loop loop;
    int reports = 0;
    loop.set_unhandled_exception_handler([&](std::exception_ptr) { ++reports; });
    loop.post([] { throw std::logic_error("posted failure"); });
    int counter = 0;
    run_bounded(loop, add_after(&loop, &counter, 1ms));
    CHECK(reports == 1);
}

TEST_CASE("4 threads x 100,000 post calls: each function runs exactly once, in order per thread") {
    coproc::event_loop loop;
    constexpr int threads = 4;
    constexpr int per_thread = 100'000;
    std::vector<unsigned char> runs(threads * per_thread, 0);
    std::vector<int> last_seen(threads, -1);
    std::atomic<long> total{0};
    bool in_order = true;
    std::vector<std::thread> posters;
    for (int t = 0; t < threads; ++t) {
        posters.emplace_back([&, t] {
            for (int i = 0; i < per_thread; ++i) {
                loop.post([&, t, i] {
                    ++runs[static_cast<std::size_t>(t * per_thread + i)];
                    if (last_seen[static_cast<std::size_t>(t)] != i - 1) in_order = false;
                    last_seen[static_cast<std::size_t>(t)] = i;
                    total.fetch_add(1, std::memory_order_relaxed);
                });
            }
        });
    }
    run_bounded(loop, wait_for_count(&loop, &total, threads * per_thread), 60s);
    for (auto& poster : posters) poster.join();
    CHECK(total.load() == threads * per_thread);
    CHECK(std::count(runs.begin(), runs.end(), 1) == threads * per_thread);
    CHECK(in_order);
}

TEST_CASE("post from another thread wakes a loop blocked in the kernel") {
    coproc::event_loop loop;
    socket_pair sockets;
    std::thread poster([&] {
        std::this_thread::sleep_for(20ms); // let the loop block in io_uring_enter
        loop.post([fd = sockets.second()] { CHECK(::send(fd, "x", 1, 0) == 1); });
    });
    CHECK(run_bounded(loop, receive_one(&loop, sockets.first()), 5s) == 1);
    poster.join();
}

TEST_CASE("stop() from another thread cancels in-flight operations and run() returns") {
    coproc::event_loop loop;
    socket_pair sockets;
    auto spawned_alive = std::make_shared<bool>(false);
    bool spawned_cancelled = false;
    loop.spawn(sleeps_forever(&loop, spawned_alive, &spawned_cancelled));
    std::thread stopper([&] {
        std::this_thread::sleep_for(20ms);
        loop.stop();
    });
    CHECK_THROWS_AS(run_bounded(loop, receive_one(&loop, sockets.first()), 5s), coproc::cancelled_error);
    stopper.join();
    CHECK(spawned_cancelled);
    CHECK_FALSE(*spawned_alive); // the spawned task unwound and its frame is gone

    // The loop serves again after a stop.
    int counter = 0;
    run_bounded(loop, add_after(&loop, &counter, 1ms));
    CHECK(counter == 1);
}

TEST_CASE("destroying the loop with operations in flight leaks no fd and destroys every frame") {
    const int fds_before = count_open_fds();
    auto recv_alive = std::make_shared<bool>(false);
    auto sleep_alive = std::make_shared<bool>(false);
    {
        socket_pair sockets;
        bool cancelled = false;
        {
            coproc::event_loop loop;
            loop.spawn(receives_forever(&loop, sockets.first(), recv_alive));
            loop.spawn(sleeps_forever(&loop, sleep_alive, &cancelled));
            int counter = 0;
            run_bounded(loop, add_after(&loop, &counter, 5ms));
            CHECK(*recv_alive);
            CHECK(*sleep_alive);
        }
        CHECK_FALSE(*recv_alive);
        CHECK_FALSE(*sleep_alive);
        CHECK_FALSE(cancelled); // destruction does not resume coroutines
        // The cancelled recv consumed nothing: data sent now is still there.
        REQUIRE(::send(sockets.second(), "after", 5, 0) == 5);
        char buffer[8];
        CHECK(::recv(sockets.first(), buffer, sizeof buffer, MSG_DONTWAIT) == 5);
    }
    CHECK(count_open_fds() == fds_before);
}

TEST_CASE("the loop is bound to the thread that first runs it") {
    coproc::event_loop loop;
    int counter = 0;
    run_bounded(loop, add_after(&loop, &counter, 0ms));
    bool threw_logic_error = false;
    std::thread other([&] {
        try {
            loop.run(add_after(&loop, &counter, 0ms));
        } catch (const std::logic_error&) {
            threw_logic_error = true;
        }
    });
    other.join();
    if (loop.features().single_issuer) {
        CHECK(threw_logic_error);
    }
    CHECK_THROWS_AS(loop.run(nested_run(&loop)), std::logic_error);
}

TEST_CASE("a loop run and destroyed inside a coroutine of another loop leaves the outer loop current") {
    coproc::event_loop loop;
    CHECK(run_bounded(loop, run_inner_loop(&loop)) == 11);
}

TEST_CASE("stop() while no thread runs the loop cancels the next run") {
    coproc::event_loop loop;
    loop.stop();
    CHECK_THROWS_AS(run_bounded(loop, add_after(&loop, nullptr, std::chrono::milliseconds{3'600'000})), coproc::cancelled_error);
    int counter = 0;
    run_bounded(loop, add_after(&loop, &counter, 1ms)); // the stop was consumed
    CHECK(counter == 1);
}

TEST_CASE("spawn from another thread while the loop runs throws std::logic_error") {
    coproc::event_loop loop;
    socket_pair sockets;
    bool threw = false;
    std::thread other([&] {
        const auto deadline = std::chrono::steady_clock::now() + 5s;
        while (!loop.running() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
        try {
            loop.spawn(add_after(&loop, nullptr, 0ms));
        } catch (const std::logic_error&) {
            threw = true;
        }
        CHECK(::send(sockets.second(), "x", 1, 0) == 1); // lets the loop finish
    });
    run_bounded(loop, receive_one(&loop, sockets.first()), 5s);
    other.join();
    CHECK(threw);
}

TEST_CASE("a loop constructed on one thread can be run on another") {
    coproc::event_loop loop;
    int counter = 0;
    std::thread runner([&] { run_bounded(loop, add_after(&loop, &counter, 1ms)); });
    runner.join();
    CHECK(counter == 1);
}

TEST_CASE("the ring uses single-issuer and deferred task-run where the kernel has them") {
    coproc::event_loop loop{coproc::event_loop_options{.backend = coproc::event_loop_backend::io_uring}};
    const auto& features = loop.features();
    if (kernel_version() >= 601) {
        CHECK(features.single_issuer);
        CHECK(features.defer_taskrun);
        CHECK(features.submit_all);
    } else if (kernel_version() >= 519) {
        CHECK(features.coop_taskrun);
    }
}

TEST_CASE("ring set-up falls back to fewer flags when the kernel rejects a set with EINVAL") {
    ::io_uring ring{};
    unsigned accepted = 12345;
    const unsigned unknown_flag = 1U << 31; // no kernel knows this one
    const unsigned attempts[] = {unknown_flag | IORING_SETUP_CQSIZE, 0};
    REQUIRE(coproc::detail::create_ring(ring, 8, attempts, accepted) == 0);
    CHECK(accepted == 0);
    ::io_uring_queue_exit(&ring);

    const unsigned only_bad[] = {unknown_flag};
    CHECK(coproc::detail::create_ring(ring, 8, only_bad, accepted) == -EINVAL);
}

TEST_CASE("event_loop_options with zero entries is rejected") {
    CHECK_THROWS_AS(coproc::event_loop(coproc::event_loop_options{.entries = 0}), std::invalid_argument);
}

// --- driving the loop from another event loop: poll_ready() and wait_fd()

namespace {

// poll_ready() needs the epoll backend (see event_loop.hpp).
const coproc::event_loop_options externally_driven{.backend = coproc::event_loop_backend::epoll};

task<void> echo_count(coproc::event_loop* loop, int fd, int messages, int* received) {
    std::byte buffer[1];
    for (int i = 0; i < messages; ++i) {
        if (co_await loop->recv(fd, buffer) != 1) co_return;
        ++*received;
    }
}

// Drives `loop` with poll_ready() until `done()`, waiting on wait_fd() with
// an edge-triggered epoll between calls, as Asio's reactor does. Fails the
// test when no wake-up comes within `bound` while work is outstanding.
template <class Done>
bool drive_edge_triggered(coproc::event_loop& loop, Done done, std::chrono::milliseconds bound) {
    const int epoll = ::epoll_create1(EPOLL_CLOEXEC);
    REQUIRE(epoll >= 0);
    ::epoll_event interest{};
    interest.events = EPOLLIN | EPOLLET;
    REQUIRE(::epoll_ctl(epoll, EPOLL_CTL_ADD, loop.wait_fd(), &interest) == 0);
    bool woke_every_time = true;
    const auto give_up = std::chrono::steady_clock::now() + 4 * bound;
    while (!done() && std::chrono::steady_clock::now() < give_up) {
        if (loop.poll_ready()) continue;
        if (done()) break;
        ::epoll_event event{};
        if (::epoll_wait(epoll, &event, 1, static_cast<int>(bound.count())) != 1) {
            woke_every_time = false;
            break;
        }
    }
    ::close(epoll);
    return woke_every_time;
}

task<int> receive_nothing_quickly(coproc::event_loop* loop) {
    co_await loop->sleep_for(1ms);
    co_return 0;
}

} // namespace

TEST_CASE("poll_ready runs what is ready without blocking; wait_fd wakes for a timer") {
    coproc::event_loop loop{externally_driven};
    int counter = 0;
    // A timer far enough ahead that a descheduled test thread does not see
    // it fire during the first poll_ready.
    loop.spawn(add_after(&loop, &counter, 300ms));
    const auto start = std::chrono::steady_clock::now();
    CHECK_FALSE(loop.poll_ready()); // the task now sleeps; nothing is ready
    CHECK(std::chrono::steady_clock::now() - start < 250ms); // it did not wait for the timer
    CHECK(counter == 0);
    CHECK_FALSE(loop.running());
    ::pollfd watch{loop.wait_fd(), POLLIN, 0};
    REQUIRE(::poll(&watch, 1, 5000) == 1); // level-triggered: the timer's completion
    while (counter == 0 && loop.poll_ready()) {
    }
    if (counter == 0) loop.poll_ready();
    CHECK(counter == 1);
    // Once nothing happens, the readiness is consumed: a level-triggered
    // poller does not spin.
    CHECK_FALSE(loop.poll_ready());
    CHECK_FALSE(loop.poll_ready());
    CHECK(::poll(&watch, 1, 0) == 0);
}

TEST_CASE("wait_fd turns readable for post() from another thread, edge-triggered, with no lost wake-up") {
    coproc::event_loop loop{externally_driven};
    CHECK_FALSE(loop.poll_ready());
    constexpr int posts = 2000;
    std::atomic<int> ran{0};
    std::thread poster([&] {
        for (int i = 0; i < posts; ++i) {
            loop.post([&] { ran.fetch_add(1, std::memory_order_relaxed); });
            if (i % 64 == 0) std::this_thread::sleep_for(100us);
        }
    });
    const bool woke = drive_edge_triggered(loop, [&] { return ran.load() == posts; }, 5000ms);
    poster.join();
    CHECK(woke);
    CHECK(ran.load() == posts);
}

TEST_CASE("wait_fd turns readable for each completion of socket I/O, edge-triggered") {
    coproc::event_loop loop{externally_driven};
    socket_pair sockets;
    constexpr int messages = 500;
    int received = 0;
    loop.spawn(echo_count(&loop, sockets.first(), messages, &received));
    CHECK_FALSE(loop.poll_ready());
    std::atomic<int> sent{0};
    std::thread sender([&] {
        // Bounded: a receiver that stopped must not leave this thread blocked.
        const auto give_up = std::chrono::steady_clock::now() + 10s;
        while (sent.load() < messages && std::chrono::steady_clock::now() < give_up) {
            if (::send(sockets.second(), "x", 1, MSG_NOSIGNAL | MSG_DONTWAIT) == 1) sent.fetch_add(1);
            std::this_thread::sleep_for(50us);
        }
    });
    const bool woke = drive_edge_triggered(loop, [&] { return received == messages; }, 5000ms);
    sender.join();
    CHECK(woke);
    CHECK(received == messages);
}

TEST_CASE("stop() from another thread reaches a loop driven by poll_ready") {
    coproc::event_loop loop{externally_driven};
    auto alive = std::make_shared<bool>(false);
    bool cancelled = false;
    loop.spawn(sleeps_forever(&loop, alive, &cancelled));
    CHECK_FALSE(loop.poll_ready());
    REQUIRE(*alive);
    std::thread stopper([&] { loop.stop(); });
    const bool woke = drive_edge_triggered(loop, [&] { return !*alive; }, 5000ms);
    stopper.join();
    CHECK(woke);
    CHECK(cancelled);
}

TEST_CASE("poll_ready follows run()'s thread rules") {
    coproc::event_loop loop{externally_driven};
    CHECK_FALSE(loop.poll_ready());
    if (loop.features().single_issuer) {
        std::thread other([&] { CHECK_THROWS_AS(loop.poll_ready(), std::logic_error); });
        other.join();
    }
    loop.post([&] { CHECK_THROWS_AS(loop.poll_ready(), std::logic_error); });
    run_bounded(loop, pause_for(&loop, 1ms), 5s);
}

TEST_CASE("a loop left between poll_ready calls with work pending is destroyed cleanly") {
    const int fds_before = count_open_fds();
    auto alive = std::make_shared<bool>(false);
    {
        coproc::event_loop loop{externally_driven};
        socket_pair sockets;
        loop.spawn(receives_forever(&loop, sockets.first(), alive));
        CHECK_FALSE(loop.poll_ready());
        CHECK(*alive);
    }
    CHECK_FALSE(*alive);
    CHECK(count_open_fds() == fds_before);
}

TEST_CASE("poll_ready on an io_uring loop throws std::logic_error that names the fix") {
    coproc::event_loop loop{coproc::event_loop_options{.backend = coproc::event_loop_backend::io_uring}};
    CHECK(loop.wait_fd() == -1);
    try {
        loop.poll_ready();
        FAIL("poll_ready did not throw");
    } catch (const std::logic_error& e) {
        CHECK(std::string(e.what()).find("event_loop_backend::epoll") != std::string::npos);
    }
    CHECK_FALSE(loop.running());
    CHECK(run_bounded(loop, receive_nothing_quickly(&loop), 5s) == 0); // still usable with run()
}

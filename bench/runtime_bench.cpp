// Runtime micro-benchmarks, each beside its plain anchor, in one run:
//
//   await   co_await of a task that completes synchronously   vs  a plain function call
//   pingpong  one-byte round trip over a socket pair between two coroutines on one loop
//             vs  the same exchange between two threads with blocking read/write
//   post    functions posted from another thread and run on the loop (per second)
//
// Usage: runtime_bench [--quick]   (--quick: a few iterations, for CI's harness check)
#include <coproc/coproc.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>

using clock_type = std::chrono::steady_clock;

namespace {

double seconds_since(clock_type::time_point start) {
    return std::chrono::duration<double>(clock_type::now() - start).count();
}

[[gnu::noinline]] int plain_value(int x) { return x + 1; }

coproc::task<int> task_value(int x) { co_return x + 1; }

coproc::task<long> await_many(long count) {
    long sum = 0;
    for (long i = 0; i < count; ++i) sum += co_await task_value(static_cast<int>(i & 1));
    co_return sum;
}

coproc::task<void> echo_bytes(coproc::event_loop* loop, int fd, long count) {
    std::byte byte[1];
    for (long i = 0; i < count; ++i) {
        co_await loop->recv(fd, byte);
        co_await loop->send(fd, byte);
    }
}

coproc::task<void> ping_bytes(coproc::event_loop* loop, int fd, long count) {
    std::byte byte[1]{std::byte{'p'}};
    for (long i = 0; i < count; ++i) {
        co_await loop->send(fd, byte);
        co_await loop->recv(fd, byte);
    }
}

coproc::task<void> ping_pong(coproc::event_loop* loop, int a, int b, long count) {
    co_await coproc::when_all(echo_bytes(loop, b, count), ping_bytes(loop, a, count));
}

double plain_ping_pong_us(long count) {
    int fds[2];
    ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds);
    std::thread echo([fd = fds[1], count] {
        char byte;
        for (long i = 0; i < count; ++i) {
            if (::read(fd, &byte, 1) != 1 || ::write(fd, &byte, 1) != 1) return;
        }
    });
    char byte = 'p';
    const auto start = clock_type::now();
    for (long i = 0; i < count; ++i) {
        if (::write(fds[0], &byte, 1) != 1 || ::read(fds[0], &byte, 1) != 1) break;
    }
    const double elapsed = seconds_since(start);
    echo.join();
    ::close(fds[0]);
    ::close(fds[1]);
    return elapsed / static_cast<double>(count) * 1e6;
}

coproc::task<void> wait_until(coproc::event_loop* loop, const std::atomic<long>* done, long target) {
    while (done->load(std::memory_order_relaxed) < target) co_await loop->sleep_for(std::chrono::microseconds{200});
}

} // namespace

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
    const long awaits = quick ? 10'000 : 20'000'000;
    const long round_trips = quick ? 1'000 : 100'000;
    const long posts = quick ? 10'000 : 2'000'000;

    coproc::event_loop loop;

    // await vs plain call
    auto start = clock_type::now();
    volatile long plain_sum = 0;
    for (long i = 0; i < awaits; ++i) plain_sum = plain_sum + plain_value(static_cast<int>(i & 1));
    const double plain_ns = seconds_since(start) / static_cast<double>(awaits) * 1e9;
    start = clock_type::now();
    const long task_sum = loop.run(await_many(awaits));
    const double task_ns = seconds_since(start) / static_cast<double>(awaits) * 1e9;
    if (task_sum != plain_sum) std::fprintf(stderr, "await: sums differ\n");

    // ping-pong, coproc and plain, interleaved twice
    double coproc_us = 0;
    double plain_us = 0;
    for (int round = 0; round < 2; ++round) {
        int fds[2];
        ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds);
        start = clock_type::now();
        loop.run(ping_pong(&loop, fds[0], fds[1], round_trips));
        coproc_us += seconds_since(start) / static_cast<double>(round_trips) * 1e6 / 2;
        ::close(fds[0]);
        ::close(fds[1]);
        plain_us += plain_ping_pong_us(round_trips) / 2;
    }

    // post throughput from one foreign thread
    std::atomic<long> done{0};
    start = clock_type::now();
    std::thread poster([&] {
        for (long i = 0; i < posts; ++i) loop.post([&done] { done.fetch_add(1, std::memory_order_relaxed); });
    });
    loop.run(wait_until(&loop, &done, posts));
    const double post_rate = static_cast<double>(posts) / seconds_since(start);
    poster.join();

    std::printf("| workload | coproc | anchor | coproc/anchor |\n|---|---|---|---|\n");
    std::printf("| co_await of a synchronous task (ns) | %.2f | %.2f (plain call) | %.1fx |\n", task_ns, plain_ns, task_ns / plain_ns);
    std::printf("| socketpair 1-byte round trip (us) | %.2f (two coroutines, one loop) | %.2f (two threads, blocking) | %.2fx |\n",
                coproc_us, plain_us, coproc_us / plain_us);
    std::printf("| post() from another thread (M/s) | %.2f | - | - |\n", post_rate / 1e6);
    std::printf("%s run: %ld awaits, %ld round trips, %ld posts\n", quick ? "quick" : "full", awaits, round_trips, posts);
    return 0;
}

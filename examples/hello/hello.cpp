// hello: the main example. A CPU-heavy function (counting primes) over many
// input ranges, once inline and once through a process pool; prints both
// times, the speedup, and whether the results match.
//
//   meson setup build && meson compile -C build && build/examples/hello
#include <coproc/coproc.hpp>

#include <chrono>
#include <cstdio>
#include <utility>
#include <vector>

namespace {

// Primes in [from, to), by trial division: deliberately CPU-bound.
long count_primes(long from, long to) {
    long count = 0;
    for (long n = from < 2 ? 2 : from; n < to; ++n) {
        bool prime = true;
        for (long d = 2; d * d <= n; ++d) {
            if (n % d == 0) {
                prime = false;
                break;
            }
        }
        count += prime;
    }
    return count;
}

coproc::task<std::vector<long>> count_in_pool(coproc::process_pool* pool, std::vector<std::pair<long, long>> ranges) {
    std::vector<coproc::future<long>> futures;
    for (const auto& [from, to] : ranges) futures.push_back(pool->submit<count_primes>(from, to));
    std::vector<long> counts;
    for (auto& pending : futures) counts.push_back(co_await std::move(pending));
    co_return counts;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

} // namespace

int main(int argc, char** argv) {
    coproc::run_worker_if_requested(argc, argv); // a worker never returns from here

    constexpr long limit = 1'500'000;
    constexpr long chunks = 48;
    std::vector<std::pair<long, long>> ranges;
    for (long i = 0; i < chunks; ++i) ranges.emplace_back(limit * i / chunks, limit * (i + 1) / chunks);

    auto start = std::chrono::steady_clock::now();
    std::vector<long> inline_counts;
    for (const auto& [from, to] : ranges) inline_counts.push_back(count_primes(from, to));
    const double inline_seconds = seconds_since(start);

    start = std::chrono::steady_clock::now();
    coproc::event_loop loop;
    coproc::process_pool pool{loop}; // one worker per CPU this process may use
    const std::vector<long> pool_counts = loop.run(count_in_pool(&pool, ranges));
    const double pool_seconds = seconds_since(start);

    long total = 0;
    for (long count : pool_counts) total += count;
    const bool match = pool_counts == inline_counts;
    std::printf("primes below %ld: %ld\n", limit, total);
    std::printf("inline:           %.3f s\n", inline_seconds);
    std::printf("process pool:     %.3f s with %zu workers (pool start included)\n", pool_seconds,
                pool.stats().workers_started);
    std::printf("speedup:          %.2fx\n", inline_seconds / pool_seconds);
    std::printf("results match:    %s\n", match ? "yes" : "NO");
    return match ? 0 : 1;
}

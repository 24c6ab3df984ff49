// progress: long tasks report how far they got (coproc::report_progress in
// the worker), and the parent draws one progress bar per task as the
// reports arrive (future::on_progress, on the loop thread). The worker sends
// at most one report per progress_interval, however often the task reports,
// and always its last one before the result.
//
// Then a stream task (process_pool::submit_stream) sends partial results
// as it goes: the count of primes in each block of candidates, which the
// parent adds up and draws as they arrive (stream<T>::next), long before
// the task ends. The worker runs at most a window of blocks ahead of the
// parent.
#include <coproc/coproc.hpp>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <optional>
#include <string>

namespace {

// The primes below `limit`, by trial division: slow on purpose. Reports the
// fraction of candidates tested after each one: millions of reports, of
// which the parent sees one per progress_interval (100 ms here) and the last.
long count_primes(long limit) {
    long count = 0;
    for (long n = 2; n < limit; ++n) {
        bool prime = true;
        for (long d = 2; d * d <= n; ++d) {
            if (n % d == 0) {
                prime = false;
                break;
            }
        }
        count += prime;
        coproc::report_progress(static_cast<double>(n) / static_cast<double>(limit - 1));
    }
    return count;
}

// One block's partial result: the primes in [from, to).
struct block_count {
    long from = 0;
    long to = 0;
    long primes = 0;
    template <class Archive>
    void serialize(Archive& archive) {
        archive(from, to, primes);
    }
};

bool is_prime(long n) {
    for (long d = 2; d * d <= n; ++d) {
        if (n % d == 0) return false;
    }
    return n >= 2;
}

// The primes below `limit`, counted a block at a time: each block's count
// goes to the parent as soon as it is known.
void count_primes_in_blocks(long limit, long block, coproc::sink<block_count>& out) {
    for (long from = 0; from < limit; from += block) {
        block_count partial{from, std::min(limit, from + block), 0};
        for (long n = partial.from; n < partial.to; ++n) partial.primes += is_prime(n);
        out.push(partial);
    }
}

// One bar per task, redrawn on one terminal line (a line per redraw when
// the output is not a terminal, as under the test suite).
struct bars {
    std::array<double, 2> done{};
    int redraws = 0;

    void update(std::size_t which, double fraction) {
        done[which] = fraction;
        ++redraws;
        std::string line;
        for (double part : done) {
            const int filled = static_cast<int>(part * 20 + 0.5);
            char bar[64];
            std::snprintf(bar, sizeof bar, "[%-20.*s] %3d%%  ", filled, "####################",
                          static_cast<int>(part * 100 + 0.5));
            line += bar;
        }
        std::printf(::isatty(STDOUT_FILENO) ? "\r%s" : "%s\n", line.c_str());
        std::fflush(stdout);
    }
};

// `progress` outlives the loop's run: a callback may be called for a report
// that arrived just before a result, after the coroutine was resumed.
coproc::task<int> demonstrate(coproc::process_pool* pool, bars* progress) {
    auto small = pool->submit<count_primes>(1'000'000);
    auto large = pool->submit<count_primes>(2'000'000);
    small.on_progress([progress](double fraction) { progress->update(0, fraction); });
    large.on_progress([progress](double fraction) { progress->update(1, fraction); });
    const long below_small = co_await small;
    const long below_large = co_await large;
    if (::isatty(STDOUT_FILENO)) std::printf("\n");
    std::printf("%ld primes below 1000000, %ld below 2000000; %d redraws\n", below_small, below_large,
                progress->redraws);
    // The last report of each task arrived before its result.
    const bool complete = small.latest_progress() == 1.0 && large.latest_progress() == 1.0;
    if (below_small != 78'498 || below_large != 148'933 || !complete) co_return 1;

    // Partial results, streamed: a running total after each block.
    constexpr long limit = 2'000'000;
    auto blocks = pool->submit_stream<count_primes_in_blocks>(limit, 100'000);
    long total = 0;
    int received = 0;
    while (std::optional<block_count> partial = co_await blocks.next()) {
        total += partial->primes;
        ++received;
        const int filled = static_cast<int>(20 * partial->to / limit);
        std::printf(::isatty(STDOUT_FILENO) ? "\r[%-20.*s] %ld primes below %ld" : "[%-20.*s] %ld primes below %ld\n",
                    filled, "####################", total, partial->to);
        std::fflush(stdout);
    }
    if (::isatty(STDOUT_FILENO)) std::printf("\n");
    std::printf("%d partial results streamed; %ld primes below %ld\n", received, total, limit);
    co_return total == 148'933 && received == 20 ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
    coproc::run_worker_if_requested(argc, argv);
    bars progress;
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2, .progress_interval = std::chrono::milliseconds{100}}};
    return loop.run(demonstrate(&pool, &progress));
}

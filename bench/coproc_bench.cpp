// coproc's side of the benchmarks. One workload per run, so that the
// harness (bench/harness.py) can interleave it with the anchors; prints one
// JSON object on stdout.
//
//   coproc_bench [--quick] WORKLOAD [N]
//
// Workloads (no-op tasks unless said), with 2 workers:
//   latency       sequential submit + await of a no-op: p50/p99 round trip (us)
//   throughput    many concurrent no-op submits, all awaited: tasks/s
//                 (both also give the context switches per task of the
//                 parent and of the workers, all threads: voluntary,
//                 involuntary; see switch_counts.hpp)
//   map           map over N integers, chunksize 1000: items/s
//   echo          a 64 MiB byte buffer to a worker and back: GiB/s of the
//                 first echo in a fresh pool, and the median of 5 more; and,
//                 timed alone, encoding it into a frame buffer and decoding
//                 it into a new std::string (ms)
//   shared_echo   64 MiB in a coproc::shared_buffer through a task that
//                 reads every byte and writes a transformed copy (each byte
//                 XOR 0x5a) into a result buffer: GiB/s of the first in a
//                 fresh pool, the task creating the result buffer, and the
//                 median of 5 more into one result buffer reused (pages
//                 touched once)
//   startup       pool construction to first result, and shutdown (ms)
//   cpu           a CPU-heavy function on 2 workers against inline: speedup
//   memory        parent heap bytes per queued future, 1,000,000 queued
//   mixed         a pool with max_workers = 2 and default options otherwise:
//                 one CPU-bound task of 2 s submitted first, then CPU-bound
//                 tasks of 1 ms at 200 per second for 2 s, each submitted on
//                 schedule by a timer on the loop; p50/p99/max of the short
//                 tasks' submit-to-result time (ms). --quick: 0.2 s and 0.2 s
//   roundtrips N  N sequential no-op round trips, then a shutdown (run under
//                 callgrind by the harness to count instructions per round
//                 trip, in the parent and in the workers)
#include "switch_counts.hpp"

#include <coproc/coproc.hpp>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <ctime>
#include <malloc.h>
#include <map>
#include <span>
#include <string>
#include <unistd.h>
#include <utility>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;

void noop() {}
std::int64_t identity(std::int64_t x) { return x; }
std::string echo(std::string bytes) { return bytes; }

void transform_bytes(const coproc::shared_buffer& in, const coproc::shared_buffer& out) {
    const auto* from = reinterpret_cast<const std::uint64_t*>(in.data());
    auto* to = reinterpret_cast<std::uint64_t*>(out.data());
    for (std::size_t i = 0; i < in.size() / 8; ++i) to[i] = from[i] ^ 0x5a5a5a5a5a5a5a5aULL;
}
// The shared echo, fresh: the task makes the result buffer.
coproc::shared_buffer transform_new(coproc::shared_buffer in) {
    coproc::shared_buffer out{in.size()};
    transform_bytes(in, out);
    return out;
}
// ... and repeated: into the buffer the parent passes, reused.
void transform_into(coproc::shared_buffer in, coproc::shared_buffer out) { transform_bytes(in, out); }

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

// count_primes in a worker, with the worker's pid: the harness reports how
// the tasks were shared between the workers.
std::pair<long, int> count_primes_where(long from, long to) { return {count_primes(from, to), static_cast<int>(::getpid())}; }

// This thread's CPU time, in seconds.
double thread_cpu_seconds() {
    timespec now{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
    return static_cast<double>(now.tv_sec) + static_cast<double>(now.tv_nsec) * 1e-9;
}

// A CPU-bound task: arithmetic until this thread has used `seconds` of CPU
// time. Counting CPU time rather than wall time makes the work the same
// however busy the machine is (python_bench.py's spin does the same with
// time.thread_time). Returns the rounds done, so the loop is not optimized
// away, and the worker's pid, so the workload can tell which short tasks ran
// on the long task's worker.
std::pair<long, int> spin(double seconds) {
    const double end = thread_cpu_seconds() + seconds;
    std::uint64_t state = 1;
    long rounds = 0;
    do {
        for (int i = 0; i < 4000; ++i) state = state * 6364136223846793005u + 1442695040888963407u; // a few us
        ++rounds;
    } while (thread_cpu_seconds() < end);
    return {rounds + static_cast<long>(state & 1u), static_cast<int>(::getpid())};
}

// The mixed workload's warm-up task: it sleeps, so that two of them submitted
// together need both workers.
int pause_then_pid(int milliseconds) {
    ::usleep(static_cast<useconds_t>(milliseconds) * 1000);
    return static_cast<int>(::getpid());
}

double seconds_since(clock_type::time_point start) { return std::chrono::duration<double>(clock_type::now() - start).count(); }

std::string worker_path;

// COPROC_BENCH_PREFETCH overrides prefetch, and COPROC_BENCH_WORKER_SPIN_US
// worker_spin, for exploring those knobs; the harness never sets them, so
// reported figures use the library's defaults.
coproc::process_pool_options pool_options() {
    coproc::process_pool_options options{.max_workers = 2, .worker_executable = worker_path};
    if (const char* prefetch = std::getenv("COPROC_BENCH_PREFETCH")) {
        options.prefetch = static_cast<unsigned>(std::atoi(prefetch));
        options.max_prefetch = options.prefetch; // a fixed depth
    }
    if (const char* spin = std::getenv("COPROC_BENCH_WORKER_SPIN_US")) {
        options.worker_spin = std::chrono::microseconds{std::atoll(spin)};
    }
    return options;
}

// Context switches per task of the last measured loop (see switch_counts.hpp).
std::string switches;

coproc::task<std::vector<double>> measure_latency(coproc::process_pool* pool, int rounds) {
    co_await pool->submit<noop>(); // workers up
    co_await pool->submit<noop>();
    std::vector<double> micros;
    micros.reserve(static_cast<std::size_t>(rounds));
    const auto before = bench::switch_snapshot::now();
    for (int i = 0; i < rounds; ++i) {
        const auto start = clock_type::now();
        co_await pool->submit<noop>();
        micros.push_back(seconds_since(start) * 1e6);
    }
    switches = bench::switches_json(before, bench::switch_snapshot::now(), rounds, "worker");
    co_return micros;
}

coproc::task<double> measure_throughput(coproc::process_pool* pool, int tasks) {
    std::vector<coproc::future<void>> warm;
    for (int i = 0; i < 4; ++i) warm.push_back(pool->submit<noop>());
    for (auto& pending : warm) co_await std::move(pending);
    const auto before = bench::switch_snapshot::now();
    const auto start = clock_type::now();
    std::vector<coproc::future<void>> futures;
    futures.reserve(static_cast<std::size_t>(tasks));
    for (int i = 0; i < tasks; ++i) futures.push_back(pool->submit<noop>());
    for (auto& pending : futures) co_await std::move(pending);
    const double rate = tasks / seconds_since(start);
    switches = bench::switches_json(before, bench::switch_snapshot::now(), tasks, "worker");
    co_return rate;
}

coproc::task<double> measure_map(coproc::process_pool* pool, std::int64_t items) {
    co_await pool->submit<noop>();
    std::vector<std::int64_t> inputs(static_cast<std::size_t>(items));
    for (std::int64_t i = 0; i < items; ++i) inputs[static_cast<std::size_t>(i)] = i;
    const auto start = clock_type::now();
    const auto results = co_await pool->map<identity>(inputs, {.chunksize = 1000});
    const double rate = static_cast<double>(items) / seconds_since(start);
    if (results.size() != inputs.size() || results.back() != inputs.back()) co_return -1;
    co_return rate;
}

// The first echo in a fresh pool, then `repeats` more: GiB/s of each.
coproc::task<std::vector<double>> measure_echo(coproc::process_pool* pool, std::size_t bytes, int repeats) {
    co_await pool->submit<noop>();
    std::vector<double> rates;
    for (int i = 0; i <= repeats; ++i) {
        std::string buffer(bytes, 'x');
        const auto start = clock_type::now();
        const std::string back = co_await pool->submit<echo>(std::move(buffer));
        const double seconds = seconds_since(start);
        if (back.size() != bytes) co_return std::vector<double>{};
        rates.push_back(static_cast<double>(bytes) / seconds / double(1 << 30));
    }
    co_return rates;
}

// shared_echo: the first in a fresh pool (the task makes the result
// buffer), then `repeats` more into one result buffer: GiB/s of each.
coproc::task<std::vector<double>> measure_shared_echo(coproc::process_pool* pool, std::size_t bytes, int repeats) {
    co_await pool->submit<noop>();
    coproc::shared_buffer in{bytes};
    std::memset(in.data(), 'x', bytes);
    std::vector<double> rates;
    auto start = clock_type::now();
    const coproc::shared_buffer fresh = co_await pool->submit<transform_new>(in);
    rates.push_back(static_cast<double>(bytes) / seconds_since(start) / double(1 << 30));
    if (fresh.size() != bytes || fresh.data()[bytes - 1] != std::byte{'x' ^ 0x5a}) co_return std::vector<double>{};
    coproc::shared_buffer out{bytes};
    for (int i = 0; i < repeats; ++i) {
        start = clock_type::now();
        co_await pool->submit<transform_into>(in, out);
        rates.push_back(static_cast<double>(bytes) / seconds_since(start) / double(1 << 30));
    }
    if (out.data()[0] != std::byte{'x' ^ 0x5a}) co_return std::vector<double>{};
    co_return rates;
}

coproc::task<void> first_result(coproc::process_pool* pool, double* first_ms, clock_type::time_point start) {
    co_await pool->submit<noop>();
    *first_ms = seconds_since(start) * 1e3;
    co_await pool->shutdown();
}

coproc::task<std::vector<std::pair<long, int>>> primes_in_pool(coproc::process_pool* pool,
                                                                std::vector<std::pair<long, long>> ranges) {
    std::vector<coproc::future<std::pair<long, int>>> futures;
    for (const auto& [from, to] : ranges) futures.push_back(pool->submit<count_primes_where>(from, to));
    std::vector<std::pair<long, int>> counts;
    for (auto& pending : futures) counts.push_back(co_await std::move(pending));
    co_return counts;
}

coproc::task<void> round_trips(coproc::process_pool* pool, int rounds) {
    for (int i = 0; i < rounds; ++i) co_await pool->submit<noop>();
}

// The same, then a shutdown that lets the workers exit on their own (BYE),
// rather than the SIGKILL of a pool destroyed while they run: a worker
// under callgrind writes its profile when it exits.
coproc::task<void> round_trips_then_shutdown(coproc::process_pool* pool, int rounds) {
    co_await round_trips(pool, rounds);
    co_await pool->shutdown();
}

struct short_task_record {
    double submitted_ms = 0; // after the long task's submit
    double ms = 0;           // submit to result
    int pid = 0;             // the worker that ran it
};

struct mixed_figures {
    std::vector<short_task_record> shorts;
    int long_pid = 0;
    double long_s = 0;            // submit to result of the long task
    double late_max_ms = 0;       // the latest a short task was submitted after its due time
    std::size_t workers_started = 0;
};

// Awaits one short task and records, on the loop, how long after its submit
// its result arrived.
coproc::task<void> record_short(coproc::future<std::pair<long, int>> pending, clock_type::time_point submitted,
                                short_task_record* record, int* left) {
    try {
        record->pid = (co_await std::move(pending)).second;
    } catch (const std::exception& failure) {
        std::fprintf(stderr, "mixed: a short task failed: %s\n", failure.what());
        std::exit(1);
    }
    record->ms = seconds_since(submitted) * 1e3;
    --*left;
}

// One long task, then `short_count` short ones, one every `period`, each
// submitted when its timer fires whether or not the earlier ones have
// finished: a server handing requests of very different lengths to the pool.
coproc::task<mixed_figures> measure_mixed(coproc::event_loop* loop, coproc::process_pool* pool, double long_s,
                                          int short_count, clock_type::duration period) {
    // Both workers running before the clock starts, as in python_bench.py.
    // The warm-up runs another function, so that the pool has measured
    // nothing of spin when the workload starts, as for a new user.
    auto first = pool->submit<pause_then_pid>(50);
    auto second = pool->submit<pause_then_pid>(50);
    co_await std::move(first);
    co_await std::move(second);

    mixed_figures figures;
    figures.shorts.resize(static_cast<std::size_t>(short_count));
    int left = short_count;
    const auto start = clock_type::now();
    auto long_task = pool->submit<spin>(long_s);
    for (int i = 0; i < short_count; ++i) {
        const auto due = start + period * (i + 1);
        co_await loop->sleep_until(due);
        const auto submitted = clock_type::now();
        figures.late_max_ms = std::max(figures.late_max_ms, std::chrono::duration<double, std::milli>(submitted - due).count());
        auto& record = figures.shorts[static_cast<std::size_t>(i)];
        record.submitted_ms = std::chrono::duration<double, std::milli>(submitted - start).count();
        loop->spawn(record_short(pool->submit<spin>(0.001), submitted, &record, &left));
    }
    figures.long_pid = (co_await std::move(long_task)).second;
    figures.long_s = seconds_since(start);
    // Each short task's time was taken by its own coroutine when its result
    // arrived; polling here for the last ones does not change them.
    while (left > 0) co_await loop->sleep_for(std::chrono::milliseconds{1});
    figures.workers_started = pool->stats().workers_started;
    co_return figures;
}

double percentile(std::vector<double> values, double p) {
    std::sort(values.begin(), values.end());
    const auto index = static_cast<std::size_t>(p * static_cast<double>(values.size() - 1));
    return values[index];
}

// The median of 5 timings of `body`, in ms.
template <class Body>
double median_ms(Body body) {
    std::vector<double> times;
    for (int i = 0; i < 5; ++i) {
        const auto start = clock_type::now();
        body();
        times.push_back(seconds_since(start) * 1e3);
    }
    return percentile(std::move(times), 0.5);
}

} // namespace

int main(int argc, char** argv) {
    coproc::run_worker_if_requested(argc, argv);
    char resolved[PATH_MAX];
    worker_path = ::realpath(argv[0], resolved) != nullptr ? resolved : argv[0];
    int arg = 1;
    const bool quick = argc > arg && std::strcmp(argv[arg], "--quick") == 0;
    if (quick) ++arg;
    if (argc <= arg) {
        std::fprintf(stderr, "usage: coproc_bench [--quick] WORKLOAD [N]\n");
        return 2;
    }
    const std::string workload = argv[arg];
    coproc::event_loop loop;

    if (workload == "latency") {
        coproc::process_pool pool{loop, pool_options()};
        const auto micros = loop.run(measure_latency(&pool, quick ? 200 : 20'000));
        std::printf("{\"p50_us\": %.3f, \"p99_us\": %.3f, %s}\n", percentile(micros, 0.5), percentile(micros, 0.99),
                    switches.c_str());
    } else if (workload == "throughput") {
        coproc::process_pool pool{loop, pool_options()};
        const double rate = loop.run(measure_throughput(&pool, quick ? 2'000 : 500'000));
        std::printf("{\"tasks_per_s\": %.1f, %s}\n", rate, switches.c_str());
    } else if (workload == "map") {
        coproc::process_pool pool{loop, pool_options()};
        std::printf("{\"items_per_s\": %.1f}\n", loop.run(measure_map(&pool, quick ? 100'000 : 10'000'000)));
    } else if (workload == "echo") {
        coproc::process_pool pool{loop, {.max_workers = 2, .worker_executable = worker_path, .max_frame_size = std::size_t{1} << 30}};
        const std::size_t bytes = quick ? (1u << 20) : (64u << 20);
        auto rates = loop.run(measure_echo(&pool, bytes, 5));
        if (rates.empty()) return 1;
        const double rate = rates.front();
        rates.erase(rates.begin());
        // Two of the echo's pieces, timed alone: serializing the buffer into
        // a frame buffer, and deserializing it into a new std::string.
        const std::string buffer(bytes, 'x');
        coproc::detail::byte_buffer encoded;
        const double encode_ms = median_ms([&] {
            encoded = {};
            coproc::detail::encode_into(encoded, buffer);
        });
        const double decode_ms = median_ms([&] {
            std::string back;
            coproc::detail::decode_from(std::span<const std::byte>{encoded.data(), encoded.size()}, back);
            if (back.size() != bytes) std::exit(1);
        });
        std::printf("{\"gib_per_s\": %.3f, \"repeat_gib_per_s\": %.3f, \"encode_ms\": %.2f, \"decode_ms\": %.2f}\n", rate,
                    percentile(rates, 0.5), encode_ms, decode_ms);
    } else if (workload == "shared_echo") {
        coproc::process_pool pool{loop, {.max_workers = 2, .worker_executable = worker_path}};
        const std::size_t bytes = quick ? (1u << 20) : (64u << 20);
        auto rates = loop.run(measure_shared_echo(&pool, bytes, 5));
        if (rates.empty()) return 1;
        const double rate = rates.front();
        rates.erase(rates.begin());
        std::printf("{\"gib_per_s\": %.3f, \"repeat_gib_per_s\": %.3f}\n", rate, percentile(rates, 0.5));
    } else if (workload == "startup") {
        // Pool construction to first result, and to the end of shutdown()
        // (every worker exited and reaped).
        std::vector<double> firsts;
        std::vector<double> totals;
        for (int i = 0; i < (quick ? 2 : 20); ++i) {
            const auto start = clock_type::now();
            double first_ms = 0;
            {
                coproc::process_pool pool{loop, pool_options()};
                loop.run(first_result(&pool, &first_ms, start));
            }
            firsts.push_back(first_ms);
            totals.push_back(seconds_since(start) * 1e3);
        }
        std::printf("{\"first_result_ms\": %.3f, \"start_to_shutdown_ms\": %.3f}\n", percentile(firsts, 0.5),
                    percentile(totals, 0.5));
    } else if (workload == "cpu") {
        const long limit = quick ? 100'000 : 3'000'000;
        std::vector<std::pair<long, long>> ranges;
        for (long i = 0; i < 64; ++i) ranges.emplace_back(limit * i / 64, limit * (i + 1) / 64);
        auto start = clock_type::now();
        std::vector<long> inline_counts;
        for (const auto& [from, to] : ranges) inline_counts.push_back(count_primes(from, to));
        const double inline_s = seconds_since(start);
        coproc::process_pool pool{loop, pool_options()};
        loop.run(round_trips(&pool, 2)); // the workers are running before the clock starts
        start = clock_type::now();
        const auto results = loop.run(primes_in_pool(&pool, ranges));
        const double pool_s = seconds_since(start);
        std::vector<long> counts;
        std::map<int, int> tasks_by_pid;
        for (const auto& [count, pid] : results) {
            counts.push_back(count);
            ++tasks_by_pid[pid];
        }
        std::string shares;
        for (const auto& [pid, tasks] : tasks_by_pid) shares += (shares.empty() ? "" : ", ") + std::to_string(tasks);
        std::printf("{\"speedup\": %.3f, \"inline_s\": %.3f, \"pool_s\": %.3f, \"match\": %s, \"workers\": %zu, "
                    "\"tasks_per_worker\": [%s]}\n",
                    inline_s / pool_s, inline_s, pool_s, counts == inline_counts ? "true" : "false",
                    pool.stats().workers_started, shares.c_str());
    } else if (workload == "memory") {
        const int queued = quick ? 10'000 : 1'000'000;
        coproc::process_pool pool{loop, pool_options()};
        std::vector<coproc::future<void>> futures;
        futures.reserve(static_cast<std::size_t>(queued));
        const auto before = ::mallinfo2().uordblks;
        for (int i = 0; i < queued; ++i) futures.push_back(pool.submit<noop>()); // the loop is not running: all stay queued
        const auto after = ::mallinfo2().uordblks;
        std::printf("{\"bytes_per_future\": %.1f, \"queued\": %zu}\n", static_cast<double>(after - before) / queued,
                    pool.stats().tasks_queued);
        for (auto& pending : futures) pending.cancel();
    } else if (workload == "mixed") {
        // Default options but max_workers: what a new user gets.
        coproc::process_pool pool{loop, {.max_workers = 2}};
        const double long_s = quick ? 0.2 : 2.0;
        const int short_count = quick ? 40 : 400; // 200 per second for 0.2 s or 2 s
        const auto figures = loop.run(measure_mixed(&loop, &pool, long_s, short_count, std::chrono::milliseconds{5}));
        std::vector<double> short_ms;
        // Short tasks that waited behind the long one are far slower than
        // the rest, and too few to show in the p99: when each was submitted,
        // and whether it ran on the long task's worker.
        std::string slow;
        int on_long_worker = 0;
        for (const auto& record : figures.shorts) {
            short_ms.push_back(record.ms);
            on_long_worker += record.pid == figures.long_pid;
            if (record.ms > 100) {
                char entry[96];
                std::snprintf(entry, sizeof entry, "%s{\"submitted_ms\": %.1f, \"ms\": %.1f, \"on_long_worker\": %s}",
                              slow.empty() ? "" : ", ", record.submitted_ms, record.ms,
                              record.pid == figures.long_pid ? "true" : "false");
                slow += entry;
            }
        }
        std::printf("{\"p50_ms\": %.3f, \"p99_ms\": %.3f, \"max_ms\": %.3f, \"short_tasks\": %d, \"long_task_s\": %.3f, "
                    "\"over_100ms\": [%s], \"short_on_long_worker\": %d, \"submit_late_max_ms\": %.3f, \"workers\": %zu}\n",
                    percentile(short_ms, 0.5), percentile(short_ms, 0.99), percentile(short_ms, 1.0), short_count,
                    figures.long_s, slow.c_str(), on_long_worker, figures.late_max_ms, figures.workers_started);
    } else if (workload == "roundtrips") {
        const int rounds = argc > arg + 1 ? std::atoi(argv[arg + 1]) : 1000;
        coproc::process_pool pool{loop, pool_options()};
        loop.run(round_trips_then_shutdown(&pool, rounds));
        std::printf("{\"rounds\": %d}\n", rounds);
    } else {
        std::fprintf(stderr, "unknown workload %s\n", workload.c_str());
        return 2;
    }
    return 0;
}

// coproc's side of the MPI benchmark (bench/mpi_compare.py runs it beside
// bench/mpi4py_bench.py). Run under mpiexec with at least 2 ranks:
//
//   mpiexec -n R+1 mpi_bench [--workers-per-rank K] [--tasks N] [--map C:M[,C:M...]] [--latency L]
//
// Ranks 1..R become host agents inside run_worker_if_requested; rank 0 builds
// a pool of remote workers only (max_workers = 0, coproc::mpi::placement with
// K workers per agent rank; K = 0: as many as each agent's CPUs), starts all
// of them, then measures, each once:
//   tasks   N no-op submits, all made before the first is awaited, then all
//           awaited: tasks/s from the first submit to the last result
//   map     pool.map<identity> over M ints with chunksize C, for each C:M
//           given (default 1:20000,100:200000): items/s
//   latency L no-op submits one at a time, each awaited before the next:
//           p50 and p99 of the round trip (us), for what the figures above
//           are made of
// Prints one JSON object per measurement, one per line, on stdout.
//
// With a single rank there is no agent and so no remote worker: the program
// says so and exits with status 2 (the comparison counts worker ranks, as
// mpi4py.futures does: `mpiexec -n 1 python -m mpi4py.futures` has no worker
// rank and runs tasks on threads of rank 0).
#include <coproc/coproc.hpp>
#include <coproc/mpi.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;

void noop() {}
int identity(int x) { return x; }

// Holds its worker a while, so that W of them at once need W workers.
int hold_then_pid(int milliseconds) {
    ::usleep(static_cast<useconds_t>(milliseconds) * 1000);
    return static_cast<int>(::getpid());
}

double seconds_since(clock_type::time_point start) { return std::chrono::duration<double>(clock_type::now() - start).count(); }

// Every worker up before any clock starts: worker start-up (posix_spawn on
// the agent, HELLO over MPI) is not what is measured. Returns the distinct
// worker pids seen.
coproc::task<std::size_t> start_workers(coproc::process_pool* pool, int workers) {
    std::vector<coproc::future<int>> futures;
    for (int i = 0; i < workers; ++i) futures.push_back(pool->submit<hold_then_pid>(100));
    std::set<int> pids;
    for (auto& pending : futures) pids.insert(co_await std::move(pending));
    co_return pids.size();
}

struct timed_tasks {
    double seconds = 0;        // first submit to last result
    double submit_seconds = 0; // ... to the last submit: nothing is dispatched meanwhile (the loop is not run)
};

// `tasks` no-op tasks, all submitted before the first is awaited.
coproc::task<timed_tasks> measure_tasks(coproc::process_pool* pool, int tasks) {
    std::vector<coproc::future<void>> futures;
    futures.reserve(static_cast<std::size_t>(tasks));
    const auto start = clock_type::now();
    for (int i = 0; i < tasks; ++i) futures.push_back(pool->submit<noop>());
    timed_tasks timed;
    timed.submit_seconds = seconds_since(start);
    for (auto& pending : futures) co_await std::move(pending);
    timed.seconds = seconds_since(start);
    co_return timed;
}

// Round trips of one no-op task at a time, in microseconds.
coproc::task<std::vector<double>> measure_latency(coproc::process_pool* pool, int rounds) {
    std::vector<double> micros;
    micros.reserve(static_cast<std::size_t>(rounds));
    for (int i = 0; i < rounds; ++i) {
        const auto start = clock_type::now();
        co_await pool->submit<noop>();
        micros.push_back(seconds_since(start) * 1e6);
    }
    co_return micros;
}

double percentile(std::vector<double> values, double p) {
    std::sort(values.begin(), values.end());
    return values[static_cast<std::size_t>(p * static_cast<double>(values.size() - 1))];
}

// Seconds for pool.map<identity> over `inputs`; negative if a result is wrong.
coproc::task<double> measure_map(coproc::process_pool* pool, const std::vector<int>* inputs,
                                 std::size_t chunksize) {
    // A named options object: GCC 12 mishandles braced temporaries passed
    // directly inside a co_await expression.
    const coproc::map_options options{.chunksize = chunksize};
    const auto start = clock_type::now();
    const auto results = co_await pool->map<identity>(*inputs, options);
    const double seconds = seconds_since(start);
    if (results != *inputs) co_return -1.0;
    co_return seconds;
}

// "C:M,C:M": (chunksize, items) pairs; empty if malformed.
std::vector<std::pair<std::size_t, int>> parse_maps(const char* text) {
    std::vector<std::pair<std::size_t, int>> maps;
    for (const char* p = text; *p != '\0';) {
        char* end = nullptr;
        const unsigned long chunksize = std::strtoul(p, &end, 10);
        if (end == p || *end != ':') return {};
        p = end + 1;
        const long items = std::strtol(p, &end, 10);
        if (end == p || chunksize == 0 || items <= 0) return {};
        if (*end != ',' && *end != '\0') return {};
        maps.emplace_back(chunksize, static_cast<int>(items));
        p = *end == ',' ? end + 1 : end;
    }
    return maps;
}

void usage() {
    std::fprintf(stderr, "usage: mpiexec -n R+1 mpi_bench [--workers-per-rank K] [--tasks N] "
                         "[--map C:M[,C:M...]] [--latency L]\n");
}

} // namespace

int main(int argc, char** argv) {
    coproc::run_worker_if_requested(argc, argv); // ranks 1.. serve here and never return
    std::size_t workers_per_rank = 1;
    int tasks = 20'000;
    int latency_rounds = 2'000;
    std::vector<std::pair<std::size_t, int>> maps{{1, 20'000}, {100, 200'000}};
    for (int i = 1; i < argc; ++i) {
        const bool has_value = i + 1 < argc;
        if (std::strcmp(argv[i], "--workers-per-rank") == 0 && has_value) {
            workers_per_rank = static_cast<std::size_t>(std::atoi(argv[++i]));
        } else if (std::strcmp(argv[i], "--tasks") == 0 && has_value) {
            tasks = std::atoi(argv[++i]);
        } else if (std::strcmp(argv[i], "--latency") == 0 && has_value) {
            latency_rounds = std::atoi(argv[++i]);
        } else if (std::strcmp(argv[i], "--map") == 0 && has_value) {
            maps = parse_maps(argv[++i]);
        } else {
            usage();
            return 2;
        }
    }
    if (tasks <= 0 || latency_rounds <= 0 || maps.empty()) {
        usage();
        return 2;
    }
    const int worker_ranks = coproc::mpi::size() - 1;
    if (worker_ranks < 1) {
        std::fprintf(stderr, "mpi_bench: needs at least 2 ranks (rank 0 plus worker ranks): "
                             "run it under mpiexec -n 2 or more\n");
        return 2;
    }

    coproc::event_loop loop;
    auto placement = coproc::mpi::placement({.workers_per_rank = workers_per_rank});
    const auto workers = static_cast<int>(placement->slots());
    coproc::process_pool_options options{.max_workers = 0, .placement = placement};
    // COPROC_BENCH_MAX_PREFETCH overrides max_prefetch, for exploring how
    // deep a remote worker's queue must be; mpi_compare.py never sets it, so
    // reported figures use the library's default.
    if (const char* depth = std::getenv("COPROC_BENCH_MAX_PREFETCH")) {
        options.max_prefetch = static_cast<unsigned>(std::atoi(depth));
    }
    coproc::process_pool pool{loop, options};
    const std::size_t started = loop.run(start_workers(&pool, workers));
    // Every line says what it measured on: the job, the workers, the host.
    char common[256];
    std::snprintf(common, sizeof common,
                  "\"system\": \"coproc\", \"worker_ranks\": %d, \"workers_per_rank\": %zu, \"workers\": %d, "
                  "\"workers_seen\": %zu, \"max_prefetch\": %u, \"host\": \"%s\"",
                  worker_ranks, workers_per_rank, workers, started, options.max_prefetch,
                  coproc::mpi::agents().front().host.c_str());

    const timed_tasks timed = loop.run(measure_tasks(&pool, tasks));
    std::printf("{%s, \"workload\": \"tasks\", \"count\": %d, \"seconds\": %.6f, \"submit_seconds\": %.6f, "
                "\"per_s\": %.1f}\n",
                common, tasks, timed.seconds, timed.submit_seconds, tasks / timed.seconds);
    std::fflush(stdout);

    int status = 0;
    for (const auto& [chunksize, items] : maps) {
        std::vector<int> inputs(static_cast<std::size_t>(items));
        for (int i = 0; i < items; ++i) inputs[static_cast<std::size_t>(i)] = i;
        const double seconds = loop.run(measure_map(&pool, &inputs, chunksize));
        if (seconds < 0) {
            std::fprintf(stderr, "mpi_bench: map with chunksize %zu gave wrong results\n", chunksize);
            status = 1;
            continue;
        }
        std::printf("{%s, \"workload\": \"map\", \"chunksize\": %zu, \"count\": %d, \"seconds\": %.6f, "
                    "\"per_s\": %.1f}\n",
                    common, chunksize, items, seconds, items / seconds);
        std::fflush(stdout);
    }
    const auto micros = loop.run(measure_latency(&pool, latency_rounds));
    std::printf("{%s, \"workload\": \"latency\", \"count\": %d, \"p50_us\": %.1f, \"p99_us\": %.1f}\n", common,
                latency_rounds, percentile(micros, 0.5), percentile(micros, 0.99));
    loop.run(pool.shutdown());
    return status;
}

// coproc/process_pool.hpp - coproc::process_pool, which runs functions in
// worker processes: the C++ counterpart of Python's
// concurrent.futures.ProcessPoolExecutor.
//
//     double simulate(int seed, double temperature);
//
//     int main(int argc, char** argv) {
//         coproc::run_worker_if_requested(argc, argv);   // a worker never returns from here
//         coproc::event_loop loop;
//         coproc::process_pool pool{loop, {.max_workers = 4}};
//         double a = loop.run(run_one(&pool));            // co_await pool->submit<simulate>(1, 0.5)
//     }
//
// Workers are started with posix_spawn (never fork) and inherit only their
// end of a socket pair (and stdin, stdout, stderr). Calls and results travel
// as length-prefixed frames with cereal payloads. A worker that dies fails
// only the tasks dispatched to it, with coproc::worker_died, and the pool
// starts a replacement on demand.
//
// Threads: create, use and destroy the pool on its loop's thread (or while no
// thread runs the loop). submit() and future::cancel() are also safe from
// any other thread.
#pragma once

#include <coproc/detail/remote_function.hpp>
#include <coproc/detail/work_item.hpp>
#include <coproc/event_loop.hpp>
#include <coproc/future.hpp>
#include <coproc/task.hpp>
#include <coproc/worker.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace coproc {

namespace detail {
class pool_core;
}

// What a worker's death does to the pool.
enum class crash_policy {
    // Only the tasks dispatched to the dead worker fail (worker_died); the
    // pool starts a replacement and keeps serving. The default.
    isolate,
    // CPython's behaviour: the pool becomes broken, every pending future
    // fails with broken_process_pool and later submits throw it.
    break_pool,
};

struct process_pool_options {
    // Worker processes at most. Default: the CPUs this process may run on
    // (sched_getaffinity). Zero or negative is rejected (std::invalid_argument).
    std::optional<int> max_workers{};
    // A worker exits after this many tasks and is replaced; 0: no limit.
    std::size_t max_tasks_per_child = 0;
    // The program workers run. Empty: this program, re-executed in worker
    // mode (it must call run_worker_if_requested at the top of main).
    std::string worker_executable{};
    // Variables added to (or replacing those of) the workers' environment.
    std::vector<std::pair<std::string, std::string>> environment{};
    // What a worker's death does to the pool.
    crash_policy on_worker_crash = crash_policy::isolate;
    // CALL frames in flight per worker: the worker holds the next tasks
    // while it runs one, so it never waits for the parent.
    unsigned prefetch = 2;
    // A frame from a worker larger than this kills the worker.
    std::size_t max_frame_size = std::size_t{256} << 20;
};

struct shutdown_options {
    // Wait for the pending and running tasks to finish and for the workers
    // to exit before completing.
    bool wait = true;
    // Cancel the tasks that are still pending: they end cancelled and never run.
    bool cancel_futures = false;
};

struct pool_stats {
    std::size_t workers_alive = 0;
    std::size_t workers_started = 0;
    std::size_t tasks_queued = 0;    // pending in the parent
    std::size_t tasks_running = 0;   // dispatched or running in a worker
    std::size_t tasks_completed = 0; // ended with a value
    std::size_t tasks_failed = 0;    // ended with an exception (cancellations excluded)
    std::size_t tasks_cancelled = 0;
};

class process_pool {
public:
    using options = process_pool_options;

    // Creates the pool; workers start on demand, at the first submits.
    // Throws std::invalid_argument for bad options.
    process_pool(event_loop& loop, options opts = {});

    // Cancels pending tasks, kills the workers (SIGKILL) and reaps them:
    // every future ends final (pending and running ones cancelled), no
    // worker, zombie or fd outlives the pool. Never blocks for longer than
    // the kernel takes to kill the workers. For a graceful end, co_await
    // shutdown() first.
    ~process_pool();

    process_pool(const process_pool&) = delete;
    process_pool& operator=(const process_pool&) = delete;

    // Queues F(args...) to run in a worker and returns its future. The
    // arguments are converted to F's parameter types and serialized now; an
    // argument that fails to serialize fails the future with that exception
    // and no worker is involved. Throws pool_closed after shutdown, and
    // broken_process_pool when the pool is broken. Thread-safe.
    template <auto F, class... Args>
    future<typename detail::remote<F>::result> submit(Args&&... args);

    // Stops accepting work (submit throws pool_closed). With `wait`, completes
    // once pending and running tasks have finished and the workers have
    // exited; with `cancel_futures`, pending tasks are cancelled first.
    task<void> shutdown(shutdown_options opts = {});

    // Sends SIGTERM / SIGKILL to every worker. Their tasks fail with
    // worker_died; the pool replaces the workers while it has work.
    void terminate_workers();
    void kill_workers();

    // Counters, read on any thread.
    [[nodiscard]] pool_stats stats() const;

    // The process ids of the live workers (loop thread).
    [[nodiscard]] std::vector<int> worker_pids() const;

private:
    void enqueue(detail::work_item* item, bool encoding_failed);

    std::shared_ptr<detail::pool_core> core_;
};

template <auto F, class... Args>
future<typename detail::remote<F>::result> process_pool::submit(Args&&... args) {
    using remote = detail::remote<F>;
    using result = typename remote::result;
    using arguments = typename remote::arguments;
    static_assert(std::is_constructible_v<arguments, Args&&...>,
                  "coproc: submit<F>(args...): the arguments do not convert to F's parameters");
    (void)remote::registered; // odr-use: F is registered in every process of this program

    auto* item = new detail::typed_work_item<result>();
    future<result> handle{item};
    item->function_id = remote::id;
    item->function_name = remote::name;
    bool encoding_failed = false;
    try {
        detail::encode_into(item->arguments, arguments{std::forward<Args>(args)...});
    } catch (...) {
        item->error = std::current_exception();
        encoding_failed = true;
    }
    enqueue(item, encoding_failed);
    return handle;
}

} // namespace coproc

// The process pool: its facade. process_pool's members, pool_core's
// construction and destruction, shutdown, terminate/restart, stats, and the
// functions future<T> calls. It ties together the three steps of DESIGN.md's
// data flow, each in a file of its own:
//
//  caller coroutine          event loop                                                      workers
//  ----------------          ----------                                                      -------
//  pool.submit<f>(args) -> work item {id, fn id, cereal bytes, promise}
//                           queue + scheduler ...                        pool_scheduler.cpp
//                           worker connection: CALL frames out  ------------->  socketpair
//                           ... <-- START/RESULT/ERROR                   worker_connection.cpp
//                           worker life: spawn, HELLO, pidfd watch,
//                           reap, replace                                worker_process.cpp
//  co_await future  <-----  complete promise, resume the awaiter ...     pool_scheduler.cpp
//
// pool_core.hpp declares the class they share, grouped by file.

#include "pool_core.hpp"
#include "worker_limits.hpp"

#include <coproc/process_pool.hpp>

#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdint>
#include <exception>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

extern char** environ;

namespace coproc::detail {

namespace {

// True when this process was started by a pool as a worker (argv[1] is the
// worker flag), read from /proc/self/cmdline.
bool started_as_worker() {
    std::FILE* file = std::fopen("/proc/self/cmdline", "re");
    if (file == nullptr) return false;
    char buffer[4096];
    const std::size_t size = std::fread(buffer, 1, sizeof buffer - 1, file);
    std::fclose(file);
    buffer[size] = '\0';
    const std::size_t first = std::strlen(buffer);
    return first + 1 < size && std::strcmp(buffer + first + 1, "--coproc-worker") == 0;
}

// Whether `condition` holds of the pool (or the pool is gone).
struct pool_holds {
    pool_core* core;
    bool (pool_core::*condition)() const;
    bool operator()() const { return core->destroyed || (core->*condition)(); }
};

// Woken by pool_core::wake_waiters, which runs whenever a task or a worker
// ends; a stop of the awaiter's token ends the wait with cancelled_error
// (the pool stays closed).
task<void> shutdown_pool(std::shared_ptr<pool_core> core, shutdown_options options) {
    core->close(options.cancel_futures);
    if (!options.wait) co_return;
    const pool_holds idle{core.get(), &pool_core::idle};
    while (!idle()) co_await pool_change<pool_holds>{core.get(), idle};
    const pool_holds no_workers{core.get(), &pool_core::no_workers};
    while (!no_workers()) co_await pool_change<pool_holds>{core.get(), no_workers};
}

task<void> shutdown_and_signal(std::shared_ptr<pool_core> core, shutdown_options options,
                               std::shared_ptr<std::promise<void>> done) {
    try {
        co_await shutdown_pool(core, options);
        done->set_value();
    } catch (...) {
        done->set_exception(std::current_exception());
    }
}

} // namespace

// Runs a pool coroutine with a token of its own that is never stopped, so
// that event_loop::stop(), which cancels every task the loop runs, does not
// cut the pool's plumbing: the pool ends with its destructor or shutdown().
task<void> shielded(task<void> body) {
    body.handle().promise().set_stop_token(std::stop_token{});
    co_await std::move(body);
}

// --- construction and destruction

pool_core::pool_core(event_loop& event_loop, process_pool_options opts)
    : loop(event_loop), options_(std::move(opts)) {
    // Zero only with a placement that has slots: then every worker is remote.
    const bool remote_only = options_.placement && options_.placement->slots() > 0;
    if (options_.max_workers.has_value() && (*options_.max_workers < 0 || (*options_.max_workers == 0 && !remote_only))) {
        throw std::invalid_argument("coproc: process_pool_options::max_workers must be positive (or zero with a "
                                    "placement that has slots), got " + std::to_string(*options_.max_workers));
    }
    if (options_.prefetch == 0) throw std::invalid_argument("coproc: process_pool_options::prefetch must be positive");
    if (options_.stream_window == 0) {
        throw std::invalid_argument("coproc: process_pool_options::stream_window must be positive");
    }
    if (options_.max_prefetch < options_.prefetch) options_.max_prefetch = options_.prefetch;
    if (started_as_worker()) {
        // A worker whose main did not call run_worker_if_requested first
        // would start pools of its own, and so on without end.
        throw std::logic_error("coproc: a process_pool was created in a process started as a pool worker; main must "
                               "call coproc::run_worker_if_requested(argc, argv) before anything else");
    }
    local_workers_ = options_.max_workers.value_or(usable_cpus());
    const std::size_t remote_slots = options_.placement ? options_.placement->slots() : 0;
    max_workers_ = local_workers_ + static_cast<int>(std::min<std::size_t>(remote_slots, 1 << 20));
    executable_ = options_.worker_executable.empty() ? "/proc/self/exe" : options_.worker_executable;

    // The workers' environment: ours, minus the names the options replace,
    // plus the options' variables and the parent's pid.
    auto replaced = [this](std::string_view entry) {
        for (const auto& [name, value] : options_.environment) {
            if (entry.size() > name.size() && entry.starts_with(name) && entry[name.size()] == '=') return true;
        }
        return entry.starts_with("COPROC_PARENT_PID=") || entry.starts_with("COPROC_KEEP_RESULT_MS=") ||
               entry.starts_with(std::string(wire::start_word_variable) + "=") ||
               entry.starts_with("COPROC_PROGRESS_INTERVAL_MS=") || entry.starts_with("COPROC_ADDRESS_SPACE_LIMIT=") ||
               entry.starts_with("COPROC_WORKER_SPIN_US=");
    };
    for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
        if (!replaced(*entry)) environment_storage_.emplace_back(*entry);
    }
    // What every worker gets, local or remote (a remote one's host agent
    // adds these to its own environment, and its own pid as the parent's).
    for (const auto& [name, value] : options_.environment) remote_environment_.push_back(name + "=" + value);
    const std::int64_t keep_ms = std::max<std::int64_t>(0, options_.keep_result_memory.count());
    remote_environment_.push_back("COPROC_KEEP_RESULT_MS=" + std::to_string(keep_ms));
    const std::int64_t progress_ms = std::max<std::int64_t>(0, options_.progress_interval.count());
    remote_environment_.push_back("COPROC_PROGRESS_INTERVAL_MS=" + std::to_string(progress_ms));
    remote_environment_.push_back("COPROC_WORKER_SPIN_US=" + std::to_string(std::max<std::int64_t>(0, options_.worker_spin.count())));
    if (options_.worker_address_space_limit > 0) {
        remote_environment_.push_back("COPROC_ADDRESS_SPACE_LIMIT=" + std::to_string(options_.worker_address_space_limit));
    }
    environment_storage_.insert(environment_storage_.end(), remote_environment_.begin(), remote_environment_.end());
    environment_storage_.push_back("COPROC_PARENT_PID=" + std::to_string(::getpid()));
    // Set for every local worker; one whose spawn could not make its start
    // word finds nothing at the descriptor and sends START before each task.
    environment_storage_.push_back(std::string(wire::start_word_variable) + "=" +
                                   std::to_string(wire::start_word_descriptor));
    if (options_.huge_pages) {
        add_huge_page_tunable(environment_storage_);
        add_huge_page_tunable(remote_environment_);
    }
    if (!options_.placement) remote_environment_.clear();
}

pool_core::~pool_core() {
    for (auto& worker : workers_) {
        release_remote(*worker);
        worker->close_descriptors();
    }
}

void pool_core::destroy() noexcept {
    {
        std::lock_guard lock{mutex_};
        closed_ = true;
    }
    destroyed = true;
    lifetime_stop_.request_stop();
    const auto destroyed_error = [] {
        return std::make_exception_ptr(cancelled_error("coproc: the process pool was destroyed"));
    };
    end_all_pending(work_state::cancelled, destroyed_error);
    for (auto& worker : workers_) {
        worker->lifetime_stop.request_stop();
        if (worker->remote && worker->state != worker_handle::phase::exited && !worker->reaped) {
            // Killed on its host by its placement; nothing here to wait for.
            options_.placement->signal(worker->remote_handle, SIGKILL);
            worker->state = worker_handle::phase::exited;
            workers_alive_.fetch_sub(1, std::memory_order_relaxed);
        } else if (worker->state != worker_handle::phase::exited && !worker->reaped && worker->pid > 0) {
            // Not reaped yet, so the pid cannot have been reused.
            ::kill(worker->pid, SIGKILL);
            ::siginfo_t info{};
            // SIGKILL cannot be caught: this returns as soon as the kernel has torn the process down.
            const auto idtype = worker->pidfd >= 0 ? static_cast<::idtype_t>(P_PIDFD) : P_PID;
            const auto id = static_cast<::id_t>(worker->pidfd >= 0 ? worker->pidfd : worker->pid);
            while (::waitid(idtype, id, &info, WEXITED) < 0 && errno == EINTR) {
            }
            worker->state = worker_handle::phase::exited;
            workers_alive_.fetch_sub(1, std::memory_order_relaxed);
        }
        for (work_item* item : worker->assigned) {
            {
                std::lock_guard lock{mutex_};
                uncount_locked(*item);
            }
            complete(item, work_state::cancelled, destroyed_error()); // no-op when already final
            item->release();
        }
        worker->assigned.clear();
        // In-flight recv and poll on these hold their own references to the
        // files; they complete (EOF, process exit) and their coroutines see
        // `destroyed` and touch nothing. shutdown() makes the recv end even if
        // a process a task started still holds the worker's end.
        if (worker->socket >= 0) ::shutdown(worker->socket, SHUT_RDWR);
        worker->close_descriptors();
    }
    wake_waiters();
}

// --- terminate, restart, stats

void pool_core::terminate(int signal) {
    terminated_ = true;
    close(true); // shutdown(wait=false, cancel_futures=true); dispatch starts no worker now
    const std::string reason = signal == SIGKILL ? "nothing more: kill_workers() was called"
                                                 : "nothing more: terminate_workers() was called";
    for (auto& worker : workers_) kill_worker(*worker, reason, false, signal);
}

void pool_core::restart_workers() noexcept {
    // What is running ends cancelled, not failed; what was sent but not
    // started goes back to the queue when its worker's exit is seen.
    for (auto& worker : workers_) {
        for (work_item* item : worker->assigned) {
            if (item->state() == work_state::running) {
                try {
                    cancel(*item, false, std::make_exception_ptr(cancelled_error("coproc: cancelled by restart_workers")));
                } catch (...) {
                    // Out of memory queueing the follow-up: the kill below still ends it.
                }
            }
        }
    }
    for (auto& worker : workers_) kill_worker(*worker, "nothing more: restart_workers() was called");
}

pool_stats pool_core::stats() const {
    pool_stats result;
    result.workers_alive = workers_alive_.load(std::memory_order_relaxed);
    result.workers_started = workers_started_.load(std::memory_order_relaxed);
    result.tasks_queued = queued_.load(std::memory_order_relaxed);
    result.tasks_running = in_workers_.load(std::memory_order_relaxed);
    result.tasks_completed = completed_.load(std::memory_order_relaxed);
    result.tasks_failed = failed_.load(std::memory_order_relaxed);
    result.tasks_cancelled = cancelled_.load(std::memory_order_relaxed);
    result.workers_killed_for_cancel = killed_for_cancel_.load(std::memory_order_relaxed);
    result.tasks_cancelling = cancelling_.load(std::memory_order_relaxed);
    result.tasks_moved = moved_.load(std::memory_order_relaxed);
    result.workers_retired_for_memory = retired_for_memory_.load(std::memory_order_relaxed);
    return result;
}

std::vector<int> pool_core::worker_pids() const {
    std::vector<int> pids;
    for (const auto& worker : workers_) {
        if (worker->state != worker_handle::phase::exited && !worker->reaped && worker->pid > 0) pids.push_back(worker->pid);
    }
    return pids;
}

// --- the functions future<T> calls
//
// A future made final without a pool (make_ready_future) has a null
// item.pool: each function below looks at the state first and returns
// before it would touch the pool.

bool pool_has_room(const pool_core& core) noexcept { return core.has_room(); }

bool pool_destroyed(const pool_core& core) noexcept { return core.destroyed; }

std::shared_ptr<pool_core> pool_core_of(const process_pool& pool) noexcept { return pool.core_; }

event_loop& pool_loop(pool_core& core) noexcept { return core.loop; }

bool pool_enqueue(pool_core& core, work_item* item, bool failed, bool throw_when_full) {
    return core.submit(item, failed, throw_when_full);
}

void pool_add_waiter(pool_core& core, std::shared_ptr<pool_waiter> waiter) {
    if (core.destroyed) {
        waiter->wake(); // nothing will change any more
        return;
    }
    core.add_waiter(std::move(waiter));
}

bool await_work_item(work_item& item, std::coroutine_handle<> awaiting) {
    if (is_final(item.state())) return false;
    return item.pool->await(item, awaiting);
}

void forget_awaiter(work_item& item, std::coroutine_handle<> awaiting) noexcept {
    // A final item holds no awaiter any more (it was taken when it ended),
    // and its pool may be gone.
    if (is_final(item.state())) return;
    item.pool->forget(item, awaiting);
}

bool cancel_work_item(work_item& item, bool force, bool kill_after_grace) {
    if (is_final(item.state())) return false;
    return item.pool->cancel(item, force, nullptr, kill_after_grace);
}

void add_work_item_callback(work_item& item, std::function<void()> callback) {
    if (is_final(item.state())) {
        callback();
        return;
    }
    item.pool->add_callback(item, std::move(callback));
}

void set_work_item_progress_callback(work_item& item, std::function<void(double)> callback) {
    if (is_final(item.state())) return; // made ready, or ended: no report will come
    item.pool->set_progress_callback(item, std::move(callback));
}

void report_callback_error(const work_item& item, std::exception_ptr error) noexcept {
    // A callback runs either on a loop, where a posted function that throws
    // reaches the loop's handler, or inline in add_done_callback, whose
    // caller must not receive someone else's exception. Rethrowing from a
    // function posted to the calling thread's loop treats both alike.
    if (event_loop* loop = event_loop::current(); loop != nullptr) {
        try {
            loop->post([error] { std::rethrow_exception(error); });
            return;
        } catch (...) {
            // Out of memory while posting: print it below instead.
        }
    }
    try {
        const std::string which = item.function_name.empty()
                                      ? std::string("a ready future")
                                      : "the future of task " + std::to_string(item.id) + " (" +
                                            std::string(item.function_name) + ")";
        try {
            std::rethrow_exception(std::move(error));
        } catch (const std::exception& e) {
            std::fprintf(stderr, "coproc: exception calling a done callback of %s, ignored: %s\n", which.c_str(), e.what());
        } catch (...) {
            std::fprintf(stderr, "coproc: exception of unknown type calling a done callback of %s, ignored\n",
                         which.c_str());
        }
    } catch (...) {
        // Out of memory while describing it: nothing more can be said.
    }
}

bool wait_work_item(work_item& item, std::chrono::nanoseconds timeout) {
    if (is_final(item.state())) return true;
    if (event_loop* current = event_loop::current(); current != nullptr && item.pool != nullptr && &item.pool->loop == current) {
        throw std::logic_error("coproc: future::get called on the pool's loop thread, which would never return; co_await the future instead");
    }
    blocked_waiters.fetch_add(1, std::memory_order_seq_cst);
    std::unique_lock lock{waiters_mutex};
    const auto final = [&] { return is_final(item.state()); };
    bool done = true;
    if (timeout.count() < 0) {
        waiters_cv.wait(lock, final);
    } else {
        done = waiters_cv.wait_for(lock, timeout, final);
    }
    blocked_waiters.fetch_sub(1, std::memory_order_acq_rel);
    return done;
}

} // namespace coproc::detail

namespace coproc {

process_pool::process_pool(event_loop& loop, options opts)
    : core_(std::make_shared<detail::pool_core>(loop, std::move(opts))) {}

process_pool::~process_pool() { core_->destroy(); }


task<void> process_pool::shutdown(shutdown_options opts) { return detail::shutdown_pool(core_, opts); }

void process_pool::shutdown_blocking(shutdown_options opts) {
    event_loop& loop = core_->loop;
    if (loop.is_loop_thread()) {
        throw std::logic_error("coproc: process_pool::shutdown_blocking on the loop's thread could never return; "
                               "co_await shutdown() instead");
    }
    if (!loop.running()) {
        loop.run(shutdown(opts));
        return;
    }
    // Shared: if this thread gives up (below), the posted shutdown may still
    // run later and must find its promise alive.
    auto done = std::make_shared<std::promise<void>>();
    auto finished = done->get_future();
    loop.post([core = core_, opts, done] { core->loop.spawn(detail::shutdown_and_signal(core, opts, done)); });
    // The loop must keep running until this returns. One that stopped for
    // good would leave this thread waiting for ever: after half a second in
    // which no thread runs it (a loop between two runs comes back sooner),
    // fail instead of hanging.
    constexpr auto step = std::chrono::milliseconds{10};
    constexpr int checks_allowed = 50;
    int checks_stopped = 0;
    while (finished.wait_for(step) != std::future_status::ready) {
        checks_stopped = loop.running() ? 0 : checks_stopped + 1;
        if (checks_stopped >= checks_allowed) {
            throw std::logic_error("coproc: process_pool::shutdown_blocking: the pool's event loop stopped running "
                                   "before the shutdown completed, so it never could; keep the loop running (in "
                                   "the thread that runs it) until shutdown_blocking returns");
        }
    }
    finished.get();
}

void process_pool::terminate_workers() { core_->terminate(SIGTERM); }

void process_pool::kill_workers() { core_->terminate(SIGKILL); }

void process_pool::restart_workers() { core_->restart_workers(); }

pool_stats process_pool::stats() const { return core_->stats(); }

std::vector<int> process_pool::worker_pids() const { return core_->worker_pids(); }

} // namespace coproc

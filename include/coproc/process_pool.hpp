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

#include <coproc/async_generator.hpp>
#include <coproc/detail/remote_function.hpp>
#include <coproc/detail/wire.hpp>
#include <coproc/detail/work_item.hpp>
#include <coproc/event_loop.hpp>
#include <coproc/future.hpp>
#include <coproc/placement.hpp>
#include <coproc/progress.hpp>
#include <coproc/stream.hpp>
#include <coproc/task.hpp>
#include <coproc/worker.hpp>

#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstddef>
#include <deque>
#include <stop_token>
#include <ranges>
#include <tuple>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace coproc {

class process_pool;
namespace detail {
class pool_core;
class pool_waiter;
// Queues the item in the pool; false (and nothing queued) when the queue is
// full and `throw_when_full` is false. Throws pool_closed,
// broken_process_pool, queue_full.
bool pool_enqueue(pool_core& core, work_item* item, bool failed, bool throw_when_full);
bool pool_has_room(const pool_core& core) noexcept;
bool pool_destroyed(const pool_core& core) noexcept;
std::shared_ptr<pool_core> pool_core_of(const process_pool& pool) noexcept;
event_loop& pool_loop(pool_core& core) noexcept;
// Resumes `waiter` at the pool's next change (loop thread).
void pool_add_waiter(pool_core& core, std::shared_ptr<pool_waiter> waiter);
}

// What a worker's death does to the pool.
enum class crash_policy {
    // Only the tasks dispatched to the dead worker fail (worker_died); the
    // pool starts a replacement and keeps serving. The default.
    isolate,
    // CPython's behaviour: the pool becomes broken. Every pending and
    // running future fails with a broken_process_pool of its own (the dead
    // worker's too), every other worker is killed, and later submits throw
    // broken_process_pool. A worker the pool kills on purpose (a cancelled
    // task past cancel_grace) does not break it.
    break_pool,
};

// A call prepared for the workers, made with coproc::call<f>(args...): the
// arguments are converted to f's parameters and serialized at once.
struct remote_call {
    std::uint64_t function_id = 0;
    std::string_view function_name;
    detail::byte_buffer arguments;
    [[nodiscard]] explicit operator bool() const noexcept { return function_id != 0; }
};

template <auto F, class... Args>
remote_call call(Args&&... args) {
    using remote = detail::remote<F>;
    using arguments = typename remote::arguments;
    static_assert(std::is_constructible_v<arguments, Args&&...>,
                  "coproc: call<F>(args...): the arguments do not convert to F's parameters");
    (void)remote::registered;
    remote_call prepared{remote::id, remote::name, {}};
    detail::encode_into(prepared.arguments, arguments{std::forward<Args>(args)...});
    return prepared;
}

struct process_pool_options {
    // Worker processes at most. Default: the CPUs this process may run on
    // (sched_getaffinity). Zero or negative is rejected (std::invalid_argument),
    // except zero with a `placement` that has slots: remote workers only.
    std::optional<int> max_workers{};
    // Workers elsewhere, beyond the max_workers local ones: the pool also
    // runs up to placement->slots() workers that `placement` starts, for
    // example coproc::mpi::placement() (coproc/mpi.hpp) on the other ranks
    // of an MPI job. Local workers are started first. Null: local only.
    // Tasks that pass shared_buffer descriptors run on local workers only;
    // max_worker_memory applies to local workers only.
    std::shared_ptr<worker_placement> placement{};
    // A worker exits after this many tasks and is replaced; 0: no limit.
    std::size_t max_tasks_per_child = 0;
    // Bytes of resident memory (VmRSS: /proc/PID/statm's resident pages)
    // above which a worker is retired; 0: no limit. Read by the pool each
    // time the worker answers a task: a worker found over the limit gets no
    // more tasks, gives back the ones it holds and has not started (they run
    // on other workers, as moved tasks do), finishes the one it runs, and
    // exits; a new worker replaces it on demand. No task is lost, failed or
    // run twice for it. stats().workers_retired_for_memory counts them. The
    // resident set includes what the worker shares (its program's pages,
    // shared-memory buffers it touched): set the limit well above what a
    // fresh worker uses.
    std::size_t max_worker_memory = 0;
    // A hard limit on each worker's address space, in bytes (RLIMIT_AS,
    // set by the worker on itself); 0: none. An allocation beyond it fails:
    // the task that made it fails with memory_limit_exceeded, which names
    // the limit, and the worker serves on. It counts address space, not
    // resident memory: every mapping (the program, thread stacks, malloc's
    // arenas) counts whether touched or not, so set it well above what a
    // fresh worker maps (ps -o vsz). Not with AddressSanitizer or
    // ThreadSanitizer, which reserve terabytes of address space: a worker
    // built with one ignores the limit and says so on stderr.
    std::size_t worker_address_space_limit = 0;
    // Runs once in each worker before any task: coproc::call<f>(args...).
    // If it throws, the pool is broken: every pending and later submit fails
    // with broken_process_pool, whose cause() is the initializer's error.
    remote_call initializer{};
    // A worker with no task for this long exits; the pool starts workers
    // again on demand. Zero: workers stay until shutdown.
    std::chrono::milliseconds idle_timeout{0};
    // The program workers run. Empty: this program, re-executed in worker
    // mode (it must call run_worker_if_requested at the top of main).
    std::string worker_executable{};
    // Variables added to (or replacing those of) the workers' environment.
    std::vector<std::pair<std::string, std::string>> environment{};
    // Workers' malloc backs large blocks with transparent huge pages: the
    // pool adds glibc.malloc.hugetlb=1 to their GLIBC_TUNABLES, unless that
    // tunable is already set there. Building a large argument or result in
    // a worker then costs a page fault per 2 MiB instead of per 4 KiB
    // (about 4x faster for 64 MiB on the benchmark machine: memory_costs in
    // bench/RESULTS.md). Effective
    // where the kernel's THP mode is "madvise" or "always". Whatever this
    // option, the large strings and vectors coproc decodes or receives in
    // place are advised for huge pages (they are filled completely).
    bool huge_pages = true;
    // A worker keeps the memory of the last large string or vector it
    // returned (see "Large arguments and results" in the README) this long
    // at most, busy or not: a large argument of that type arriving meanwhile
    // is received into it instead of into new pages. It also keeps the
    // mappings of the shared_buffers it received (at most 16) this long
    // after their last use, so that a buffer passed again is not mapped
    // again; the parent's memory of such a buffer then lives that long after
    // the parent lets it go. Zero: nothing is kept.
    std::chrono::milliseconds keep_result_memory{1000};
    // What a worker's death does to the pool.
    crash_policy on_worker_crash = crash_policy::isolate;
    // CALL frames in flight per worker, at least: the worker holds the next
    // tasks while it runs one, so it never waits for the parent.
    unsigned prefetch = 2;
    // ... and at most. Between the two, each worker's depth adapts to how
    // long its tasks run: about 1 ms of queued work, so that short tasks are
    // pipelined deeply (throughput) while long ones stay spread over the
    // workers (balance). While a worker is starting the depth stays at
    // prefetch, and a worker never holds more than an even share of the
    // outstanding tasks. Equal to prefetch: a fixed depth.
    unsigned max_prefetch = 64;
    // A frame from a worker larger than this kills the worker.
    std::size_t max_frame_size = std::size_t{256} << 20;
    // A worker that sends part of a frame and then nothing more for this long
    // is killed (its tasks fail with worker_died saying so). Zero: no bound.
    std::chrono::milliseconds frame_timeout{10'000};
    // A worker that has not said HELLO this long after it was started is
    // killed; three such starts in a row break the pool.
    std::chrono::milliseconds start_timeout{10'000};
    // How long a cancelled running task may take to return (it should
    // honour its std::stop_token) before its worker is killed and replaced.
    std::chrono::milliseconds cancel_grace{1000};
    // A task's progress reports (coproc::report_progress) reach the parent
    // at most once per this interval; between, the worker keeps only the
    // latest, and sends it before the task's answer. Zero: every report is
    // sent.
    std::chrono::milliseconds progress_interval{50};
    // A stream's window, unless its submit sets one (submit_options::
    // stream_window): items a stream task may send ahead of its consumer.
    // At least 1.
    std::uint32_t stream_window = 16;
    // Tasks waiting in the parent for a worker, at most; 0: no bound. When
    // reached, submit throws queue_full, try_submit returns nothing and
    // co_await submit_async waits for room: memory stays bounded.
    std::size_t max_pending = 0;
    // A worker with nothing to read looks again for this long (a
    // non-blocking recv in a loop) before it sleeps: a CALL that comes
    // meanwhile, as the next one of a submit-await loop does, is taken
    // without the wake-up of a sleeping process, which on a VM can cost more
    // than the whole round trip. It costs at most this much CPU per wait,
    // once a worker runs out of work, and yields to any other process ready
    // to run on its CPU. Only where the worker may run on two CPUs or more
    // (sched_getaffinity): on one, it would hold up the parent that sends
    // the next CALL. Zero: sleep at once.
    std::chrono::microseconds worker_spin{30};
};

// Options of one submit (submit_with).
struct submit_options {
    // Times the task is run again, on a fresh worker, when the worker running
    // it dies. 0: its future fails with worker_died at once.
    unsigned max_retries = 0;
    // A deadline from submit: when it expires first, the task is cancelled
    // (in whatever state it is) and its future ends with timeout_error.
    // Zero: none.
    std::chrono::milliseconds timeout{0};
    // submit_stream_with: items the task may send ahead of its consumer (it
    // blocks in push beyond); 0: process_pool_options::stream_window.
    std::uint32_t stream_window = 0;
};

struct shutdown_options {
    // Wait for the pending and running tasks to finish and for the workers
    // to exit before completing.
    bool wait = true;
    // Cancel the tasks that are still pending: they end cancelled and never run.
    bool cancel_futures = false;
};

struct map_options {
    // Inputs per task: each task runs the function over this many inputs.
    std::size_t chunksize = 1;
    // Chunks submitted and not yet consumed, at most; 0: all at once.
    std::size_t buffersize = 0;
};

struct pool_stats {
    std::size_t workers_alive = 0;
    std::size_t workers_started = 0;
    std::size_t tasks_queued = 0;    // pending in the parent
    std::size_t tasks_running = 0;   // dispatched or running in a worker
    std::size_t tasks_completed = 0; // ended with a value
    std::size_t tasks_failed = 0;    // ended with an exception (cancellations excluded)
    std::size_t tasks_cancelled = 0;
    std::size_t workers_killed_for_cancel = 0; // cancelled tasks that outlived cancel_grace, or cancel(true)
    // Cancelled (so counted in tasks_cancelled, not tasks_running) but still
    // in a worker that has not given them up: running during cancel_grace,
    // or sent and not yet dropped by the worker.
    std::size_t tasks_cancelling = 0;
    // Tasks sent ahead to a busy worker, given back unrun when another
    // worker was idle, and run elsewhere.
    std::size_t tasks_moved = 0;
    // Workers retired because their resident memory exceeded
    // process_pool_options::max_worker_memory after a task.
    std::size_t workers_retired_for_memory = 0;
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

    // submit, unless the queue holds max_pending tasks: then nothing is
    // submitted and the result is empty. Thread-safe.
    template <auto F, class... Args>
    std::optional<future<typename detail::remote<F>::result>> try_submit(Args&&... args);

    // Waits (suspending, on the loop thread) until the queue has room, then
    // submits. The arguments are copied into the coroutine.
    template <auto F, class... Args>
    task<future<typename detail::remote<F>::result>> submit_async(Args... args);

    // Runs a callable object in a worker: its state (serialize member) is
    // sent with the call, and the worker calls a copy built from it. The
    // type must be default-constructible with one non-template operator().
    template <class Callable, class... Args>
        requires std::is_class_v<std::remove_cvref_t<Callable>>
    future<typename detail::remote_object<std::remove_cvref_t<Callable>>::result> submit(Callable&& object, Args&&... args);

    // submit with per-task options.
    template <auto F, class... Args>
    future<typename detail::remote<F>::result> submit_with(submit_options options, Args&&... args);

    // Runs the stream function F (one that takes a coproc::sink<T>&,
    // coproc/sink.hpp) in a worker and returns the stream of the items it
    // pushes (coproc/stream.hpp), received while it runs. Throws and fails
    // as submit does. Thread-safe.
    template <auto F, class... Args>
    stream<typename detail::remote<F>::stream_item> submit_stream(Args&&... args);
    // ... with per-task options (stream_window, timeout, max_retries).
    template <auto F, class... Args>
    stream<typename detail::remote<F>::stream_item> submit_stream_with(submit_options options, Args&&... args);

    // Runs F over every element of `inputs` in workers, `chunksize` elements
    // per task, and yields the results in input order. F takes the element
    // (or, for a tuple element, its members as arguments). Chunks are
    // submitted at the call, as Python's map does: all of them, or with
    // `buffersize` that many, the rest as results are consumed. The input is
    // read only as chunks are submitted, so with `buffersize` an unbounded
    // input works; an lvalue range is read through a reference and must then
    // outlive the map (an rvalue range is moved in). The collecting form, a
    // task, rethrows the first failure in input order and cancels the
    // chunks still in flight. Both forms hold the pool's state, not the pool:
    // consumed after the pool is gone, they end with cancelled_error (what
    // was in flight) or pool_closed (what was still to be submitted).
    // Throws std::invalid_argument for a chunksize of 0, and what a submit
    // throws (pool_closed after shutdown, broken_process_pool) at the call;
    // later, the consumer gets it.
    template <auto F, std::ranges::input_range Range>
        requires std::ranges::viewable_range<Range&&>
    auto map(Range&& inputs, map_options opts = {});

    // The streaming form: an async generator that yields each result, in
    // input order, as soon as it and all before it have arrived; it yields
    // every result before a failing one (within a chunk too), then throws.
    // Destroying it cancels the chunks still in flight.
    template <auto F, std::ranges::input_range Range>
        requires std::ranges::viewable_range<Range&&>
    auto map_stream(Range&& inputs, map_options opts = {});

    // Stops accepting work (submit throws pool_closed). With `wait`, completes
    // once pending and running tasks have finished and the workers have
    // exited; with `cancel_futures`, pending tasks are cancelled first.
    task<void> shutdown(shutdown_options opts = {});

    // The blocking form of shutdown, for a thread that is not the loop's: it
    // returns once the awaitable form would complete. While another thread
    // runs the loop, that loop must keep running until this returns: if no
    // thread runs it for half a second before the shutdown completed, this
    // throws std::logic_error instead of waiting for ever (the pool stays
    // closed). When no thread runs the loop, this thread runs it for the
    // duration. On the loop's thread it throws std::logic_error (it could
    // never return).
    void shutdown_blocking(shutdown_options opts = {});

    // CPython 3.14's terminate_workers() and kill_workers(): shut the pool
    // down without waiting, cancelling what is pending (as shutdown({.wait =
    // false, .cancel_futures = true})), then send SIGTERM / SIGKILL to every
    // worker. Later submits throw pool_closed; no worker is started again.
    // A running task fails with worker_died (naming the call), one sent to a
    // worker but not started ends cancelled. Loop thread.
    void terminate_workers();
    void kill_workers();

    // Kills every worker (SIGKILL) and keeps the pool serving: running tasks
    // end cancelled, tasks sent but not started go back to the queue, and
    // the pool starts new workers for them. Loop thread.
    void restart_workers();

    // Counters, read on any thread.
    [[nodiscard]] pool_stats stats() const;

    // The process ids of the live workers (loop thread). A remote worker's
    // (process_pool_options::placement) is its pid on its own host, once its
    // HELLO came; one not started yet is left out.
    [[nodiscard]] std::vector<int> worker_pids() const;

private:
    // Builds a work item for the function described by Remote (remote<F> or
    // remote_object<T>), `payload...` encoded as its CALL payload.
    template <class Remote, class R, class... Payload>
    std::optional<future<R>> submit_encoded(std::uint16_t frame_flags, submit_options options, bool throw_when_full,
                                            Payload&&... payload);

    friend std::shared_ptr<detail::pool_core> detail::pool_core_of(const process_pool& pool) noexcept;

    std::shared_ptr<detail::pool_core> core_;
};

namespace detail {

// One coroutine waiting for a pool to change (room in its queue, a
// shutdown's progress). It is resumed once, on the pool's loop, by whichever
// comes first: the pool's wake-up (loop thread) or a stop of the awaiter's
// token (any thread).
class pool_waiter {
public:
    pool_waiter(event_loop& loop, std::coroutine_handle<> awaiting) noexcept : loop_(&loop), awaiting_(awaiting) {}

    // Schedules the coroutine unless something else already did. acq_rel on
    // the claim: exactly one of the pool and the stop callback resumes it,
    // and the one that does sees the registration the awaiter made before.
    void wake() noexcept {
        if (claimed_.exchange(true, std::memory_order_acq_rel)) return;
        schedule_operation{*loop_}.await_suspend(awaiting_);
    }
    // The stop callback: marks the wait as cancelled, then wakes it. The
    // release store is read (acquire) by the resumed coroutine.
    void stop() noexcept {
        stopped_.store(true, std::memory_order_release);
        wake();
    }
    [[nodiscard]] bool stopped() const noexcept { return stopped_.load(std::memory_order_acquire); }

private:
    event_loop* loop_;
    std::coroutine_handle<> awaiting_;
    std::atomic<bool> claimed_{false};
    std::atomic<bool> stopped_{false};
};

// Suspends until `ready()` may hold (the caller checks again) and throws
// cancelled_error when the awaiter's stop token is stopped first.
template <class Ready>
class pool_change {
public:
    pool_change(pool_core* core, Ready ready) noexcept : core_(core), ready_(std::move(ready)) {}
    pool_change(pool_change&& other) noexcept : core_(other.core_), ready_(std::move(other.ready_)) {}
    pool_change(const pool_change&) = delete;

    bool await_ready() const { return ready_(); }
    template <class P>
    bool await_suspend(std::coroutine_handle<P> awaiting) {
        std::stop_token token = stop_token_of(awaiting);
        if (token.stop_requested()) {
            stopped_before_ = true;
            return false;
        }
        waiter_ = std::make_shared<pool_waiter>(pool_loop(*core_), awaiting);
        pool_add_waiter(*core_, waiter_);
        // Registered after the waiter: a stop requested in between runs
        // the callback right here, which resumes the coroutine from the loop.
        if (token.stop_possible()) on_stop_.emplace(std::move(token), stop_waiter{waiter_.get()});
        return true;
    }
    void await_resume() {
        on_stop_.reset(); // waits for a callback running on another thread
        if (stopped_before_ || (waiter_ && waiter_->stopped())) {
            throw cancelled_error("coproc: waiting for the process pool was cancelled");
        }
    }

private:
    struct stop_waiter {
        pool_waiter* waiter;
        void operator()() const noexcept { waiter->stop(); }
    };
    pool_core* core_;
    Ready ready_;
    std::shared_ptr<pool_waiter> waiter_;
    std::optional<std::stop_callback<stop_waiter>> on_stop_;
    bool stopped_before_ = false;
};

struct has_room {
    pool_core* core;
    bool operator()() const noexcept { return pool_has_room(*core); }
};

// Suspends until the pool's queue has room (or the pool is gone).
inline pool_change<has_room> pool_room(pool_core* core) { return {core, has_room{core}}; }

// One element of a map's input as F's argument tuple: the element itself as
// F's only argument, or a tuple's members as F's arguments.
template <class Arguments, class Element>
Arguments to_arguments(const Element& element) {
    if constexpr (std::tuple_size_v<Arguments> == 1 && std::is_constructible_v<std::tuple_element_t<0, Arguments>, const Element&>) {
        return Arguments{element};
    } else {
        static_assert(std::is_constructible_v<Arguments, const Element&>,
                      "coproc: map<F>: an input element must convert to F's parameter, or be a tuple whose members "
                      "convert to F's parameters");
        return Arguments(element);
    }
}

// Builds a work item for the function described by Remote (remote<F> or
// remote_object<T>), `payload...` encoded as its CALL payload, and queues
// it in `core`'s pool. Nothing when the queue is full and `throw_when_full`
// is false. Throws pool_closed, broken_process_pool, queue_full.
template <class Remote, class R, class... Payload>
std::optional<future<R>> submit_to(pool_core& core, std::uint16_t frame_flags, submit_options options,
                                   bool throw_when_full, Payload&&... payload) {
    using remote = Remote;
    (void)remote::registered; // odr-use: registered in every process of this program
    // Checked once per function: every registration ran before main.
    static const bool unique = remote_function_is_unique(remote::id, &remote::invoke);

    auto* item = new typed_work_item<R>();
    future<R> handle{item};
    item->function_id = remote::id;
    item->function_name = remote::name;
    item->frame_flags = frame_flags;
    item->retries_left = options.max_retries;
    // A stream's window; 0 here: the pool's default (pool_core::submit).
    if ((frame_flags & wire::frame_flag::stream) != 0) item->stream_window = options.stream_window;
    if (options.timeout.count() > 0) item->deadline = std::chrono::steady_clock::now() + options.timeout;
    bool failed = false;
    if (!unique) {
        item->error = std::make_exception_ptr(error(describe_ambiguous_function(remote::name)));
        failed = true;
    } else {
        try {
            // Moved-in strings and byte or number vectors of 64 KiB or more
            // are kept as they are and sent from there, not copied; shared
            // buffers are sent as their descriptors.
            descriptor_encoding sharing{item->descriptors};
            encode_attaching(item->arguments, item->attached, std::forward<Payload>(payload)...);
            const std::size_t size = item->arguments.size() + attached_size(item->attached);
            if (size + sizeof item->function_id > wire::max_payload) {
                throw std::length_error("coproc: the arguments of " + std::string(remote::name) + " take " +
                                        std::to_string(size) + " bytes serialized, more than the 2 GiB a frame can carry");
            }
        } catch (...) {
            item->arguments = {};
            item->attached.clear();
            item->descriptors.clear();
            item->error = std::current_exception();
            failed = true;
        }
    }
    if (!pool_enqueue(core, item, failed, throw_when_full)) return std::nullopt;
    return handle;
}

// One map or map_stream call: its input, read a chunk at a time, and the
// futures of the chunks submitted and not yet consumed, in input order.
//
//   made at the call ----> refill: chunks submitted while fewer than
//     (submits at once)    `window` are in flight, the input has more and the
//                          pool's queue takes them
//   take() --------------> the oldest chunk's future; refills behind it
//   destroyed -----------> cancels the chunks still in flight
//
// It holds the pool's core, never the process_pool object, so it may
// outlive the pool: then nothing more is submitted (pool_closed) and what
// was in flight ended cancelled with the pool. It lives on the heap, as
// `next_` points into `inputs_`.
template <auto F, class Inputs>
class map_run {
public:
    using arguments = typename remote<F>::arguments;
    using value = typename remote<F>::result;
    using chunk_future = future<std::vector<value>>;

    map_run(std::shared_ptr<pool_core> core, Inputs inputs, map_options options)
        : core_(std::move(core)), inputs_(std::move(inputs)), next_(std::ranges::begin(inputs_)),
          chunksize_(options.chunksize),
          window_(options.buffersize == 0 ? std::numeric_limits<std::size_t>::max() : options.buffersize) {
        if (chunksize_ == 0) throw std::invalid_argument("coproc: map_options::chunksize must be positive");
    }
    map_run(const map_run&) = delete;
    map_run& operator=(const map_run&) = delete;
    ~map_run() {
        for (auto& pending : in_flight_) pending.cancel();
    }

    // True once every chunk was taken.
    [[nodiscard]] bool finished() const {
        return in_flight_.empty() && !stopped_ && chunk_.empty() && next_ == std::ranges::end(inputs_);
    }
    // True when nothing is in flight but the input has more: the pool's
    // queue was full (wait for room, then refill), or the pool refused more
    // (stopped(): the pool_closed or broken_process_pool it threw).
    [[nodiscard]] bool starved() const { return in_flight_.empty() && !finished(); }
    [[nodiscard]] std::exception_ptr stopped() const { return stopped_; }
    [[nodiscard]] pool_core* core() const noexcept { return core_.get(); }

    // Submits chunks until the window is full, the input ends or the
    // pool's queue is full. Never throws for the pool: a refusal is kept
    // in stopped() and rethrown where the consumer needs the next chunk.
    void refill() {
        while (!stopped_ && in_flight_.size() < window_) {
            if (chunk_.empty()) {
                for (; chunk_.size() < chunksize_ && next_ != std::ranges::end(inputs_); ++next_) {
                    chunk_.push_back(to_arguments<arguments>(*next_));
                }
                if (chunk_.empty()) return; // the input ended
            }
            std::optional<chunk_future> submitted;
            try {
                if (pool_destroyed(*core_)) throw pool_closed();
                submitted = submit_to<remote<F>, std::vector<value>>(*core_, wire::frame_flag::chunk, {}, false, chunk_);
            } catch (const error&) {
                stopped_ = std::current_exception(); // pool_closed, broken_process_pool
                return;
            }
            if (!submitted) return; // the queue is full: the chunk waits here
            chunk_.clear();
            in_flight_.push_back(std::move(*submitted));
        }
    }

    // The oldest chunk's future; the window refills behind it.
    chunk_future take() {
        auto next = std::move(in_flight_.front());
        in_flight_.pop_front();
        refill();
        return next;
    }

private:
    std::shared_ptr<pool_core> core_;
    Inputs inputs_;
    std::ranges::iterator_t<Inputs> next_;
    std::size_t chunksize_;
    std::size_t window_;
    std::vector<arguments> chunk_; // built and not yet accepted by a full queue
    std::deque<chunk_future> in_flight_;
    std::exception_ptr stopped_;
};

// The next chunk's future; when nothing is in flight, first waits for room
// in the pool's queue and refills, or rethrows why the pool refused.
template <auto F, class Inputs>
task<future<std::vector<typename remote<F>::result>>> next_chunk(map_run<F, Inputs>* run) {
    while (run->starved()) {
        if (run->stopped()) std::rethrow_exception(run->stopped());
        co_await pool_room(run->core());
        run->refill();
    }
    co_return run->take();
}

template <auto F, class Inputs>
task<std::vector<typename remote<F>::result>> collect_map(std::unique_ptr<map_run<F, Inputs>> run) {
    std::vector<typename remote<F>::result> results;
    while (!run->finished()) {
        auto pending = co_await next_chunk(run.get());
        auto values = co_await std::move(pending);
        for (auto& value : values) results.push_back(std::move(value));
    }
    co_return results;
}

template <auto F, class Inputs>
async_generator<typename remote<F>::result> stream_map(std::unique_ptr<map_run<F, Inputs>> run) {
    while (!run->finished()) {
        auto pending = co_await next_chunk(run.get());
        std::vector<typename remote<F>::result> values;
        std::exception_ptr failure;
        try {
            values = co_await std::move(pending);
        } catch (...) {
            // The worker sent the results of the chunk's inputs before the
            // failing one with its error: they are yielded first.
            failure = std::current_exception();
            if (const auto& partial = future_access::item(pending).value) values = std::move(*partial);
        }
        for (auto& value : values) co_yield std::move(value);
        if (failure) std::rethrow_exception(failure);
    }
}

template <auto F, class Range>
auto start_map(std::shared_ptr<pool_core> core, Range&& inputs, map_options options) {
    using inputs_view = std::views::all_t<Range&&>;
    auto run = std::make_unique<map_run<F, inputs_view>>(std::move(core), std::views::all(std::forward<Range>(inputs)),
                                                          options);
    run->refill(); // submitted at the call, as Python's map does
    return run;
}

} // namespace detail

template <auto F, std::ranges::input_range Range>
    requires std::ranges::viewable_range<Range&&>
auto process_pool::map(Range&& inputs, map_options opts) {
    static_assert(!std::is_void_v<typename detail::remote<F>::result>, "coproc: map<F> needs a function that returns a value");
    return detail::collect_map<F>(detail::start_map<F>(core_, std::forward<Range>(inputs), opts));
}

template <auto F, std::ranges::input_range Range>
    requires std::ranges::viewable_range<Range&&>
auto process_pool::map_stream(Range&& inputs, map_options opts) {
    static_assert(!std::is_void_v<typename detail::remote<F>::result>, "coproc: map_stream<F> needs a function that returns a value");
    return detail::stream_map<F>(detail::start_map<F>(core_, std::forward<Range>(inputs), opts));
}

template <class Remote, class R, class... Payload>
std::optional<future<R>> process_pool::submit_encoded(std::uint16_t frame_flags, submit_options options,
                                                      bool throw_when_full, Payload&&... payload) {
    return detail::submit_to<Remote, R>(*core_, frame_flags, options, throw_when_full, std::forward<Payload>(payload)...);
}

template <auto F, class... Args>
future<typename detail::remote<F>::result> process_pool::submit(Args&&... args) {
    using remote = detail::remote<F>;
    using arguments = typename remote::arguments;
    static_assert(std::is_constructible_v<arguments, Args&&...>,
                  "coproc: submit<F>(args...): the arguments do not convert to F's parameters");
    static_assert(!remote::is_stream, "coproc: F pushes items into a coproc::sink: submit it with submit_stream<F>");
    return *submit_encoded<remote, typename remote::result>(0, {}, true, arguments{std::forward<Args>(args)...});
}

template <class Callable, class... Args>
    requires std::is_class_v<std::remove_cvref_t<Callable>>
future<typename detail::remote_object<std::remove_cvref_t<Callable>>::result> process_pool::submit(Callable&& object,
                                                                                                   Args&&... args) {
    using remote = detail::remote_object<std::remove_cvref_t<Callable>>;
    using arguments = typename remote::arguments;
    static_assert(std::is_constructible_v<arguments, Args&&...>,
                  "coproc: submit(object, args...): the arguments do not convert to the parameters of its operator()");
    return *submit_encoded<remote, typename remote::result>(0, {}, true, object, arguments{std::forward<Args>(args)...});
}

template <auto F, class... Args>
std::optional<future<typename detail::remote<F>::result>> process_pool::try_submit(Args&&... args) {
    using remote = detail::remote<F>;
    using arguments = typename remote::arguments;
    static_assert(std::is_constructible_v<arguments, Args&&...>,
                  "coproc: try_submit<F>(args...): the arguments do not convert to F's parameters");
    static_assert(!remote::is_stream, "coproc: F pushes items into a coproc::sink: submit it with submit_stream<F>");
    return submit_encoded<remote, typename remote::result>(0, {}, false, arguments{std::forward<Args>(args)...});
}

template <auto F, class... Args>
task<future<typename detail::remote<F>::result>> process_pool::submit_async(Args... args) {
    // The core outlives this pool object: after a wait, check that the pool
    // still exists before touching it again.
    const std::shared_ptr<detail::pool_core> core = core_;
    for (;;) {
        if (auto submitted = try_submit<F>(args...)) co_return std::move(*submitted);
        co_await detail::pool_room(core.get());
        if (detail::pool_destroyed(*core)) throw pool_closed();
    }
}

template <auto F, class... Args>
future<typename detail::remote<F>::result> process_pool::submit_with(submit_options options, Args&&... args) {
    using remote = detail::remote<F>;
    using arguments = typename remote::arguments;
    static_assert(std::is_constructible_v<arguments, Args&&...>,
                  "coproc: submit_with<F>(options, args...): the arguments do not convert to F's parameters");
    static_assert(!remote::is_stream, "coproc: F pushes items into a coproc::sink: submit it with submit_stream<F>");
    return *submit_encoded<remote, typename remote::result>(0, options, true, arguments{std::forward<Args>(args)...});
}

template <auto F, class... Args>
stream<typename detail::remote<F>::stream_item> process_pool::submit_stream(Args&&... args) {
    return submit_stream_with<F>(submit_options{}, std::forward<Args>(args)...);
}

template <auto F, class... Args>
stream<typename detail::remote<F>::stream_item> process_pool::submit_stream_with(submit_options options, Args&&... args) {
    using remote = detail::remote<F>;
    using arguments = typename remote::arguments;
    static_assert(remote::is_stream,
                  "coproc: submit_stream<F> takes a stream function: one whose last parameter (before an optional "
                  "std::stop_token) is a coproc::sink<T>&");
    static_assert(std::is_constructible_v<arguments, Args&&...>,
                  "coproc: submit_stream<F>(args...): the arguments do not convert to F's parameters");
    return stream<typename remote::stream_item>{
        *submit_encoded<remote, void>(detail::wire::frame_flag::stream, options, true, arguments{std::forward<Args>(args)...})};
}

} // namespace coproc

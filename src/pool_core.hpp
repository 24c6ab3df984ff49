// The parent side of the process pool, private to src/: worker_handle and
// pool_core, shared by the pool's files (DESIGN.md, "Data flow"):
//
//   src/pool_scheduler.cpp     the queue and the scheduler
//   src/worker_connection.cpp  frames over one worker's socket
//   src/worker_process.cpp     one worker's life
//   src/pool_stream.cpp        the items of stream tasks
//   src/process_pool.cpp       the facade that ties them together
//
// Everything runs on the pool's loop thread, except submit, cancel of a
// pending item and the blocking wait, which take the pool's mutex (or the
// waiters' mutex) and may run anywhere.
//
// Per worker, three coroutines spawned on the loop:
//
//   read_worker   recv into a buffer, parse frames, complete tasks
//   watch_worker  poll the worker's pidfd; on exit reap it (waitid) and fail
//                 or retry the tasks it held
//   write_worker  started when frames are queued and none is being sent:
//                 sends everything queued, in batches
//
// The coroutines hold a shared_ptr to pool_core, so it outlives the
// process_pool object until they have ended; a worker_handle is freed once
// its worker exited and its coroutines ended.
#pragma once

#include "pool_scheduler.hpp"
#include "worker_connection.hpp"
#include "worker_process.hpp"

#include <coproc/process_pool.hpp>
#include <coproc/detail/wire.hpp>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <coroutine>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

namespace coproc::detail {

// One worker, as its three parts see it: the connection (its socket and
// frames, worker_connection.hpp), its life (the process, worker_process.hpp)
// and what the scheduler handed it (pool_scheduler.hpp); the rest is shared.
struct worker_handle : worker_connection, worker_process, worker_assignment {
    int coroutines = 0;      // of read/watch/write still alive
    // A death is handled once both hold: the process was reaped (exit
    // status known) and the reader drained the socket to EOF (every START
    // and RESULT it sent has been seen), so a task that never started can
    // be requeued without any risk of running twice.
    bool reaped = false;
    bool reader_done = false;
    // Stopping `lifetime_stop` ends this worker's timers early (idle, cancel
    // grace): the worker exited, or the pool is gone.
    std::stop_source lifetime_stop;

    // The socket and pidfd; a remote worker's exit event is its placement's
    // (pool_core::release_remote).
    void close_descriptors() noexcept {
        if (socket >= 0) ::close(std::exchange(socket, -1));
        if (pidfd >= 0) ::close(std::exchange(pidfd, -1));
        for (const int received : received_descriptors) ::close(received);
        received_descriptors.clear();
    }
};

// Runs a pool coroutine with a token of its own that is never stopped
// (process_pool.cpp).
task<void> shielded(task<void> body);

// One class, its members defined across those files: grouped below by
// the file that defines them.
class pool_core : public std::enable_shared_from_this<pool_core> {
public:
    // --- process_pool.cpp: construction, destruction, terminate, restart, stats
    pool_core(event_loop& loop, process_pool_options opts);
    ~pool_core();
    void destroy() noexcept;
    // terminate_workers / kill_workers: CPython 3.14's meaning.
    void terminate(int signal);
    void restart_workers() noexcept;
    pool_stats stats() const;
    std::vector<int> worker_pids() const;

    // --- pool_scheduler.cpp: the queue, dispatch, completion, a worker's exit
    bool submit(work_item* item, bool encoding_failed, bool throw_when_full);
    static void share_arguments(work_item& item);
    void start_deadline_timer(work_item* item);
    [[nodiscard]] bool has_room() const noexcept;
    void dispatch();
    [[nodiscard]] std::size_t depth(const work_item& item) const noexcept;
    [[nodiscard]] std::size_t prefetch_allowed(const work_item& item, std::size_t starting) const noexcept;
    void close(bool cancel_pending);
    bool cancel(work_item& item, bool force, std::exception_ptr reason = nullptr, bool kill_after_grace = true);
    bool await(work_item& item, std::coroutine_handle<> awaiting);
    void forget(work_item& item, std::coroutine_handle<> awaiting) noexcept;
    void add_callback(work_item& item, std::function<void()> callback);
    void set_progress_callback(work_item& item, std::function<void(double)> callback);
    void on_worker_exit(worker_handle& worker);
    void spawn_retry_fired();

    // shutdown() waits on these.
    [[nodiscard]] bool idle() const;
    [[nodiscard]] bool no_workers() const;
    void add_waiter(std::shared_ptr<pool_waiter> waiter) { waiters_.push_back(std::move(waiter)); }
    void wake_waiters();

    // --- worker_connection.cpp: frames; coroutine bodies
    [[nodiscard]] std::chrono::milliseconds frame_timeout() const noexcept { return options_.frame_timeout; }
    void handle_frames(worker_handle& worker, std::span<const std::byte> data, std::size_t& consumed);
    // A RESULT or ERROR for the item at `position` of worker.assigned; with
    // `stored`, a RESULT already received into the item's value.
    void handle_answer(worker_handle& worker, std::deque<work_item*>::iterator position, wire::frame_kind kind,
                       std::span<const std::byte> payload, bool stored);
    // A large RESULT received straight into its item's value (read_worker):
    // the item (retained) and where the block's elements go, or null when
    // the frame must go through handle_frames as usual.
    work_item* begin_block_result(worker_handle& worker, const wire::frame_header& header,
                                  std::span<const std::byte> start, std::span<std::byte>& target);
    // ... and the end of it, once every byte arrived (`complete`) or not.
    void end_block_result(worker_handle& worker, work_item* item, bool complete);
    std::vector<spare_block> take_sent_blocks(work_item& item, const void* tag);
    void on_reader_done(worker_handle& worker);
    // A PROGRESS or ITEM came for `item`: it runs.
    void mark_running(work_item& item);
    // A PROGRESS for `item`: its latest_progress, and its callback posted.
    void deliver_progress(work_item& item, double value);

    // --- pool_stream.cpp: the items of stream tasks (submit_stream)
    // An ITEM for the stream `item`: kept for its consumer, which is woken.
    void deliver_stream_item(work_item& item, std::span<const std::byte> payload);
    bool await_stream(work_item& item, std::coroutine_handle<> awaiting);
    std::optional<byte_buffer> take_stream_item(work_item& item);
    // Lets the worker running the stream `item` send `items` more (loop
    // thread).
    void send_credit(work_item& item, std::uint32_t items);

    // --- worker_process.cpp: a worker's life; coroutine bodies
    void cancel_in_worker(std::uint64_t id, std::uint64_t serial, bool kill_now, bool kill_after_grace = true);
    void grace_expired(worker_handle& worker, std::uint64_t id);
    [[nodiscard]] std::chrono::milliseconds cancel_grace() const noexcept { return options_.cancel_grace; }
    [[nodiscard]] std::chrono::milliseconds start_timeout() const noexcept { return options_.start_timeout; }
    void on_reaped(worker_handle& worker, const ::siginfo_t& info);
    // A remote worker's exit event fired: its exit status, then on_reaped.
    void on_remote_exit(worker_handle& worker);
    // Gives a remote worker back to its placement, once (no-op for a local one).
    void release_remote(worker_handle& worker) noexcept;
    void release_coroutine(worker_handle& worker) noexcept;
    // Kills the worker (SIGKILL, or `signal`: terminate_workers sends
    // SIGTERM) and condemns it: nothing more is dispatched to it.
    // `violation`: for a protocol violation, after which its frames were not
    // read to the end, so no task it held may be requeued.
    void kill_worker(worker_handle& worker, const std::string& reason, bool violation = false,
                     int signal = SIGKILL) noexcept;
    void initializer_failed(worker_handle& worker, std::exception_ptr cause);
    void idle_timer_fired(worker_handle& worker, std::uint64_t generation);
    // max_worker_memory: after the worker answered a task, retires it when
    // its resident memory is over the limit (no more tasks; the ones it
    // has not started are recalled; BYE once it holds none).
    void retire_if_over_memory(worker_handle& worker);
    [[nodiscard]] std::chrono::milliseconds idle_timeout() const noexcept { return options_.idle_timeout; }

    event_loop& loop;
    // Set while read_worker hands a received batch of frames to
    // handle_frames: each answer may dispatch, and the frames that follow
    // are sent together by write_worker rather than one send(2) each.
    bool handling_frames = false;
    bool destroyed = false; // the process_pool object is gone (loop thread)

private:
    // --- pool_scheduler.cpp
    // What finishing an item leaves to do once the mutex is released.
    struct completion {
        work_state state{};
        std::coroutine_handle<> awaiter{};
        std::vector<std::function<void()>> callbacks;
        std::optional<std::stop_source> deadline_stop;
        std::shared_ptr<const std::function<void(double)>> progress_callback;
    };
    // Makes the item final: true when this call did (it was not already).
    bool complete(work_item* item, work_state state, std::exception_ptr error) noexcept;
    bool finalize_locked(work_item& item, work_state state, std::exception_ptr error, completion& done) noexcept;
    void deliver(completion& done) noexcept;
    // Stops counting the item as running in a worker; idempotent, so that
    // whichever of cancel, the worker's answer, its death or destroy comes
    // first counts it once. Called with mutex_ held.
    // It also stops counting it as cancelling (stats().tasks_cancelling):
    // every call but cancel's is the item leaving its worker.
    void uncount_locked(work_item& item) noexcept {
        if (item.cancelling) {
            item.cancelling = false;
            cancelling_.fetch_sub(1, std::memory_order_relaxed);
        }
        if (!item.in_worker) return;
        item.in_worker = false;
        in_workers_.fetch_sub(1, std::memory_order_relaxed);
    }
    // Ends every pending item in `state`, each with an exception of its own
    // made by `make_error` (never one object shared by many futures: CPython
    // gh-101267).
    void end_all_pending(work_state state, const std::function<std::exception_ptr()>& make_error) noexcept;
    // Breaks the pool, once: later submits throw broken_process_pool, every
    // pending future fails with one of its own, and every worker is killed,
    // so that the futures they hold fail alike when their exits are seen.
    void break_pool(std::string message, std::exception_ptr cause = nullptr);
    // A broken_process_pool of its own for one future (or one submit).
    std::exception_ptr broken_error_locked() const;
    std::exception_ptr broken_error() const;
    // What to do when starting a worker failed for a passing shortage.
    // `why`: the shortage, if not this process's (a remote host's).
    void spawn_failed(const std::system_error& failure, std::size_t live, const std::string& why = {});
    void start_spawn_retry();

    // --- worker_connection.cpp
    void start_writer(worker_handle& worker);
    void send_bye(worker_handle& worker);

    // --- worker_process.cpp
    // A local worker, or, once max_workers local ones live, one that
    // options_.placement starts elsewhere.
    void spawn_worker();
    void spawn_remote_worker();
    // Local workers not yet exited (starting ones included).
    [[nodiscard]] std::size_t local_workers_live() const;
    // A worker just added to workers_: its serial, the counters, and its
    // read, watch and HELLO-timer coroutines.
    void start_worker_coroutines(worker_handle& worker);
    // A task its worker gave back unrun (RECALLED), already out of the
    // worker's list: back to the front of the queue (pool_scheduler.cpp).
    void take_back(work_item* item);
    // Sends RECALLs to workers holding tasks they have not started while
    // another worker is idle and nothing is queued (pool_scheduler.cpp).
    void recall_for_idle(const std::vector<worker_handle*>& ready);
    // The name workers show in ps and top: the worker program's file name.
    std::string worker_program_name() const;
    void start_idle_timer(worker_handle& worker);
    std::vector<char*> worker_environment();

    // Data, in the order it always had; the files that use it in [brackets].
    // Options and what the constructor (process_pool.cpp) makes of them [all].
    process_pool_options options_;
    int max_workers_;       // local_workers_ plus the placement's slots
    int local_workers_;
    // For remote workers: the options' environment and the pool's COPROC_
    // variables, which their host agent adds to its own environment.
    std::vector<std::string> remote_environment_;
    std::uint64_t next_serial_ = 1; // worker_process::serial [worker_process.cpp]
    std::string executable_;
    std::vector<std::string> environment_storage_;

    // The queue [pool_scheduler.cpp; closed_ and terminated_ also
    // process_pool.cpp; the others take mutex_ for an item's state].
    mutable std::mutex mutex_; // guards pending_, closed_, broken_, next_id_, dispatch_posted_ and items not yet final
    std::deque<work_item*> pending_;
    bool closed_ = false;
    // Set once the pool is broken: what broken_process_pool says, and the
    // error that broke it (an initializer's exception), if any.
    std::optional<std::pair<std::string, std::exception_ptr>> broken_;
    // terminate_workers() or kill_workers() was called: the pool is closed,
    // its workers are being killed and none is started again.
    bool terminated_ = false;
    std::uint64_t next_id_ = 1;
    bool dispatch_posted_ = false;

    // [process_pool.cpp, worker_process.cpp, pool_scheduler.cpp]
    std::list<std::unique_ptr<worker_handle>> workers_; // loop thread
    std::vector<std::shared_ptr<pool_waiter>> waiters_; // loop thread [pool_scheduler.cpp]
    // Counted by on_worker_exit (pool_scheduler.cpp), reset by a HELLO or an
    // initializer's RESULT (worker_connection.cpp).
    int startup_failures_ = 0;
    // [pool_scheduler.cpp]
    // Starting a worker failed for a passing shortage (EMFILE, EAGAIN, ...):
    // a timer retries after spawn_backoff_ (loop thread).
    bool spawn_retry_pending_ = false;
    std::chrono::milliseconds spawn_backoff_{0};
    // [process_pool.cpp, pool_scheduler.cpp]
    std::stop_source lifetime_stop_; // stopped when the process_pool goes away
    // [pool_scheduler.cpp, worker_connection.cpp]
    // Moving average run time (START to answer, microseconds) per function
    // (and call kind): sets the prefetch depth (loop thread).
    std::unordered_map<std::uint64_t, double> run_us_;

    // Counters: read by stats() (process_pool.cpp), counted where each
    // change happens [all].
    std::atomic<std::size_t> workers_alive_{0};
    std::atomic<std::size_t> workers_started_{0};
    std::atomic<std::size_t> queued_{0};
    std::atomic<std::size_t> in_workers_{0};
    std::atomic<std::size_t> completed_{0};
    std::atomic<std::size_t> failed_{0};
    std::atomic<std::size_t> cancelled_{0};
    std::atomic<std::size_t> killed_for_cancel_{0};
    std::atomic<std::size_t> cancelling_{0}; // cancelled, still in a worker (stats().tasks_cancelling)
    std::atomic<std::size_t> moved_{0};      // given back unrun by a busy worker (stats().tasks_moved)
    std::atomic<std::size_t> retired_for_memory_{0}; // stats().workers_retired_for_memory
};

} // namespace coproc::detail

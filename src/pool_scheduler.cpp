// The queue and the scheduler. This step of DESIGN.md's data flow:
//
//  caller coroutine          event loop
//  ----------------          ----------
//  pool.submit<f>(args) -> work item {id, fn id, cereal bytes, promise}
//                           queue + scheduler: the task goes to an idle worker, or starts one
//                           (below max_workers); short tasks are sent ahead to busy workers to
//                           keep them fed, and taken back unrun when another worker frees up
//  co_await future  <-----  complete promise, resume the awaiter on the loop
//
// Work item states (DESIGN.md, "Work item states"):
//
//   pending --dispatch--> dispatched --START--> running --RESULT--> finished
//      ^                      |                    +--ERROR, or its worker died--> failed
//      +--its worker died-----+--------------------+
//         (unrun, or with retries left: requeued)
//   cancel in any of these three states --> cancelled (sent to a worker: CANCEL follows)
//
// submit, cancel of a pending item, await and the callbacks run on any
// thread under mutex_, the blocking wait under the waiters' mutex; the rest
// on the loop thread.

#include "pool_scheduler.hpp"
#include "pool_core.hpp"

#include <coproc/cancellation.hpp>

#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace coproc::detail {

namespace {

// Consecutive workers that may exit before saying HELLO before the pool
// declares itself broken (the worker program is wrong, not unlucky).
constexpr int startup_failures_allowed = 3;
// Times a task sent to a worker that died before starting it is requeued.
constexpr unsigned max_requeues = 3;

// Lets dispatch start workers again after a passing shortage.
task<void> spawn_retry(std::shared_ptr<pool_core> core, std::chrono::milliseconds delay, std::stop_token stop) {
    try {
        co_await with_stop_token(sleep_idle(&core->loop, delay), std::move(stop));
    } catch (...) {
        co_return; // the pool is gone
    }
    if (!core->destroyed) core->spawn_retry_fired();
}

// Holds one reference to a work item for as long as it lives.
class item_reference {
public:
    explicit item_reference(work_item* item) noexcept : item_(item) { item_->retain(); }
    item_reference(item_reference&& other) noexcept : item_(std::exchange(other.item_, nullptr)) {}
    item_reference& operator=(item_reference&&) = delete;
    ~item_reference() {
        if (item_ != nullptr) item_->release();
    }
    work_item* operator->() const noexcept { return item_; }
    work_item& operator*() const noexcept { return *item_; }

private:
    work_item* item_;
};

task<void> sleep_until_deadline(event_loop* loop, std::chrono::steady_clock::time_point deadline) {
    co_await loop->sleep_until(deadline);
}

// submit_options::timeout: cancels the task with timeout_error when the
// deadline passes first; woken early (through the item's deadline_stop) when
// the task ends before.
task<void> deadline_timer(std::shared_ptr<pool_core> core, item_reference item, std::stop_token ended) {
    try {
        co_await with_stop_token(sleep_until_deadline(&core->loop, item->deadline), std::move(ended));
    } catch (...) {
        co_return; // the task ended first, or the loop is going away
    }
    if (core->destroyed) co_return;
    core->cancel(*item, false,
                 std::make_exception_ptr(timeout_error("coproc: " + std::string(item->function_name) +
                                                       " did not finish before its submit timeout")));
}

// The dispatch a submit on the loop thread asks for: run from the loop's
// ready queue, after the submitting code has returned to the loop, as a
// posted one is, without the eventfd write and the completion reading it
// that post() costs (a system call and a ring round trip per submit).
task<void> dispatch_soon(std::weak_ptr<pool_core> weak) {
    if (auto core = weak.lock()) core->dispatch();
    co_return;
}

} // namespace

// Blocking get(): one mutex and condition variable for every pool, so that a
// waiting thread never needs the pool to still exist.
std::mutex waiters_mutex;
std::condition_variable waiters_cv;
std::atomic<int> blocked_waiters{0};

// --- submit, cancel, await, callbacks (any thread unless noted)

void pool_core::start_deadline_timer(work_item* item) {
    std::stop_token ended;
    {
        std::lock_guard lock{mutex_};
        if (is_final(item->state())) return;
        item->deadline_stop.emplace();
        ended = item->deadline_stop->get_token();
    }
    auto start = [weak = weak_from_this(), reference = std::make_shared<item_reference>(item), ended]() {
        if (auto core = weak.lock()) core->loop.spawn(shielded(deadline_timer(core, std::move(*reference), ended)));
    };
    if (loop.is_loop_thread()) {
        start();
    } else {
        loop.post(std::move(start));
    }
}

bool pool_core::has_room() const noexcept {
    if (destroyed || options_.max_pending == 0) return true;
    std::lock_guard lock{mutex_};
    return closed_ || broken_.has_value() || queued_.load(std::memory_order_relaxed) < options_.max_pending;
}

// Makes a large encoding shared: the bytes move into one shared buffer, cut
// into attached parts around the parts already attached, so that every
// worker's outbox (a requeued task is sent again) refers to them.
void pool_core::share_arguments(work_item& item) {
    const auto shared = std::make_shared<const byte_buffer>(std::move(item.arguments));
    item.arguments = {};
    std::vector<attached_bytes> parts;
    parts.reserve(2 * item.attached.size() + 1);
    std::size_t done = 0;
    auto add_own = [&](std::size_t end) {
        if (end > done) parts.push_back({0, shared->data() + done, end - done, shared});
        done = end;
    };
    for (auto& part : item.attached) {
        add_own(part.offset);
        parts.push_back({0, part.data, part.size, std::move(part.owner), part.container, part.reserved});
    }
    add_own(shared->size());
    item.attached = std::move(parts);
}

bool pool_core::submit(work_item* item, bool encoding_failed, bool throw_when_full) {
    if (!encoding_failed && item->arguments.size() >= attach_from) share_arguments(*item);
    bool post_dispatch = false;
    {
        std::lock_guard lock{mutex_};
        if (closed_) throw pool_closed();
        if (broken_) std::rethrow_exception(broken_error_locked());
        if (!encoding_failed && !item->descriptors.empty() && local_workers_ == 0) {
            throw std::invalid_argument("coproc: a task with shared_buffer arguments needs a local worker, and this pool "
                                        "has none (max_workers = 0): descriptors do not cross hosts");
        }
        if (!encoding_failed && options_.max_pending > 0 && queued_.load(std::memory_order_relaxed) >= options_.max_pending) {
            if (throw_when_full) throw queue_full();
            return false;
        }
        item->id = next_id_++;
        item->pool = this;
        if ((item->frame_flags & wire::frame_flag::stream) != 0 && item->stream_window == 0) {
            item->stream_window = options_.stream_window;
        }
        if (!encoding_failed) {
            item->retain();
            pending_.push_back(item);
            queued_.fetch_add(1, std::memory_order_relaxed);
            post_dispatch = !std::exchange(dispatch_posted_, true);
        }
    }
    if (encoding_failed) {
        complete(item, work_state::failed, item->error);
        return true;
    }
    if (item->deadline != std::chrono::steady_clock::time_point{}) start_deadline_timer(item);
    if (post_dispatch) {
        if (loop.is_loop_thread()) {
            // Not shielded: it awaits nothing, so no stop can cut it short.
            loop.spawn(dispatch_soon(weak_from_this()));
        } else {
            loop.post([weak = weak_from_this()] {
                if (auto core = weak.lock()) core->dispatch();
            });
        }
    }
    return true;
}

bool pool_core::cancel(work_item& item, bool force, std::exception_ptr reason, bool kill_after_grace) {
    completion done;
    work_state before;
    {
        std::lock_guard lock{mutex_};
        before = item.state();
        if (is_final(before)) return false;
        if (before == work_state::pending) {
            queued_.fetch_sub(1, std::memory_order_relaxed);
        } else {
            uncount_locked(item); // the worker's late answer or death does not count it again
            // Until the worker answers or dies, it holds a cancelled task.
            item.cancelling = true;
            cancelling_.fetch_add(1, std::memory_order_relaxed);
        }
        if (!reason) {
            reason = std::make_exception_ptr(cancelled_error(before == work_state::pending
                                                                 ? "coproc: the task was cancelled before it ran"
                                                                 : "coproc: the task was cancelled"));
        }
        // A pending item stays in pending_ and is skipped by dispatch(); a
        // dispatched or running one stays in its worker's list until the
        // worker answers.
        finalize_locked(item, work_state::cancelled, std::move(reason), done);
    }
    deliver(done);
    const bool remote = before != work_state::pending;
    const bool kill_now = force && before == work_state::running;
    auto follow_up = [weak = weak_from_this(), id = item.id, serial = item.worker_serial, remote, kill_now, kill_after_grace] {
        auto core = weak.lock();
        if (!core) return;
        if (remote) core->cancel_in_worker(id, serial, kill_now, kill_after_grace);
        core->wake_waiters(); // room in the queue for submit_async
    };
    if (loop.is_loop_thread()) {
        follow_up();
    } else {
        loop.post(std::move(follow_up));
    }
    return true;
}

bool pool_core::await(work_item& item, std::coroutine_handle<> awaiting) {
    std::lock_guard lock{mutex_};
    if (is_final(item.state())) return false;
    if (item.awaiter && item.awaiter != awaiting) {
        throw std::logic_error("coproc: a future is already awaited by another coroutine; one awaiter at a time");
    }
    item.awaiter = awaiting;
    return true;
}

void pool_core::forget(work_item& item, std::coroutine_handle<> awaiting) noexcept {
    std::lock_guard lock{mutex_};
    if (item.awaiter == awaiting) item.awaiter = {};
}

void pool_core::add_callback(work_item& item, std::function<void()> callback) {
    {
        std::lock_guard lock{mutex_};
        if (!is_final(item.state())) {
            item.callbacks.push_back(std::move(callback));
            return;
        }
    }
    callback();
}

void pool_core::set_progress_callback(work_item& item, std::function<void(double)> callback) {
    auto shared = std::make_shared<const std::function<void(double)>>(std::move(callback));
    std::lock_guard lock{mutex_};
    if (!is_final(item.state())) item.progress_callback = std::move(shared);
}

bool pool_core::complete(work_item* item, work_state state, std::exception_ptr error) noexcept {
    completion done;
    {
        std::lock_guard lock{mutex_};
        if (!finalize_locked(*item, state, std::move(error), done)) return false;
    }
    deliver(done);
    return true;
}

bool pool_core::finalize_locked(work_item& item, work_state state, std::exception_ptr error, completion& done) noexcept {
    if (is_final(item.state())) return false;
    item.error = std::move(error);
    done.state = state;
    done.awaiter = std::exchange(item.awaiter, {});
    done.callbacks.swap(item.callbacks);
    done.deadline_stop = std::move(item.deadline_stop);
    // Freed by deliver, outside the mutex: what it holds may be anything.
    done.progress_callback = std::move(item.progress_callback);
    item.arguments = {};
    item.attached = {};
    item.descriptors = {};
    item.set_state(state); // release: publishes value and error
    return true;
}

void pool_core::deliver(completion& done) noexcept {
    switch (done.state) {
    case work_state::finished: completed_.fetch_add(1, std::memory_order_relaxed); break;
    case work_state::failed: failed_.fetch_add(1, std::memory_order_relaxed); break;
    default: cancelled_.fetch_add(1, std::memory_order_relaxed); break;
    }
    if (done.deadline_stop) done.deadline_stop->request_stop();
    // Pairs with the seq_cst increment in wait_work_item: either the waiter
    // sees the final state, or this sees the waiter and notifies it.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (blocked_waiters.load(std::memory_order_relaxed) > 0) {
        // Lock-unlock orders the state change before a waiter's predicate check.
        { std::lock_guard lock{waiters_mutex}; }
        waiters_cv.notify_all();
    }
    if (done.awaiter) schedule_operation{loop}.await_suspend(done.awaiter);
    // Posted, never run inline: a callback may do anything, even destroy the
    // pool, and must not do it in the middle of the pool's own bookkeeping.
    for (auto& callback : done.callbacks) loop.post(std::move(callback));
}

// --- dispatch (loop thread)

// Hands pending tasks to workers and starts workers:
//  - an idle ready worker takes the next task first;
//  - each worker still starting will take one task when it says HELLO, so
//    that many stay pending for it;
//  - only the rest is prefetched, onto the least-loaded ready worker with
//    fewer than `prefetch` tasks, so a short task does not queue behind a
//    long one while another worker could take it;
//  - workers are started while pending tasks outnumber starting workers.
// How many tasks a worker may hold when the next is `item`: prefetch,
// raised towards max_prefetch while tasks of its function are short (about
// 1 ms of queued work). A function never measured gets prefetch.
std::size_t pool_core::depth(const work_item& item) const noexcept {
    const auto found = run_us_.find(item.function_id ^ item.frame_flags);
    if (found == run_us_.end() || found->second <= 0) return options_.prefetch;
    constexpr double queued_work_us = 1000;
    const double wanted = queued_work_us / found->second;
    return static_cast<std::size_t>(std::clamp(wanted, static_cast<double>(options_.prefetch),
                                               static_cast<double>(options_.max_prefetch)));
}

// The depth for `item` now: depth(), but while a worker is starting only
// `prefetch` (tasks measured as short at first must not all go to the ready
// worker, leaving the new one idle when later tasks run longer), and never
// more than an even share of the outstanding tasks per worker.
std::size_t pool_core::prefetch_allowed(const work_item& item, std::size_t starting) const noexcept {
    if (starting > 0) return options_.prefetch;
    const std::size_t outstanding = queued_.load(std::memory_order_relaxed) + in_workers_.load(std::memory_order_relaxed);
    const std::size_t workers = static_cast<std::size_t>(max_workers_);
    const std::size_t share = (outstanding + workers - 1) / workers;
    return std::min(depth(item), std::max<std::size_t>(options_.prefetch, share));
}

void pool_core::dispatch() {
    std::size_t live = 0;
    std::size_t starting = 0;
    std::vector<worker_handle*> ready;
    for (auto& worker : workers_) {
        if (worker->state == worker_handle::phase::exited || worker->reaped) continue;
        ++live;
        if (worker->state == worker_handle::phase::starting || worker->state == worker_handle::phase::initializing) ++starting;
        if (worker->state == worker_handle::phase::ready && !worker->condemned) ready.push_back(worker.get());
    }
    std::size_t demand = 0;
    std::size_t waiting_for_local = 0; // queued shared_buffer tasks passed over for a local worker
    bool closing = false;
    bool broken = false; // set once, on this thread (break_pool): read once here
    {
        std::lock_guard lock{mutex_};
        dispatch_posted_ = false;
        broken = broken_.has_value();
        // Workers that could be started now for queued tasks.
        const bool can_start = !destroyed && !broken && !terminated_ && !spawn_retry_pending_;
        const std::size_t startable = can_start && live < static_cast<std::size_t>(max_workers_)
                                          ? static_cast<std::size_t>(max_workers_) - live
                                          : 0;
        // Takes the item at `next` out of the queue. Nearly always the
        // first: pop_front, which costs about half of a deque's general
        // erase (bench/README.md, "Where they go").
        const auto take = [this](std::deque<work_item*>::iterator at) {
            if (at != pending_.begin()) return pending_.erase(at);
            pending_.pop_front();
            return pending_.begin();
        };
        for (auto next = pending_.begin(); next != pending_.end();) {
            work_item* item = *next;
            if (item->state() != work_state::pending) {
                next = take(next);
                item->release(); // cancelled while queued
                continue;
            }
            worker_handle* target = nullptr;
            // Descriptors (shared_buffer) do not cross hosts: such a task
            // waits for a local worker.
            const bool local_only = !item->descriptors.empty();
            for (worker_handle* worker : ready) {
                if (local_only && worker->remote) continue;
                if (worker->assigned.empty() && worker->state == worker_handle::phase::ready) {
                    target = worker;
                    break;
                }
            }
            // Sent ahead to a busy worker only what the workers starting, and
            // those the pool may still start, will not take: a task never
            // waits behind another while a worker could be started for it.
            if (target == nullptr && queued_.load(std::memory_order_relaxed) > starting + startable) {
                const std::size_t allowed = prefetch_allowed(*item, starting);
                for (worker_handle* worker : ready) {
                    if (worker->state != worker_handle::phase::ready || worker->assigned.size() >= allowed) continue;
                    if (local_only && worker->remote) continue;
                    if (target == nullptr || worker->assigned.size() < target->assigned.size()) target = worker;
                }
            }
            if (target == nullptr) {
                if (!local_only) break; // no worker takes any task now
                // Only the local workers are busy: the tasks behind it may
                // still go to remote ones.
                ++waiting_for_local;
                ++next;
                continue;
            }
            next = take(next);
            queued_.fetch_sub(1, std::memory_order_relaxed);
            in_workers_.fetch_add(1, std::memory_order_relaxed);
            item->in_worker = true;
            item->worker_pid = target->pid;
            item->worker_serial = target->serial;
            item->set_state(work_state::dispatched);
            target->assigned.push_back(item);
            ++target->generation;
            target->queued.add_call(item->id, item->frame_flags, item->function_id, item->arguments, item->attached,
                                    item->descriptors);
            if (item->stream_window > 0) {
                // The window goes with the CALL, in the same send: a stream
                // task starts with room for that many items.
                item->stream_credit = item->stream_window;
                target->queued.add_credit(item->id, item->stream_window);
            }
            if (options_.max_tasks_per_child > 0 && ++target->dispatched_total >= options_.max_tasks_per_child) {
                target->state = worker_handle::phase::retiring;
            }
        }
        demand = queued_.load(std::memory_order_relaxed);
        closing = closed_;
    }
    if (demand == 0) recall_for_idle(ready);
    for (auto& worker : workers_) {
        if (worker->state == worker_handle::phase::exited) continue;
        const bool drained = worker->assigned.empty() && (worker->state == worker_handle::phase::retiring ||
                                                          (closing && demand == 0 && worker->state == worker_handle::phase::ready));
        if (drained && !worker->bye_sent) send_bye(*worker);
        if (!worker->queued.empty() && !worker->writing) start_writer(*worker);
        if (options_.idle_timeout.count() > 0 && worker->state == worker_handle::phase::ready && !worker->reaped &&
            !worker->condemned && worker->assigned.empty() && !worker->idle_timer && !destroyed) {
            start_idle_timer(*worker);
        }
    }
    // With every local worker started, the next would be remote: only for
    // the tasks a remote worker can take.
    const auto local_full = [this] { return local_workers_live() >= static_cast<std::size_t>(local_workers_); };
    while (demand > starting && live < static_cast<std::size_t>(max_workers_) && !destroyed && !broken &&
           !terminated_ && !spawn_retry_pending_) {
        if (waiting_for_local > 0 && demand - waiting_for_local <= starting && local_full()) break;
        try {
            spawn_worker();
        } catch (const std::system_error& e) {
            spawn_failed(e, live);
            break;
        } catch (const std::exception& e) {
            break_pool(e.what());
            break;
        }
        spawn_backoff_ = std::chrono::milliseconds{0};
        ++live;
        ++starting;
    }
    // Every change a shutdown or submit_async waits for (a task answered,
    // a worker gone, the queue moved) ends in a dispatch: wake them here
    // rather than at each such place, so that none is ever missed.
    if (!waiters_.empty()) wake_waiters();
}

// Work moves to the worker that is free: a task sent ahead to a busy worker
// and not started there goes to an idle one. For each idle worker, the
// worker holding the most such tasks is asked to give back half of them
// (at least one), newest first; its first task is left alone (it runs, or
// is about to). The worker answers RECALLED for each one it gives back
// unrun, and take_back queues it again, at the front; one it has started
// already runs there as usual. So a task is never run twice nor lost.
void pool_core::recall_for_idle(const std::vector<worker_handle*>& ready) {
    for (worker_handle* idle : ready) {
        if (!idle->assigned.empty() || idle->state != worker_handle::phase::ready || idle->condemned) continue;
        worker_handle* donor = nullptr;
        std::size_t most = 0;
        for (worker_handle* worker : ready) {
            if (worker == idle || worker->state != worker_handle::phase::ready || worker->condemned) continue;
            std::size_t unstarted = 0;
            for (std::size_t i = 1; i < worker->assigned.size(); ++i) {
                const work_item* item = worker->assigned[i];
                unstarted += item->state() == work_state::dispatched && !item->recalling;
            }
            if (unstarted > most) {
                most = unstarted;
                donor = worker;
            }
        }
        if (donor == nullptr) return; // nothing anywhere to take back
        std::size_t wanted = std::max<std::size_t>(1, most / 2);
        for (std::size_t i = donor->assigned.size(); i-- > 1 && wanted > 0;) {
            work_item* item = donor->assigned[i];
            if (item->state() != work_state::dispatched || item->recalling) continue;
            item->recalling = true;
            donor->queued.add_frame(wire::frame_kind::recall, item->id);
            --wanted;
        }
        if (!donor->writing) start_writer(*donor);
    }
}

void pool_core::take_back(work_item* item) {
    item->recalling = false;
    {
        std::lock_guard lock{mutex_};
        uncount_locked(*item);
        if (!is_final(item->state())) {
            // Unrun: a requeue that costs the task nothing (not counted in
            // item->requeues, which bounds deaths before START).
            item->set_state(work_state::pending);
            pending_.push_front(item); // keeps its reference
            queued_.fetch_add(1, std::memory_order_relaxed);
            moved_.fetch_add(1, std::memory_order_relaxed);
            item = nullptr;
        }
    }
    if (item != nullptr) item->release(); // cancelled meanwhile
    dispatch();
}

std::exception_ptr pool_core::broken_error_locked() const {
    if (!broken_) return nullptr;
    return std::make_exception_ptr(broken_process_pool(broken_->first, broken_->second));
}

std::exception_ptr pool_core::broken_error() const {
    std::lock_guard lock{mutex_};
    return broken_error_locked();
}

void pool_core::break_pool(std::string message, std::exception_ptr cause) {
    {
        std::lock_guard lock{mutex_};
        if (broken_) return;
        broken_.emplace(std::move(message), std::move(cause));
    }
    // Said where a user looks, as CPython logs a failed initializer and a
    // broken pool, even when no future is awaited.
    std::fprintf(stderr, "%s\n", broken_->first.c_str());
    end_all_pending(work_state::failed, [this] { return broken_error_locked(); });
    for (auto& worker : workers_) kill_worker(*worker, "nothing: the pool broke");
    wake_waiters();
}

void pool_core::end_all_pending(work_state state, const std::function<std::exception_ptr()>& make_error) noexcept {
    std::deque<work_item*> pending;
    std::vector<completion> done;
    {
        // One critical section decides and records every transition, so a
        // concurrent cancel() from another thread cannot also count one.
        std::lock_guard lock{mutex_};
        pending.swap(pending_);
        done.reserve(pending.size());
        for (work_item* item : pending) {
            if (item->state() != work_state::pending) continue;
            queued_.fetch_sub(1, std::memory_order_relaxed);
            std::exception_ptr error;
            try {
                error = make_error(); // under the mutex: it may not take it
            } catch (...) {
                error = std::current_exception(); // out of memory: that is the error then
            }
            finalize_locked(*item, state, std::move(error), done.emplace_back());
        }
    }
    for (auto& completion : done) deliver(completion);
    for (work_item* item : pending) item->release();
}

void pool_core::spawn_failed(const std::system_error& failure, std::size_t live, const std::string& why) {
    const int code = failure.code().value();
    const std::string account = std::string(failure.what()) + ": " + (why.empty() ? describe_shortage(code) : why);
    if (live == 0) {
        // No worker alive or starting: nothing can run the queued tasks, so
        // they fail now rather than wait for a limit that may never lift.
        // The pool is not broken: later submits try again.
        end_all_pending(work_state::failed, [&] {
            return std::make_exception_ptr(worker_start_failed(
                code, "coproc: no worker could be started to run this task (" + account +
                          "); the pool has no worker alive and tries again at the next submit"));
        });
    }
    // Serve with the workers there are; try again later, sooner at first.
    spawn_backoff_ = std::clamp(spawn_backoff_ * 2, std::chrono::milliseconds{10}, std::chrono::milliseconds{1000});
    start_spawn_retry();
}

void pool_core::start_spawn_retry() {
    if (spawn_retry_pending_ || destroyed) return;
    spawn_retry_pending_ = true;
    loop.spawn(shielded(spawn_retry(shared_from_this(), spawn_backoff_, lifetime_stop_.get_token())));
}

void pool_core::spawn_retry_fired() {
    spawn_retry_pending_ = false;
    dispatch();
}

// --- a worker's exit: what it means for the pool and for its tasks (loop thread)

void pool_core::on_worker_exit(worker_handle& worker) {
    worker.lifetime_stop.request_stop();
    const ::siginfo_t& info = worker.exit_info;
    const bool was_initializing = worker.state == worker_handle::phase::initializing;
    const bool was_starting = worker.state == worker_handle::phase::starting || was_initializing;
    const bool expected = worker.bye_sent && worker.assigned.empty() && worker.kill_reason.empty();
    worker.state = worker_handle::phase::exited;
    workers_alive_.fetch_sub(1, std::memory_order_relaxed);

    const int signal = info.si_code == CLD_EXITED ? 0 : info.si_status;
    const int exit_code = info.si_code == CLD_EXITED ? info.si_status : -1;
    std::string how = worker.kill_reason.empty() ? describe_exit(info)
                                                 : "sent " + worker.kill_reason + " and was killed by the pool";
    if (!worker.exit_reason.empty()) how = worker.exit_reason; // a remote worker that never ran, or lost its host
    // Its pid, and for a remote worker its host: pids are per host.
    const std::string name = std::to_string(worker.pid) + (worker.remote ? " on " + worker.host : "");

    // First what the exit means for the pool; then what it means for the
    // tasks the worker held.
    bool broken;
    {
        std::lock_guard lock{mutex_};
        broken = broken_.has_value();
    }
    if (!broken && !terminated_ && was_starting) {
        // Only a worker that failed by itself (or was killed by the pool for
        // not saying HELLO) proves the program unable to start; one killed
        // from outside (an operator, the OOM killer) costs a start, not the
        // pool.
        const bool own_failure = !worker.start_shortage && !worker.host_lost &&
                                 (!worker.kill_reason.empty() || !worker.exit_reason.empty() || failed_by_itself(info));
        if (own_failure && ++startup_failures_ >= startup_failures_allowed) {
            std::string message;
            if (was_initializing) {
                message = "coproc: " + std::to_string(startup_failures_) + " workers died while running the pool's initializer " +
                          std::string(options_.initializer.function_name) + " (the last one " + how + ")";
            } else if (!worker.kill_reason.empty() || info.si_code == CLD_EXITED) {
                message = "coproc: " + std::to_string(startup_failures_) + " workers of '" + executable_ +
                          "' did not say HELLO (the last one " + how +
                          "); does the worker program call coproc::run_worker_if_requested at the top of main?";
            } else {
                message = "coproc: " + std::to_string(startup_failures_) + " workers of '" + executable_ +
                          "' crashed before saying HELLO (the last one " + how + "); the worker program fails at start-up";
            }
            break_pool(std::move(message));
            broken = true;
        }
    } else if (!broken && !terminated_ && !expected && options_.on_worker_crash == crash_policy::break_pool &&
               (worker.kill_reason.empty() || worker.violated)) {
        // CPython's behaviour. A worker the pool killed on purpose (a
        // cancelled task past its grace) did not crash.
        break_pool("coproc: worker " + name + " " + how +
                   "; the pool is broken (crash_policy::break_pool)");
        broken = true;
    }

    std::deque<work_item*> requeue;
    for (work_item* item : worker.assigned) {
        {
            std::lock_guard lock{mutex_};
            uncount_locked(*item);
        }
        if (is_final(item->state())) {
            item->release(); // cancelled while here
            continue;
        }
        // START seen, or the start word says it was running: a worker may
        // die running a task whose START it had not sent yet. A worker lost
        // with its host may have started any task it was sent: its START can
        // be lost on the way with the host's agent, so none runs again.
        const bool started = item->state() != work_state::dispatched || worker.started(item->id) || worker.host_lost;
        if (broken) {
            complete(item, work_state::failed, broken_error());
            item->release();
            continue;
        }
        if (terminated_ && !started) {
            complete(item, work_state::cancelled,
                     std::make_exception_ptr(cancelled_error(
                         "coproc: cancelled unrun by terminate_workers() or kill_workers()")));
            item->release();
            continue;
        }
        if (!started && !worker.violated && item->requeues < max_requeues && !item->arguments_taken) {
            // Sent but never started (no START frame before EOF, and every
            // frame was read): it did not run, so it goes back to the queue.
            // Capped, so that a task no worker can even start fails in the end.
            ++item->requeues;
            requeue.push_back(item); // keeps its reference
            continue;
        }
        if (item->retries_left > 0 && !item->arguments_taken && !terminated_) {
            --item->retries_left;
            requeue.push_back(item);
            continue;
        }
        const std::string function{item->function_name};
        std::string account = "coproc: worker " + name + " running " + function + " " + how;
        if (!started && !worker.violated) {
            account = "coproc: " + function + " was sent to " + std::to_string(item->requeues + 1) +
                      " workers that each died before starting it, and never ran (the last, " +
                      name + ", " + how + ")";
        }
        complete(item, work_state::failed,
                 std::make_exception_ptr(worker_died(worker.pid, signal, exit_code, function, account)));
        item->release();
    }
    worker.assigned.clear();

    if (!requeue.empty()) {
        std::lock_guard lock{mutex_};
        for (auto it = requeue.rbegin(); it != requeue.rend(); ++it) {
            if (is_final((*it)->state())) {
                (*it)->release(); // cancelled from another thread meanwhile
                continue;
            }
            (*it)->set_state(work_state::pending);
            pending_.push_front(*it);
            queued_.fetch_add(1, std::memory_order_relaxed);
        }
    }
    wake_waiters();
    dispatch();
}

// --- shutdown support (loop thread)

void pool_core::close(bool cancel_pending) {
    {
        std::lock_guard lock{mutex_};
        closed_ = true;
    }
    if (cancel_pending) {
        end_all_pending(work_state::cancelled,
                        [] { return std::make_exception_ptr(cancelled_error("coproc: cancelled by shutdown(cancel_futures)")); });
    }
    dispatch();
}

bool pool_core::idle() const {
    return queued_.load(std::memory_order_relaxed) == 0 && in_workers_.load(std::memory_order_relaxed) == 0;
}

bool pool_core::no_workers() const { return workers_.empty(); }

void pool_core::wake_waiters() {
    auto waiting = std::move(waiters_);
    waiters_.clear();
    for (auto& waiter : waiting) waiter->wake();
}

} // namespace coproc::detail

// coproc/detail/work_item.hpp - the shared state of one submitted task.
//
// States (DESIGN.md):
//
//   pending ----> dispatched ----> running ----> finished | failed
//      |              |               |
//      +--------------+---------------+--------> cancelled
//
// pending: queued in the parent. dispatched: its CALL frame went to a worker.
// running: the worker said START. The last three are final.
//
// Threads: the pool's loop thread makes every transition, except cancelling
// a pending item, which any thread may do; both hold the pool's mutex.
// `state` is written last, with release order, after the value or error;
// whoever reads a final state with acquire order may then read them without
// the mutex. Once final, an item never touches its pool again, so futures
// may outlive the pool. An item made final from the start
// (make_ready_future, make_exceptional_future) has no pool at all: `pool`
// is null, and every function below checks the state before the pool.
#pragma once

#include <coproc/detail/serialization.hpp>
#include <coproc/shared_buffer.hpp>

#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <stop_token>
#include <string_view>
#include <vector>

namespace coproc::detail {

class pool_core;

enum class work_state : std::uint8_t { pending, dispatched, running, finished, failed, cancelled };

constexpr bool is_final(work_state state) noexcept { return state >= work_state::finished; }

// The items a stream task sent and its consumer has not taken, oldest
// first. Nothing is allocated before the first item: a std::deque allocates
// its first block (over 500 bytes) when constructed, which every queued
// future, streamed or not, would pay.
class stream_queue {
public:
    [[nodiscard]] bool empty() const noexcept { return head_ == items_.size(); }
    void push_back(byte_buffer item) { items_.push_back(std::move(item)); }
    [[nodiscard]] byte_buffer& front() noexcept { return items_[head_]; }
    [[nodiscard]] std::size_t capacity() const noexcept { return items_.capacity(); } // slots held, taken ones included
    void pop_front() noexcept {
        items_[head_] = byte_buffer{};
        ++head_;
        if (head_ == items_.size()) {
            items_.clear();
            head_ = 0;
        } else if (head_ >= 64 && head_ * 2 >= items_.size()) {
            // A consumer that never quite catches up: drop the taken slots
            // rather than grow for ever.
            items_.erase(items_.begin(), items_.begin() + static_cast<std::ptrdiff_t>(head_));
            head_ = 0;
        }
    }

private:
    std::vector<byte_buffer> items_;
    std::size_t head_ = 0;
};

class work_item {
public:
    work_item() = default;
    work_item(const work_item&) = delete;
    work_item& operator=(const work_item&) = delete;
    virtual ~work_item() = default;

    // Decodes a RESULT payload into the typed value; throws on bad bytes.
    virtual void store_result(std::span<const std::byte> payload) = 0;
    // A large RESULT received straight into the value: when the result is
    // one block container (serialization.hpp) whose elements fill the
    // `payload_size` bytes of payload that begin with `start` (at least its
    // count), makes the value that size and returns where its elements go;
    // otherwise returns an empty span and leaves the value alone. `spares`
    // are containers of the result's type (block_result_tag()) that this
    // task's arguments no longer need: the value takes the memory of the
    // first one reuse_block accepts.
    virtual std::span<std::byte> prepare_block_result(std::span<const std::byte> start, std::size_t payload_size,
                                                      std::vector<spare_block> spares) {
        (void)start;
        (void)payload_size;
        (void)spares;
        return {};
    }
    // type_tag<T> when the result T is one block container; otherwise null.
    [[nodiscard]] virtual const void* block_result_tag() const noexcept { return nullptr; }

    void retain() noexcept { references_.fetch_add(1, std::memory_order_relaxed); }
    // The last release deletes. acq_rel: every use of the item by other
    // holders happens before the deletion.
    void release() noexcept {
        if (references_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
    }

    [[nodiscard]] work_state state() const noexcept { return state_.load(std::memory_order_acquire); }
    void set_state(work_state state) noexcept { state_.store(state, std::memory_order_release); }

    // Fixed at submit.
    std::uint64_t id = 0;
    std::uint64_t function_id = 0;
    std::uint16_t frame_flags = 0; // wire::frame_flag bits of its CALL frame
    std::string_view function_name;
    // Encoded, and freed once the task is final: `arguments`, with the
    // `attached` parts spliced in at their offsets. Moved-in block
    // containers are attached as they are, and large encodings are turned
    // into attached parts at submit, so a worker's outbox shares them
    // instead of copying them.
    byte_buffer arguments;
    std::vector<attached_bytes> attached;
    // The shared buffers among the arguments (coproc/shared_buffer.hpp), in
    // slot order: their descriptors go with each CALL frame sent. Freed
    // with the arguments.
    shared_descriptors descriptors;
    pool_core* pool = nullptr;        // its pool; not used once the item is final; null for a ready future
    unsigned retries_left = 0;
    unsigned requeues = 0; // sent to a worker that died before starting it
    bool in_worker = false; // counted in stats().tasks_running (pool mutex)
    // Cancelled while in a worker that has not answered for it yet: counted
    // in stats().tasks_cancelling (pool mutex).
    bool cancelling = false;
    // A RECALL was sent for it (dispatched, not started): the worker gives it
    // back unrun (RECALLED) or has started it (loop thread).
    bool recalling = false;
    // Attached arguments were taken for the result (take_sent_blocks): the
    // CALL can never be sent again (loop thread).
    bool arguments_taken = false;
    std::chrono::steady_clock::time_point started{}; // when its START arrived (loop thread)
    // submit_options::timeout, as a time point; zero: none.
    std::chrono::steady_clock::time_point deadline{};

    // Guarded by the pool's mutex until the state is final.
    std::exception_ptr error;
    std::coroutine_handle<> awaiter{};
    std::vector<std::function<void()>> callbacks;
    int worker_pid = 0;
    std::uint64_t worker_serial = 0; // the pool's number for that worker (worker_process::serial)
    // Present when the item has a deadline: stopped when the item ends, so
    // that its deadline timer lets go of it at once.
    std::optional<std::stop_source> deadline_stop;
    // future::on_progress: called (posted to the loop) for each PROGRESS.
    std::shared_ptr<const std::function<void(double)>> progress_callback;

    // report_progress in the worker (PROGRESS frames): the latest value and
    // how many reports arrived. Written on the loop thread only, the value
    // first (relaxed), then the count (release): a reader that loads the
    // count with acquire and sees it non-zero reads a value at least as
    // recent as that report; both are atomic, so never a torn double.
    std::atomic<double> progress{0.0};
    std::atomic<std::uint64_t> progress_reports{0};

    // A stream (submit_stream): ITEMs in flight at most; 0 for any other
    // task. Fixed at submit.
    std::uint32_t stream_window = 0;
    // ITEMs the worker may still send: the window at dispatch, one less per
    // ITEM received, more with each CREDIT sent (loop thread).
    std::uint32_t stream_credit = 0;
    // The ITEMs received and not yet taken by the consumer, still encoded
    // (pool mutex until final; dropped by cancel()).
    stream_queue stream_items;
    // Items taken since the last CREDIT was sent (pool mutex).
    std::uint32_t stream_taken = 0;
    // The consumer cancelled: the items not taken are never yielded.
    std::atomic<bool> stream_dropped{false};

private:
    std::atomic<std::uint32_t> references_{1};
    std::atomic<work_state> state_{work_state::pending};
};

template <class T>
class typed_work_item final : public work_item {
public:
    void store_result(std::span<const std::byte> payload) override {
        T decoded{};
        decode_from(payload, decoded);
        value.emplace(std::move(decoded));
    }
    std::span<std::byte> prepare_block_result(std::span<const std::byte> start, std::size_t payload_size,
                                              std::vector<spare_block> spares) override {
        if constexpr (block_container<T>::value) {
            wire_count count = 0;
            if (start.size() < sizeof count || payload_size < sizeof count) return {};
            std::memcpy(&count, start.data(), sizeof count);
            if (!block_fills<T>(count, payload_size - sizeof count)) return {};
            T& block = value.emplace();
            for (auto& spare : spares) {
                if (reuse_block(block, spare, static_cast<std::size_t>(count))) break;
            }
            return size_block(block, static_cast<std::size_t>(count));
        } else {
            return work_item::prepare_block_result(start, payload_size, std::move(spares));
        }
    }
    [[nodiscard]] const void* block_result_tag() const noexcept override {
        if constexpr (block_container<T>::value) {
            return &type_tag<T>;
        } else {
            return nullptr;
        }
    }
    std::optional<T> value;
};

template <>
class typed_work_item<void> final : public work_item {
public:
    void store_result(std::span<const std::byte>) override {}
};

// The last progress report of `item` that reached the parent, or nothing
// before the first (future::latest_progress, stream::latest_progress).
inline std::optional<double> latest_progress_of(const work_item& item) noexcept {
    // acquire: pairs with the release increment made after the value was
    // stored (work_item::progress_reports).
    if (item.progress_reports.load(std::memory_order_acquire) == 0) return std::nullopt;
    return item.progress.load(std::memory_order_relaxed);
}

// --- called by future<T> (src/process_pool.cpp)

// Registers `awaiting` to be resumed on the pool's loop when `item` is
// final; false when it already is (then nothing is registered). Throws
// std::logic_error when another coroutine already awaits the item.
bool await_work_item(work_item& item, std::coroutine_handle<> awaiting);
// Unregisters `awaiting` (its coroutine is being destroyed unresumed).
void forget_awaiter(work_item& item, std::coroutine_handle<> awaiting) noexcept;
// Cancels the item in any state but a final one: a pending item never runs;
// a dispatched or running one ends cancelled at once while its worker is
// told to stop it (and killed if it does not stop within the grace period,
// or at once with `force`; never, without `kill_after_grace`). False when
// the item is already final.
bool cancel_work_item(work_item& item, bool force = false, bool kill_after_grace = true);
// Adds a callback run on the pool's loop thread when the item is final, or
// runs it at once when it already is. The callback must not throw
// (future::add_done_callback wraps the user's in one that reports).
void add_work_item_callback(work_item& item, std::function<void()> callback);
// Sets the function called on the pool's loop thread with each progress
// report of `item` from now on (replacing any set before); nothing for an
// item that is final or has no pool.
void set_work_item_progress_callback(work_item& item, std::function<void(double)> callback);
// Reports `error`, which escaped a done callback of `item`, without throwing:
// to the unhandled-exception handler of the loop the calling thread runs
// (posted to it), or to stderr on a thread that runs no loop.
void report_callback_error(const work_item& item, std::exception_ptr error) noexcept;
// --- called by stream<T> (src/pool_stream.cpp)

// Registers `awaiting` to be resumed on the pool's loop when the stream
// `item` has an item to take or is final; false when it has one or is
// final already (then nothing is registered). Throws std::logic_error
// when another coroutine already awaits the item.
bool await_stream_item(work_item& item, std::coroutine_handle<> awaiting);
// The oldest item received and not yet taken, or nothing; grants the
// worker credit for more as items are taken.
std::optional<byte_buffer> take_stream_item(work_item& item);
// Drops the items received and not yet taken (the consumer cancelled): the
// next take_stream_item finds none. Any thread.
void drop_stream_items(work_item& item) noexcept;

// Blocks the calling thread (never the loop's) until the item is final or
// `timeout` passes; false on timeout. A negative timeout waits for ever.
bool wait_work_item(work_item& item, std::chrono::nanoseconds timeout);

} // namespace coproc::detail

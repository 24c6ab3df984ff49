// coproc/stream.hpp - coproc::stream<T>, the items of a stream task
// (process_pool::submit_stream), received while the task runs.
//
//     void tiles(std::string path, coproc::sink<tile>& out);   // runs in a worker
//
//     auto s = pool.submit_stream<tiles>(path);               // in the parent
//     while (std::optional<tile> t = co_await s.next()) show(*t);
//
// Items arrive as the task pushes them, in order. Flow control: the worker
// may run ahead of the consumer by the stream's window
// (submit_options::stream_window, by default process_pool_options::
// stream_window) and no further; its next push blocks until the consumer
// takes an item. next() yields each item received, then std::nullopt when
// the task returned, or rethrows why it ended otherwise: the task's
// exception, worker_died (its worker crashed: after the items it sent
// before), timeout_error (its submit timeout), cancelled_error.
//
// Destroying a stream that has not ended, or cancel(), cancels its task as
// future::cancel does: its std::stop_token is stopped (a push blocked on the
// window throws cancelled_error), and its worker is killed if it has not
// returned within process_pool_options::cancel_grace. The items received and
// not taken are dropped then. A stream whose task has started is never run
// again after its worker died (its items were received): submit_options::
// max_retries applies only until the first item arrives.
//
// Like a future, a stream is move-only, awaited by one coroutine at a time,
// resumed on the pool's loop thread, and may outlive the pool (its task
// ends cancelled with the pool). A stop of the coroutine awaiting next()
// (with_timeout, when_any, ...) cancels the stream.
#pragma once

#include <coproc/detail/promise_base.hpp>
#include <coproc/detail/work_item.hpp>
#include <coproc/error.hpp>
#include <coproc/future.hpp>

#include <coroutine>
#include <cstdint>
#include <exception>
#include <functional>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <utility>

namespace coproc {

template <class T>
class [[nodiscard]] stream {
public:
    using value_type = T;

    // An empty stream: valid() is false, and every other member throws
    // std::logic_error.
    stream() noexcept = default;
    // Takes over the task's state (made by process_pool::submit_stream; not
    // for users).
    explicit stream(future<void> task) : item_(&detail::future_access::item(task)) { item_->retain(); }
    stream(stream&& other) noexcept : item_(std::exchange(other.item_, nullptr)) {}
    stream& operator=(stream&& other) noexcept {
        if (this != &other) {
            reset();
            item_ = std::exchange(other.item_, nullptr);
        }
        return *this;
    }
    stream(const stream&) = delete;
    stream& operator=(const stream&) = delete;
    // Cancels the task unless it has ended (see above).
    ~stream() { reset(); }

    [[nodiscard]] bool valid() const noexcept { return item_ != nullptr; }
    // The task's id in its pool.
    [[nodiscard]] std::uint64_t id() const { return checked().id; }

    // The next item: suspends until one arrives or the task ends, resuming
    // on the pool's loop thread. Yields the item, or std::nullopt once the
    // task returned and every item was taken (and at every call after), or
    // rethrows why the task ended otherwise, once every item received
    // before was taken. Throws what decoding an item throws (that item is
    // lost; the stream goes on).
    auto next() { return next_awaiter{&checked()}; }

    // Cancels the task, as future::cancel does, and drops the items not yet
    // taken: next() throws cancelled_error from now on. False when the task
    // had ended already (its items stay). Thread-safe.
    bool cancel(bool force = false) {
        auto& item = checked();
        const bool cancelled = detail::cancel_work_item(item, force);
        if (cancelled) detail::drop_stream_items(item);
        return cancelled;
    }
    // As cancel(), except that a running task is only asked to stop
    // (future::request_stop): its worker is never killed for it.
    bool request_stop() {
        auto& item = checked();
        const bool cancelled = detail::cancel_work_item(item, false, false);
        if (cancelled) detail::drop_stream_items(item);
        return cancelled;
    }

    // True once the task ended (items may still wait to be taken).
    [[nodiscard]] bool done() const { return detail::is_final(checked().state()); }
    // True while a worker runs the task (it said START, or sent an item).
    [[nodiscard]] bool running() const { return checked().state() == detail::work_state::running; }
    // The task's progress reports, as for a future (coproc/progress.hpp).
    [[nodiscard]] std::optional<double> latest_progress() const { return detail::latest_progress_of(checked()); }
    void on_progress(std::function<void(double)> callback) {
        detail::set_work_item_progress_callback(checked(), std::move(callback));
    }

private:
    // Cancels the stream when the awaiter's stop token is stopped.
    struct cancel_stream {
        detail::work_item* item;
        void operator()() const noexcept {
            try {
                if (detail::cancel_work_item(*item)) detail::drop_stream_items(*item);
            } catch (...) {
                // Out of memory while queueing the cancellation: the task runs on.
            }
        }
    };

    struct next_awaiter {
        detail::work_item* item;
        std::optional<std::stop_callback<cancel_stream>> on_stop{};
        std::coroutine_handle<> registered{}; // set while the item holds our handle

        next_awaiter(detail::work_item* work) noexcept : item(work) {}
        next_awaiter(next_awaiter&& other) noexcept : item(other.item) {}
        // A coroutine destroyed while suspended here must not stay
        // registered with a task that may still send items.
        ~next_awaiter() {
            on_stop.reset();
            if (registered) detail::forget_awaiter(*item, registered);
        }

        bool await_ready() const noexcept { return false; }
        template <class P>
        bool await_suspend(std::coroutine_handle<P> awaiting) {
            std::stop_token token = detail::stop_token_of(awaiting);
            if (token.stop_requested()) {
                cancel_stream{item}();
                return false;
            }
            if (!detail::await_stream_item(*item, awaiting)) return false;
            registered = awaiting;
            // Registered after the awaiter: a stop requested meanwhile runs
            // the callback at once, which cancels and so resumes it.
            if (token.stop_possible()) on_stop.emplace(std::move(token), cancel_stream{item});
            return true;
        }
        std::optional<T> await_resume() {
            on_stop.reset();
            registered = {};
            if (std::optional<detail::byte_buffer> encoded = detail::take_stream_item(*item)) {
                T value{};
                detail::decode_from(*encoded, value);
                return value;
            }
            // Nothing left: await_stream_item found the task final.
            if (item->error) std::rethrow_exception(item->error);
            return std::nullopt;
        }
    };

    detail::work_item& checked() const {
        if (item_ == nullptr) throw std::logic_error("coproc: use of an empty (moved-from) stream");
        return *item_;
    }

    void reset() noexcept {
        if (item_ == nullptr) return;
        detail::work_item* item = std::exchange(item_, nullptr);
        if (!detail::is_final(item->state())) {
            try {
                if (detail::cancel_work_item(*item)) detail::drop_stream_items(*item);
            } catch (...) {
                // Out of memory while queueing the cancellation: the task runs on.
            }
        }
        item->release();
    }

    detail::work_item* item_ = nullptr;
};

} // namespace coproc

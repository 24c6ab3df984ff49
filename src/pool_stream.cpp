// The items of stream tasks (process_pool::submit_stream, coproc/stream.hpp),
// on the parent's side:
//
//   dispatch: CALL, then CREDIT(window) --------------------------> worker
//   ITEM (read_worker, loop thread) --deliver_stream_item--> item.stream_items, consumer woken
//   consumer: next() --take_stream_item--> oldest item; every window/2 taken:
//             CREDIT(taken) ---------------------------------------> worker
//   RESULT or ERROR: the task is final; next() yields what is left, then ends
//
// The worker sends an ITEM only against credit, so the items held here for
// a stream never exceed its window; an ITEM beyond it is a protocol
// violation (worker_connection.cpp). Items are kept encoded and decoded by
// the consumer, on its thread, as it takes them.
//
// item.stream_items and item.stream_taken are guarded by the pool's mutex;
// stream_credit and the worker's outbox belong to the loop thread.

#include "pool_core.hpp"

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <utility>

namespace coproc::detail {

void pool_core::deliver_stream_item(work_item& item, std::span<const std::byte> payload) {
    byte_buffer encoded;
    encoded.append(payload.data(), payload.size());
    std::coroutine_handle<> awaiter;
    {
        std::lock_guard lock{mutex_};
        if (is_final(item.state())) return; // cancelled meanwhile: dropped
        item.stream_items.push_back(std::move(encoded));
        awaiter = std::exchange(item.awaiter, {});
    }
    if (awaiter) schedule_operation{loop}.await_suspend(awaiter);
}

bool pool_core::await_stream(work_item& item, std::coroutine_handle<> awaiting) {
    std::lock_guard lock{mutex_};
    if (!item.stream_items.empty() || is_final(item.state())) return false;
    if (item.awaiter && item.awaiter != awaiting) {
        throw std::logic_error("coproc: a stream is already awaited by another coroutine; one awaiter at a time");
    }
    item.awaiter = awaiting;
    return true;
}

std::optional<byte_buffer> pool_core::take_stream_item(work_item& item) {
    std::optional<byte_buffer> taken;
    std::uint32_t grant = 0;
    {
        std::lock_guard lock{mutex_};
        if (item.stream_items.empty()) return taken;
        taken.emplace(std::move(item.stream_items.front()));
        item.stream_items.pop_front();
        // Credit in batches of half the window, so that a fast consumer
        // does not cost a frame per item, and a worker blocked on a full
        // window is let go before the consumer runs out.
        const std::uint32_t batch = std::max<std::uint32_t>(1, item.stream_window / 2);
        if (!is_final(item.state()) && ++item.stream_taken >= batch) grant = std::exchange(item.stream_taken, 0);
    }
    if (grant == 0) return taken;
    if (loop.is_loop_thread()) {
        send_credit(item, grant);
    } else {
        item.retain();
        const std::shared_ptr<work_item> held{&item, [](work_item* kept) { kept->release(); }};
        loop.post([weak = weak_from_this(), held, grant] {
            if (auto core = weak.lock()) core->send_credit(*held, grant);
        });
    }
    return taken;
}

void pool_core::send_credit(work_item& item, std::uint32_t items) {
    if (destroyed || is_final(item.state())) return;
    for (auto& worker : workers_) {
        if (worker->serial != item.worker_serial || worker->state == worker_handle::phase::exited) continue;
        if (std::find(worker->assigned.begin(), worker->assigned.end(), &item) == worker->assigned.end()) return;
        item.stream_credit += items;
        worker->queued.add_credit(item.id, items);
        if (!worker->writing) start_writer(*worker);
        return;
    }
}

// --- called by stream<T>

bool await_stream_item(work_item& item, std::coroutine_handle<> awaiting) {
    if (is_final(item.state())) {
        // No item can arrive any more: none to wait for, whatever is left.
        return false;
    }
    return item.pool->await_stream(item, awaiting);
}

std::optional<byte_buffer> take_stream_item(work_item& item) {
    if (item.stream_dropped.load(std::memory_order_acquire)) return std::nullopt;
    if (is_final(item.state())) {
        // Final: nothing touches the items but their consumer.
        std::optional<byte_buffer> taken;
        if (item.stream_items.empty()) return taken;
        taken.emplace(std::move(item.stream_items.front()));
        item.stream_items.pop_front();
        return taken;
    }
    return item.pool->take_stream_item(item);
}

void drop_stream_items(work_item& item) noexcept {
    // A flag, not a clear: any thread may cancel while the consumer takes.
    // The items go with the item.
    item.stream_dropped.store(true, std::memory_order_release);
}

} // namespace coproc::detail

// One worker's connection: frames over its socket. This step of DESIGN.md's
// data flow:
//
//  event loop                                                                workers
//  ----------                                                                -------
//  worker connection: CALL frames out, in batches  ------------->  socketpair
//  multishot recv, frames parsed, in-place receive <-- START/RESULT/ERROR
//
//   read_worker   recv into a buffer, parse frames, complete tasks
//   write_worker  started when frames are queued and none is being sent,
//                 unless start_writer could send them at once: sends
//                 everything queued, in batches
//
// Out: CALL (dispatch, and the initializer's after HELLO), CANCEL
// (cancel_in_worker), BYE (send_bye), queued in the worker's outbox. In:
// HELLO, START, RESULT (a partial one of a map chunk; a large one received
// in place, into the future's value), ERROR, RECALLED, PROGRESS (the
// future's latest_progress and on_progress callback), ITEM (a stream's,
// pool_stream.cpp). Anything else is a protocol_violation, which kills the
// worker.

#include "worker_connection.hpp"
#include "descriptor_passing.hpp"
#include "pool_core.hpp"

#include <coproc/with_timeout.hpp>
#include <coproc/detail/wire.hpp>

#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>

namespace coproc::detail {

namespace {

namespace wire = detail::wire;

class protocol_violation : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// Descriptors taken for one frame: those its value did not take over are
// closed.
struct received_descriptors {
    std::vector<int> fds;
    received_descriptors() = default;
    received_descriptors(const received_descriptors&) = delete;
    received_descriptors& operator=(const received_descriptors&) = delete;
    ~received_descriptors() {
        for (const int fd : fds) {
            if (fd >= 0) ::close(fd);
        }
    }
};

// One recvmsg's message: the bytes of the worker's frames, and the
// descriptors that come with them (shared buffers), which collect() adds to
// the worker's queue, in order.
struct frame_receiver {
    ::iovec part{};
    ::msghdr message{};
    descriptor_control control;

    ::msghdr* prepare(std::span<std::byte> into) noexcept {
        part = {into.data(), into.size()};
        message = {};
        message.msg_iov = &part;
        message.msg_iovlen = 1;
        prepare_receive(message, control);
        return &message;
    }

    void collect(worker_handle& worker) {
        if (!collect_descriptors(message, worker.received_descriptors)) {
            throw protocol_violation("more descriptors in one message than the kernel passes at once");
        }
    }
};

task<std::size_t> receive_some(event_loop* loop, worker_handle* worker, std::span<std::byte> into) {
    frame_receiver receiving;
    const std::size_t received = co_await loop->recvmsg(worker->socket, receiving.prepare(into), MSG_CMSG_CLOEXEC);
    receiving.collect(*worker);
    co_return received;
}

// Receives more of a frame that has begun: a worker that sends nothing more
// for frame_timeout is a protocol violation (a silent worker would hold its
// tasks for ever).
task<std::size_t> receive_frame_part(pool_core* core, worker_handle* worker, std::span<std::byte> into) {
    const auto limit = core->frame_timeout();
    if (limit.count() <= 0) co_return co_await receive_some(&core->loop, worker, into);
    try {
        co_return co_await with_timeout(receive_some(&core->loop, worker, into), limit);
    } catch (const timeout_error&) {
        throw protocol_violation("part of a frame, then nothing for " + std::to_string(limit.count()) +
                                 " ms (process_pool_options::frame_timeout)");
    }
}

// Receives the rest of a large RESULT's block straight into `target`,
// `got` bytes of which are there already: false when the stream ended
// first (the worker died) or the pool is going away.
task<bool> receive_block(std::shared_ptr<pool_core> core, worker_handle* worker, std::span<std::byte> target,
                         std::size_t got) {
    try {
        while (got < target.size()) {
            if (core->destroyed) co_return false;
            const std::size_t received = co_await receive_frame_part(core.get(), worker, target.subspan(got));
            if (received == 0) co_return false;
            got += received;
        }
    } catch (const protocol_violation& violation) {
        core->kill_worker(*worker, violation.what(), true);
        co_return false;
    } catch (const std::system_error&) {
        co_return false; // recv failed: the worker is gone
    }
    co_return true;
}

// Sends a batch whose frames carry descriptors (shared buffers): each
// sendmsg carries the descriptors of the frames that begin within the
// bytes it may send (at most SCM_MAX_FD of them), so they reach the worker
// no later than their frame's first byte, in frame order.
task<void> send_with_descriptors(pool_core* core, worker_handle* worker, const outbox& batch) {
    std::vector<::iovec> parts = wire_parts(batch.bytes, batch.attachments);
    // Where each run's frame begins on the wire: its offset in `bytes`, plus
    // the attached parts spliced in before it.
    std::vector<std::size_t> run_at;
    run_at.reserve(batch.descriptors.size());
    for (const auto& run : batch.descriptors) {
        std::size_t at = run.offset;
        for (const auto& part : batch.attachments) {
            if (part.offset <= run.offset) at += part.size;
        }
        run_at.push_back(at);
    }
    std::size_t total = 0;
    for (const auto& part : parts) total += part.iov_len;
    std::size_t position = 0; // wire bytes sent
    std::size_t next = 0;     // the first part not completely sent
    std::size_t run = 0;      // the first run whose descriptors are not sent
    descriptor_control control;
    std::vector<int> fds;
    while (position < total && !core->destroyed && worker->state != worker_handle::phase::exited) {
        // This send may carry the runs from `run` on, as many as fit in one
        // message; it stops before the frame of the first run left out.
        std::size_t end = run;
        std::size_t count = 0;
        while (end < batch.descriptors.size() && count + batch.descriptors[end].owners.size() <= max_descriptors_per_frame) {
            count += batch.descriptors[end].owners.size();
            ++end;
        }
        const std::size_t limit = end < batch.descriptors.size() ? run_at[end] : total;
        std::vector<::iovec> window;
        std::size_t room = limit - position;
        for (std::size_t i = next; i < parts.size() && room > 0 && window.size() < IOV_MAX; ++i) {
            const std::size_t length = std::min(parts[i].iov_len, room);
            window.push_back({parts[i].iov_base, length});
            room -= length;
        }
        ::msghdr message{};
        message.msg_iov = window.data();
        message.msg_iovlen = window.size();
        fds.clear();
        for (std::size_t r = run; r < end; ++r) {
            for (const auto& owner : batch.descriptors[r].owners) fds.push_back(owner->fd());
        }
        attach_descriptors(message, control, fds);
        const std::size_t sent = co_await core->loop.sendmsg(worker->socket, &message);
        run = end; // sent with the first byte of this message
        next = consume_parts(parts, next, sent);
        position += sent;
    }
}

task<void> write_worker(std::shared_ptr<pool_core> core, worker_handle* worker) {
    try {
        while (!worker->queued.empty() && !core->destroyed && worker->state != worker_handle::phase::exited) {
            outbox batch;
            std::swap(batch, worker->queued);
            if (!batch.descriptors.empty()) {
                co_await send_with_descriptors(core.get(), worker, batch);
                continue;
            }
            if (batch.attachments.empty()) {
                // The usual case: one buffer, plain send. It spends about 280
                // fewer instructions per round trip in the parent than the
                // sendmsg path below (callgrind, bench/harness.py).
                std::size_t sent = 0;
                while (sent < batch.bytes.size() && !core->destroyed && worker->state != worker_handle::phase::exited) {
                    sent += co_await core->loop.send(worker->socket, std::span{batch.bytes}.subspan(sent));
                }
                continue;
            }
            std::vector<::iovec> parts = wire_parts(batch.bytes, batch.attachments);
            std::size_t next = 0; // the first part not completely sent
            while (next < parts.size() && !core->destroyed && worker->state != worker_handle::phase::exited) {
                ::msghdr message{};
                message.msg_iov = parts.data() + next;
                message.msg_iovlen = std::min<std::size_t>(parts.size() - next, IOV_MAX);
                next = consume_parts(parts, next, co_await core->loop.sendmsg(worker->socket, &message));
            }
        }
    } catch (...) {
        // EPIPE and friends: the worker is gone; watch_worker reports how.
    }
    worker->writing = false;
    core->release_coroutine(*worker);
}

} // namespace

task<void> read_worker(std::shared_ptr<pool_core> core, worker_handle* worker) {
    constexpr std::size_t usual_size = 64 * 1024;
    byte_buffer buffer(usual_size);
    std::size_t filled = 0;
    frame_receiver receiving;
    try {
        // Until EOF, even after the process was reaped: frames it sent
        // before dying are still in the socket and must be seen.
        while (!core->destroyed) {
            if (filled == buffer.size()) buffer.resize(buffer.size() * 2);
            std::size_t received = 0;
            if (filled == 0) {
                // In this frame, not a coroutine of its own: the usual
                // receive costs no allocation.
                received = co_await core->loop.recvmsg(worker->socket, receiving.prepare(std::span{buffer}.subspan(filled)),
                                                       MSG_CMSG_CLOEXEC);
                receiving.collect(*worker);
            } else { // the rest of a frame that has begun
                received = co_await receive_frame_part(core.get(), worker, std::span{buffer}.subspan(filled));
            }
            if (received == 0 || core->destroyed) break;
            filled += received;
            std::size_t consumed = 0;
            {
                struct handling {
                    bool& flag;
                    ~handling() { flag = false; }
                } scope{core->handling_frames = true};
                core->handle_frames(*worker, std::span{buffer.data(), filled}, consumed);
            }
            if (consumed > 0) {
                std::memmove(buffer.data(), buffer.data() + consumed, filled - consumed);
                filled -= consumed;
            }
            if (filled >= wire::header_size) {
                // An incomplete frame (its length was checked against the
                // limit by handle_frames).
                const auto header = wire::read_header(buffer.data());
                const auto needed = wire::header_size + header.length;
                const bool large_result = header.kind == static_cast<std::uint16_t>(wire::frame_kind::result) &&
                                          (header.flags & wire::frame_flag::partial) == 0 && needed > buffer.size() &&
                                          header.length >= attach_from && wire::descriptor_count(header.flags) == 0;
                if (large_result && filled < wire::header_size + sizeof(wire_count)) continue; // its count is next
                if (large_result) {
                    // One block container: received into the value itself.
                    const auto start = std::span{buffer}.subspan(wire::header_size, filled - wire::header_size);
                    std::span<std::byte> target;
                    if (work_item* item = core->begin_block_result(*worker, header, start, target)) {
                        const std::size_t got = start.size() - sizeof(wire_count);
                        std::memcpy(target.data(), start.data() + sizeof(wire_count), got);
                        filled = 0;
                        const bool complete = co_await receive_block(core, worker, target, got);
                        if (core->destroyed) {
                            item->release();
                        } else {
                            core->end_block_result(*worker, item, complete);
                        }
                        if (!complete) break;
                        continue;
                    }
                }
                // Otherwise, room for all of it.
                if (needed > buffer.size()) buffer.resize(needed);
            } else if (buffer.size() > usual_size) {
                // A large frame is done with: give its memory back.
                buffer.resize(filled);
                buffer.shrink_to(usual_size);
                buffer.resize(usual_size);
            }
        }
    } catch (const protocol_violation& violation) {
        core->kill_worker(*worker, violation.what(), true);
    } catch (const std::system_error&) {
        // recv failed: the worker is gone; watch_worker reports how.
    } catch (const std::exception& e) {
        core->kill_worker(*worker, std::string("something the pool could not handle (") + e.what() + ")", true);
    } catch (...) {
        core->kill_worker(*worker, "something the pool could not handle", true);
    }
    if (!core->destroyed) core->on_reader_done(*worker);
    core->release_coroutine(*worker);
}

// --- frames to a worker (loop thread)

void pool_core::send_bye(worker_handle& worker) {
    worker.queued.add_frame(wire::frame_kind::bye, 0);
    worker.bye_sent = true;
    worker.state = worker_handle::phase::retiring;
}

void pool_core::start_writer(worker_handle& worker) {
    if (!handling_frames && worker.queued.attachments.empty() && worker.queued.descriptors.empty() &&
        !worker.queued.bytes.empty() &&
        worker.state != worker_handle::phase::exited) {
        // Frames in one buffer (the usual CALLs, CANCEL, RECALL, BYE),
        // queued outside the handling of a batch of answers, go out now, with one send(2) that does not block: no loop iteration and
        // ring round trip just to start write_worker and have it submit the
        // same send. Whatever the socket does not take at once (it is full),
        // and frames with attached parts, go through write_worker.
        const ssize_t sent = ::send(worker.socket, worker.queued.bytes.data(), worker.queued.bytes.size(),
                                    MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent == static_cast<ssize_t>(worker.queued.bytes.size())) {
            worker.queued.bytes.clear();
            return;
        }
        if (sent > 0) {
            byte_buffer rest;
            rest.append(worker.queued.bytes.data() + sent, worker.queued.bytes.size() - static_cast<std::size_t>(sent));
            worker.queued.bytes = std::move(rest);
        }
        // Not sent (EAGAIN; or EPIPE and friends: the worker is gone, and
        // write_worker meets the same error and stops).
    }
    worker.writing = true;
    ++worker.coroutines;
    loop.spawn(shielded(write_worker(shared_from_this(), &worker)));
}

// --- frames from a worker (loop thread)

void pool_core::handle_frames(worker_handle& worker, std::span<const std::byte> data, std::size_t& consumed) {
    while (data.size() - consumed >= wire::header_size) {
        const auto header = wire::read_header(data.data() + consumed);
        if (header.length > options_.max_frame_size) {
            throw protocol_violation("a frame of " + std::to_string(header.length) + " bytes, over max_frame_size (" +
                                     std::to_string(options_.max_frame_size) + ")");
        }
        if (data.size() - consumed < wire::header_size + header.length) return; // incomplete
        const auto payload = data.subspan(consumed + wire::header_size, header.length);
        consumed += wire::header_size + header.length;

        const auto kind = static_cast<wire::frame_kind>(header.kind);
        // The descriptors of the shared buffers in a RESULT: received before
        // its bytes, taken from the queue in order, and closed after it
        // unless its value took them over. Frames without any (nearly all)
        // set nothing up.
        received_descriptors descriptors;
        std::optional<descriptor_decoding> decoding;
        if (const std::size_t count = wire::descriptor_count(header.flags); count > 0) {
            if (kind != wire::frame_kind::result) {
                throw protocol_violation("descriptors with a frame of kind " + std::to_string(header.kind));
            }
            if (worker.received_descriptors.size() < count) {
                throw protocol_violation("a RESULT that claims " + std::to_string(count) +
                                         " descriptors, more than it sent");
            }
            for (std::size_t i = 0; i < count; ++i) {
                descriptors.fds.push_back(worker.received_descriptors.front());
                worker.received_descriptors.pop_front();
            }
            decoding.emplace(descriptors.fds);
        }
        if (kind == wire::frame_kind::hello) {
            if (worker.state != worker_handle::phase::starting) throw protocol_violation("a second HELLO");
            std::uint16_t version = 0;
            std::int32_t pid = 0;
            try {
                decode_from(payload, version, pid);
            } catch (const std::exception&) {
                throw protocol_violation("an undecodable HELLO");
            }
            if (version != wire::protocol_version) {
                throw protocol_violation("protocol version " + std::to_string(version) + ", expected " +
                                         std::to_string(wire::protocol_version));
            }
            if (worker.remote) {
                worker.pid = pid; // its host's pid, which only the worker knows here
            } else if (pid != worker.pid) {
                throw protocol_violation("a HELLO with pid " + std::to_string(pid));
            }
            if (options_.initializer) {
                worker.state = worker_handle::phase::initializing;
                worker.queued.add_call(0, wire::frame_flag::initializer, options_.initializer.function_id,
                                       options_.initializer.arguments, {}, {});
                if (!worker.writing) start_writer(worker);
                continue;
            }
            worker.state = worker_handle::phase::ready;
            startup_failures_ = 0; // only a worker that became ready proves the program sound
            dispatch();
            continue;
        }
        if (header.work_id == 0 && worker.state == worker_handle::phase::initializing &&
            (kind == wire::frame_kind::result || kind == wire::frame_kind::error)) {
            if (kind == wire::frame_kind::result) {
                worker.state = worker_handle::phase::ready;
                startup_failures_ = 0;
                dispatch();
                continue;
            }
            std::exception_ptr cause;
            try {
                cause = decode_exception(payload, worker.pid, options_.initializer.function_name);
            } catch (const std::exception& e) {
                throw protocol_violation(std::string("an undecodable ERROR frame: ") + e.what());
            }
            initializer_failed(worker, cause);
            continue;
        }
        if (kind != wire::frame_kind::start && kind != wire::frame_kind::result && kind != wire::frame_kind::error &&
            kind != wire::frame_kind::recalled && kind != wire::frame_kind::progress && kind != wire::frame_kind::item) {
            throw protocol_violation("a frame of unknown kind " + std::to_string(header.kind));
        }
        const auto position = std::find_if(worker.assigned.begin(), worker.assigned.end(),
                                           [&](const work_item* item) { return item->id == header.work_id; });
        if (position == worker.assigned.end()) {
            throw protocol_violation("a frame for work id " + std::to_string(header.work_id) + ", which it does not hold");
        }
        work_item* item = *position;
        if (kind == wire::frame_kind::result && (header.flags & wire::frame_flag::partial) != 0) {
            // A chunk's results before its failing input: kept in the item's
            // value for map_stream to yield; the chunk's ERROR follows and
            // ends the task. Not for an item cancelled meanwhile (final: its
            // value may be read already) or one that is not a chunk.
            if ((item->frame_flags & wire::frame_flag::chunk) == 0) {
                throw protocol_violation("a partial RESULT for a task that is not a map chunk");
            }
            if (!is_final(item->state())) {
                try {
                    item->store_result(payload);
                } catch (...) {
                    // Undecodable: the chunk fails with its error all the same.
                }
            }
            continue;
        }
        if (kind == wire::frame_kind::recalled) {
            if (!item->recalling) throw protocol_violation("a RECALLED for a task that was not recalled");
            worker.assigned.erase(position);
            take_back(item);
            continue;
        }
        if (kind == wire::frame_kind::progress) {
            double value = 0;
            try {
                decode_from(payload, value);
            } catch (const std::exception& e) {
                throw protocol_violation(std::string("an undecodable PROGRESS frame: ") + e.what());
            }
            mark_running(*item);
            deliver_progress(*item, value);
            continue;
        }
        if (kind == wire::frame_kind::item) {
            if (item->stream_window == 0) throw protocol_violation("an ITEM for a task that is not a stream");
            if (item->stream_credit == 0) throw protocol_violation("an ITEM beyond the window the pool granted");
            --item->stream_credit;
            mark_running(*item);
            // Its items reached the consumer: the task is never run again,
            // whatever max_retries says.
            item->retries_left = 0;
            deliver_stream_item(*item, payload);
            continue;
        }
        if (kind == wire::frame_kind::start) {
            item->recalling = false; // it started: no RECALLED will come
            // A late START says how long the task had run by then, so that
            // the run time averaged for prefetching is the task's own.
            std::uint32_t ran_us = 0;
            if (payload.size() == sizeof ran_us) std::memcpy(&ran_us, payload.data(), sizeof ran_us);
            item->started = std::chrono::steady_clock::now() - std::chrono::microseconds{ran_us};
            std::lock_guard lock{mutex_};
            if (item->state() == work_state::dispatched) item->set_state(work_state::running);
            continue;
        }
        handle_answer(worker, position, kind, payload, false);
    }
}

// Only a task that runs reports progress or sends items: it started, even if
// its START has not arrived (a worker sends it late, with the RESULT of a
// short task or soon after it began), and must not look unstarted, and so
// be run twice, should its worker die.
void pool_core::mark_running(work_item& item) {
    if (item.state() != work_state::dispatched) return;
    item.recalling = false;
    item.started = std::chrono::steady_clock::now();
    std::lock_guard lock{mutex_};
    if (item.state() == work_state::dispatched) item.set_state(work_state::running);
}

void pool_core::handle_answer(worker_handle& worker, std::deque<work_item*>::iterator position, wire::frame_kind kind,
                              std::span<const std::byte> payload, bool stored) {
    work_item* item = *position;
    if (item->started != std::chrono::steady_clock::time_point{}) {
        const double run_us =
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - item->started).count();
        double& average = run_us_[item->function_id ^ item->frame_flags];
        average = average <= 0 ? run_us : 0.8 * average + 0.2 * run_us;
    }
    worker.assigned.erase(position);
    // Before the dispatch below, which would otherwise send it more work.
    retire_if_over_memory(worker);
    bool already_final;
    {
        std::lock_guard lock{mutex_};
        uncount_locked(*item);
        already_final = is_final(item->state());
    }
    if (already_final) {
        // Cancelled meanwhile: whatever it answered is discarded.
        item->release();
        dispatch();
        return;
    }
    if (kind == wire::frame_kind::result) {
        std::string problem;
        try {
            if (!stored) item->store_result(payload);
        } catch (const std::exception& e) {
            problem = e.what();
        } catch (...) {
            problem = "an exception of unknown type";
        }
        if (problem.empty()) {
            complete(item, work_state::finished, nullptr);
        } else {
            complete(item, work_state::failed,
                     std::make_exception_ptr(error("coproc: the result of " + std::string(item->function_name) +
                                                   " from worker " + std::to_string(worker.pid) +
                                                   " could not be decoded: " + problem)));
        }
    } else {
        std::exception_ptr remote;
        std::string problem;
        try {
            remote = decode_exception(payload, worker.pid, item->function_name);
        } catch (const std::exception& e) {
            problem = e.what();
        } catch (...) {
            problem = "an exception of unknown type";
        }
        if (!remote) {
            complete(item, work_state::failed,
                     std::make_exception_ptr(worker_died(worker.pid, SIGKILL, -1, std::string(item->function_name),
                                                         "coproc: worker " + std::to_string(worker.pid) + " running " +
                                                             std::string(item->function_name) +
                                                             " sent an undecodable ERROR frame and was killed by the pool: " +
                                                             problem)));
            item->release();
            throw protocol_violation("an undecodable ERROR frame: " + problem);
        }
        complete(item, work_state::failed, remote);
    }
    item->release();
    dispatch();
}

work_item* pool_core::begin_block_result(worker_handle& worker, const wire::frame_header& header,
                                         std::span<const std::byte> start, std::span<std::byte>& target) {
    const auto position = std::find_if(worker.assigned.begin(), worker.assigned.end(),
                                       [&](const work_item* item) { return item->id == header.work_id; });
    if (position == worker.assigned.end()) return nullptr; // handle_frames will say what is wrong
    work_item* item = *position;
    std::vector<spare_block> spares;
    if (const void* tag = item->block_result_tag()) spares = take_sent_blocks(*item, tag);
    target = item->prepare_block_result(start, header.length, std::move(spares));
    if (target.empty()) return nullptr;
    item->retain(); // the value being filled outlives whatever happens to the item meanwhile
    return item;
}

// The block containers of the result's type (`tag`) that `item`'s
// arguments were handed over as, for the result to reuse. Its START came
// before this RESULT, so the worker has read the whole CALL: no send reads
// those bytes again, whoever still holds the containers. None while the
// task has retries left: after a death its CALL would be sent again.
std::vector<spare_block> pool_core::take_sent_blocks(work_item& item, const void* tag) {
    std::vector<spare_block> taken;
    std::lock_guard lock{mutex_}; // a cancel from another thread frees the arguments
    if (item.state() != work_state::running || item.retries_left > 0) return taken;
    for (auto& part : item.attached) {
        if (part.container != tag) continue;
        taken.push_back({std::move(part.owner), tag});
        part.data = nullptr;
        part.container = nullptr;
        item.arguments_taken = true;
    }
    return taken;
}

void pool_core::end_block_result(worker_handle& worker, work_item* item, bool complete) {
    const auto position = std::find(worker.assigned.begin(), worker.assigned.end(), item);
    // Not complete: the worker died while sending; not held any more: the
    // worker was killed meanwhile. Either way its death settles the item.
    if (complete && position != worker.assigned.end()) handle_answer(worker, position, wire::frame_kind::result, {}, true);
    item->release();
}

void pool_core::deliver_progress(work_item& item, double value) {
    std::shared_ptr<const std::function<void(double)>> callback;
    {
        std::lock_guard lock{mutex_};
        if (is_final(item.state())) return; // cancelled meanwhile: its reports are dropped
        callback = item.progress_callback;
    }
    item.progress.store(value, std::memory_order_relaxed);
    item.progress_reports.fetch_add(1, std::memory_order_release); // see work_item::progress_reports
    if (!callback) return;
    // Posted, never run here (a callback may do anything, even destroy the
    // pool). It holds the item, to skip the call once the task was cancelled.
    // It runs before a coroutine suspended awaiting the item resumes, as
    // future::on_progress promises: the awaiter is scheduled later (by the
    // answer that follows), and each loop iteration runs the functions
    // posted before the coroutines made ready (event_loop.cpp);
    // test_progress checks it.
    item.retain();
    const std::shared_ptr<work_item> held{&item, [](work_item* kept) { kept->release(); }};
    loop.post([callback = std::move(callback), held, value] {
        if (held->state() != work_state::cancelled) (*callback)(value);
    });
}

void pool_core::on_reader_done(worker_handle& worker) {
    worker.reader_done = true;
    if (worker.reaped) on_worker_exit(worker);
}

} // namespace coproc::detail

// One worker's connection, private to src/: the frames queued for its
// socket and its part of worker_handle. The code is in worker_connection.cpp,
// whose top draws this step of DESIGN.md's data flow.
#pragma once

#include <coproc/detail/byte_buffer.hpp>
#include <coproc/detail/serialization.hpp>
#include <coproc/detail/wire.hpp>
#include <coproc/detail/work_item.hpp>
#include <coproc/task.hpp>

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

namespace coproc::detail {

// Frames queued for a worker. Large CALL arguments are not copied in: the
// outbox shares the item's attached parts, and write_worker sends them from
// where they are (sendmsg, one iovec per part).
struct outbox {
    // The descriptors of the shared buffers of the frame that begins at
    // `offset` of `bytes`, kept open until sent (SCM_RIGHTS).
    struct descriptor_run {
        std::size_t offset;
        shared_descriptors owners;
    };

    byte_buffer bytes;
    std::vector<attached_bytes> attachments; // offsets into `bytes`, in order
    std::vector<descriptor_run> descriptors; // in frame order

    [[nodiscard]] bool empty() const noexcept { return bytes.empty() && attachments.empty(); }

    void add_frame(wire::frame_kind kind, std::uint64_t work_id) {
        wire::finish_frame(bytes, wire::begin_frame(bytes, kind, work_id));
    }

    // A CREDIT frame: the stream task `work_id` may send `items` more ITEMs.
    void add_credit(std::uint64_t work_id, std::uint32_t items) {
        const auto offset = wire::begin_frame(bytes, wire::frame_kind::credit, work_id);
        bytes.append(&items, sizeof items);
        wire::finish_frame(bytes, offset);
    }

    // A CALL frame: the function id, then `arguments` (copied) with the
    // `attached` parts (referred to) at their offsets, and the descriptors
    // of its `shared` buffers.
    void add_call(std::uint64_t work_id, std::uint16_t flags, std::uint64_t function_id, const byte_buffer& arguments,
                  const std::vector<attached_bytes>& attached, const shared_descriptors& shared) {
        const auto offset =
            wire::begin_frame(bytes, wire::frame_kind::call, work_id, wire::with_descriptors(flags, shared.size()));
        if (!shared.empty()) descriptors.push_back({offset, shared});
        bytes.append(&function_id, sizeof function_id);
        std::size_t done = 0;
        for (const auto& part : attached) {
            bytes.append(arguments.data() + done, part.offset - done);
            attachments.push_back({bytes.size(), part.data, part.size, part.owner});
            done = part.offset;
        }
        bytes.append(arguments.data() + done, arguments.size() - done);
        wire::finish_frame(bytes, offset, attached_size(attached));
    }
};

// A worker_handle's connection: its socket and the frames for it.
struct worker_connection {
    int socket = -1;
    // Descriptors received from the worker (SCM_RIGHTS), not yet taken by
    // the frame they came for: in order, owned here.
    std::deque<int> received_descriptors;
    outbox queued; // frames not yet handed to write_worker
    bool writing = false;
    bool bye_sent = false;
    bool violated = false;   // killed for a protocol violation: its frames were not all read
};

struct worker_handle;

// Reads the worker's frames until EOF (spawned by spawn_worker).
task<void> read_worker(std::shared_ptr<pool_core> core, worker_handle* worker);

} // namespace coproc::detail

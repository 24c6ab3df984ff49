// coproc/detail/wire.hpp - the frames exchanged by the parent and its
// workers over each worker's socket pair.
//
// A frame is a fixed 16-byte header followed by `length` payload bytes:
//
//   u32 length | u16 kind | u16 flags | u64 work id | payload (cereal binary)
//
// Both ends run on the same machine, so fields are in host byte order.
//
//   kind    direction         payload
//   HELLO   worker -> parent  u16 protocol version, i32 pid
//   CALL    parent -> worker  u64 function id, then the arguments (flag
//                             `chunk`: a vector of argument tuples, for map;
//                             shared buffers as descriptors, see
//                             descriptor_count)
//   START   worker -> parent  the task with this work id began running: no
//                             payload when sent before the task ran, or a
//                             u32 of the microseconds it had run when sent
//                             late (protocol 3: with its RESULT when the task
//                             was short, else soon after it began; see the
//                             start word below)
//   RESULT  worker -> parent  the function's value (nothing for void); flag
//                             `partial`: a chunk's results before its failing
//                             input, followed by the chunk's ERROR
//   ERROR   worker -> parent  transported exception (see remote_function.hpp)
//   CANCEL  parent -> worker  (none): cancel the task with this work id
//   BYE     parent -> worker  (none): finish what was sent, then exit
//   RECALL  parent -> worker  (none): give back the task with this work id
//                             if it has not started (another worker is idle)
//   RECALLED worker -> parent (none): the task was given back unrun; a task
//                             already started is not, and nothing is sent
//   PROGRESS worker -> parent double: report_progress of the running task
//                             with this work id (throttled by the worker;
//                             the last one comes before its RESULT or ERROR)
//   ITEM    worker -> parent  one item a stream task pushed into its sink
//                             (submit_stream), in order, only as many as
//                             the parent granted; the task's RESULT (empty)
//                             or ERROR ends the stream
//   CREDIT  parent -> worker  u32: the stream task with this work id may
//                             send that many more ITEMs. The first follows
//                             its CALL (the window); the others are sent as
//                             the consumer takes items
#pragma once

#include <coproc/detail/byte_buffer.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace coproc::detail::wire {

inline constexpr std::uint16_t protocol_version = 6;

// The start word: 8 bytes of shared memory (a memfd the parent maps and
// passes to the worker as this descriptor, named by the environment
// variable below) where the worker stores the work id of each task before
// running it. It says which task was running when a worker died, START sent
// or not, so a worker may send START late, with the RESULT of a short task
// in one send, and a task that started is still never run twice. A worker
// without it (the variable unset, or the mapping failed) sends START before
// each task.
inline constexpr int start_word_descriptor = 4;
inline constexpr const char* start_word_variable = "COPROC_START_WORD_FD";

enum class frame_kind : std::uint16_t {
    hello = 1,
    call = 2,
    start = 3,
    result = 4,
    error = 5,
    cancel = 6,
    bye = 7,
    recall = 8,
    recalled = 9,
    progress = 10,
    item = 11,
    credit = 12,
};

// Bits of frame_header::flags.
enum frame_flag : std::uint16_t {
    // CALL: the payload's arguments are a vector of argument tuples (map);
    // the RESULT is a vector of results.
    chunk = 1,
    // CALL: the pool's initializer (work id 0), run before any task; its
    // RESULT or ERROR carries work id 0 too.
    initializer = 2,
    // RESULT of a chunk: the results of its inputs before the one that
    // failed; the chunk's ERROR follows at once. It does not end the task.
    partial = 4,
    // CALL: a stream task (submit_stream): it answers with ITEMs, as many
    // as CREDIT frames allow, before its RESULT.
    stream = 8,
};

// The high byte of a CALL's or RESULT's flags: how many descriptors
// (shared buffers, coproc/shared_buffer.hpp) go with the frame. They travel
// by SCM_RIGHTS with the bytes of this frame or of one sent before it, in
// frame order, so each end takes them from the queue of descriptors it has
// received when it reads the frame's header.
inline constexpr unsigned descriptor_shift = 8;
constexpr std::size_t descriptor_count(std::uint16_t flags) noexcept { return flags >> descriptor_shift; }
constexpr std::uint16_t with_descriptors(std::uint16_t flags, std::size_t count) noexcept {
    return static_cast<std::uint16_t>((flags & 0xff) | (count << descriptor_shift));
}

struct frame_header {
    std::uint32_t length;
    std::uint16_t kind;
    std::uint16_t flags;
    std::uint64_t work_id;
};
static_assert(sizeof(frame_header) == 16, "the header is 16 bytes on the wire");

inline constexpr std::size_t header_size = sizeof(frame_header);

// Appends a header for a payload that the caller appends next; returns the
// header's offset so that finish_frame can fill in the length.
inline std::size_t begin_frame(byte_buffer& out, frame_kind kind, std::uint64_t work_id,
                               std::uint16_t flags = 0) {
    const std::size_t offset = out.size();
    const frame_header header{0, static_cast<std::uint16_t>(kind), flags, work_id};
    out.resize(offset + header_size);
    std::memcpy(out.data() + offset, &header, header_size);
    return offset;
}

// The largest payload a frame can carry, and the largest a worker accepts.
inline constexpr std::size_t max_payload = std::size_t{1} << 31;

// Writes the payload length of the frame begun at `offset`: the bytes
// appended since, plus `elsewhere` more that the sender sends from another
// buffer right after them. Throws std::length_error (leaving `out` as it was
// before begin_frame) when the payload is larger than a frame can carry.
inline void finish_frame(byte_buffer& out, std::size_t offset, std::size_t elsewhere = 0) {
    const std::size_t payload = out.size() - offset - header_size + elsewhere;
    if (payload > max_payload) {
        out.resize(offset);
        throw std::length_error("coproc: a frame payload of " + std::to_string(payload) +
                                " bytes exceeds the 2 GiB a frame can carry");
    }
    const auto length = static_cast<std::uint32_t>(payload);
    std::memcpy(out.data() + offset, &length, sizeof length);
}

inline frame_header read_header(const std::byte* data) noexcept {
    frame_header header;
    std::memcpy(&header, data, header_size);
    return header;
}

} // namespace coproc::detail::wire

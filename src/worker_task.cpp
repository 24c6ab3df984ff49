// See worker_task.hpp.
#include "worker_task.hpp"

#include <coproc/detail/wire.hpp>
#include <coproc/error.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <string_view>
#include <exception>
#include <span>
#include <stdexcept>
#include <utility>

#include <unistd.h>

namespace coproc::detail {

namespace {

// The stream task running on this thread, for its sink's pushes.
struct running_stream {
    std::uint64_t work_id;
    const task_hooks* hooks;
};
thread_local const running_stream* current_stream = nullptr;

std::uint64_t address_space_limit = 0; // set before the first task

// The error a task ends with: its own, except that under a hard memory
// limit an allocation failure says which limit refused it.
std::exception_ptr task_error(std::exception_ptr error, std::string_view function) {
    if (address_space_limit == 0) return error;
    try {
        std::rethrow_exception(error);
    } catch (const std::bad_alloc&) {
        return std::make_exception_ptr(memory_limit_exceeded(
            address_space_limit,
            "coproc: " + std::string(function) + " ran out of memory in worker " + std::to_string(::getpid()) +
                ": an allocation would exceed its address-space limit of " + std::to_string(address_space_limit) +
                " bytes (process_pool_options::worker_address_space_limit, RLIMIT_AS)"));
    } catch (...) {
        return error;
    }
}

// Makes `stream` the thread's running stream until destroyed.
class stream_scope {
public:
    explicit stream_scope(const running_stream* stream) noexcept : outer_(std::exchange(current_stream, stream)) {}
    ~stream_scope() { current_stream = outer_; }
    stream_scope(const stream_scope&) = delete;
    stream_scope& operator=(const stream_scope&) = delete;

private:
    const running_stream* outer_;
};

} // namespace

void send_stream_item(byte_buffer& frame) {
    const running_stream* stream = current_stream;
    if (stream == nullptr) {
        throw std::logic_error("coproc::sink::push called outside the stream task it was made for (a worker's sink "
                               "serves its task, on the thread that runs it)");
    }
    const wire::frame_header header{0, static_cast<std::uint16_t>(wire::frame_kind::item), 0, stream->work_id};
    std::memcpy(frame.data(), &header, wire::header_size);
    wire::finish_frame(frame, 0); // a value too large for a frame throws here, nothing sent
    stream->hooks->take_credit(stream->hooks->session);
    stream->hooks->send(stream->hooks->session, frame);
}

void set_address_space_limit(std::uint64_t bytes) noexcept { address_space_limit = bytes; }

owned_descriptors::~owned_descriptors() {
    for (const int fd : fds) {
        if (fd >= 0) ::close(fd);
    }
}

byte_buffer start_frame(std::uint64_t work_id, std::optional<std::chrono::steady_clock::duration> ran) {
    byte_buffer frame;
    const auto offset = wire::begin_frame(frame, wire::frame_kind::start, work_id);
    if (ran) {
        const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(*ran).count();
        const auto value = static_cast<std::uint32_t>(std::clamp<std::int64_t>(micros, 0, UINT32_MAX));
        frame.resize(offset + wire::header_size + sizeof value);
        std::memcpy(frame.data() + offset + wire::header_size, &value, sizeof value);
    }
    wire::finish_frame(frame, offset);
    return frame;
}

namespace {

// Writes the flags of the RESULT frame at `offset`: `flags`, and how many
// descriptors go with it.
void set_flags(outgoing& reply, std::size_t offset, std::uint16_t flags) {
    const std::uint16_t value = wire::with_descriptors(flags, reply.descriptors.size());
    std::memcpy(reply.bytes.data() + offset + offsetof(wire::frame_header, flags), &value, sizeof value);
}

} // namespace

outgoing run_call(call& task, std::stop_token token, const task_hooks& hooks) {
    outgoing reply;
    std::uint64_t function_id = 0;
    if (task.payload.size() < sizeof function_id) {
        std::fprintf(stderr, "coproc worker %d: CALL frame too short\n", static_cast<int>(::getpid()));
        worker_quit(3);
    }
    std::memcpy(&function_id, task.payload.data(), sizeof function_id);
    const auto arguments = std::span{task.payload}.subspan(sizeof function_id);
    const remote_function_entry* function = find_remote_function(function_id);
    if (function == nullptr || function->ambiguous) {
        const auto offset = wire::begin_frame(reply.bytes, wire::frame_kind::error, task.work_id);
        if (function == nullptr) {
            encode_unknown_function(function_id, reply.bytes);
        } else {
            encode_ambiguous_function(function->name, reply.bytes);
        }
        wire::finish_frame(reply.bytes, offset);
        return reply;
    }
    const invoker invoke = (task.flags & wire::frame_flag::chunk) != 0 ? function->invoke_chunk : function->invoke;
    std::size_t offset = 0; // of the RESULT frame
    try {
        offset = wire::begin_frame(reply.bytes, wire::frame_kind::result, task.work_id);
        // report_progress in the task; a report it holds back goes out
        // when this ends, before the answer.
        std::optional<task_progress> progress;
        if ((task.flags & wire::frame_flag::initializer) == 0) progress.emplace(task.work_id, hooks.send, hooks.session);
        const running_stream stream{task.work_id, &hooks};
        const stream_scope streaming{(task.flags & wire::frame_flag::stream) != 0 ? &stream : nullptr};
        {
            // Shared buffers: the arguments map the CALL's descriptors, and
            // the result's go with the RESULT.
            const descriptor_decoding taking{task.descriptors.fds};
            const descriptor_encoding sharing{reply.descriptors};
            if (task.prepared.values) {
                function->invoke_prepared(task.prepared.values.get(), reply.bytes, reply.attached, std::move(token));
            } else {
                invoke(arguments, reply.bytes, reply.attached, std::move(token));
            }
        }
        progress.reset();
        if ((task.flags & wire::frame_flag::initializer) != 0) { // its value is not used
            reply.bytes.resize(offset + wire::header_size);
            reply.attached.clear();
            reply.descriptors.clear();
        }
        set_flags(reply, offset, 0);
        // A result too large for a frame throws: an ERROR instead.
        wire::finish_frame(reply.bytes, offset, attached_size(reply.attached));
    } catch (const chunk_failure& failure) {
        // The results before the failing input, as a partial RESULT,
        // then the ERROR, in one send.
        try {
            set_flags(reply, offset, wire::frame_flag::partial);
            wire::finish_frame(reply.bytes, offset, attached_size(reply.attached));
        } catch (...) {
            reply.clear(); // the partial results cannot travel: the error alone does
        }
        const auto error_offset = wire::begin_frame(reply.bytes, wire::frame_kind::error, task.work_id);
        encode_exception(task_error(failure.error, function->name), reply.bytes);
        wire::finish_frame(reply.bytes, error_offset);
    } catch (...) {
        reply.clear(); // drop whatever part of the result was encoded
        const auto error_offset = wire::begin_frame(reply.bytes, wire::frame_kind::error, task.work_id);
        encode_exception(task_error(std::current_exception(), function->name), reply.bytes);
        wire::finish_frame(reply.bytes, error_offset);
    }
    return reply;
}

} // namespace coproc::detail

// Running one CALL in a worker and framing its answer. Private to src/.
//
//   call (function id + encoded arguments, or arguments received in place)
//     --run_call--> the function, with the task's stop token and progress;
//                   a stream's sink sends ITEMs against the parent's credit
//     --> outgoing: RESULT (a large result attached where the function left
//         it), or a partial RESULT then ERROR (a chunk that failed midway),
//         or ERROR (an exception, an unknown or ambiguous function)
#pragma once

#include "task_progress.hpp"
#include "worker_channel.hpp"

#include <coproc/detail/byte_buffer.hpp>
#include <coproc/detail/remote_function.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <stop_token>
#include <utility>
#include <vector>

namespace coproc::detail {

// Descriptors a worker received for one CALL (its shared buffers): closed
// when destroyed, unless the task's arguments took them over (set to -1).
struct owned_descriptors {
    std::vector<int> fds;
    owned_descriptors() = default;
    owned_descriptors(owned_descriptors&& other) noexcept : fds(std::move(other.fds)) { other.fds.clear(); }
    owned_descriptors& operator=(owned_descriptors&& other) noexcept {
        std::swap(fds, other.fds);
        return *this;
    }
    ~owned_descriptors();
};

// A CALL as the worker holds it until it runs.
struct call {
    std::uint64_t work_id;
    std::uint16_t flags;
    byte_buffer payload;           // the function id, then its encoded arguments...
    prepared_arguments prepared{}; // ... or, when set, those arguments received in place
    std::uint32_t credit = 0;      // a stream's: ITEMs it may send (CREDIT frames so far)
    owned_descriptors descriptors; // its shared buffers' descriptors, in slot order
};

// What a running task reaches its worker's session through.
struct task_hooks {
    void* session;
    // Sends one whole frame (serialized with the worker's other writes).
    task_progress::send_function send;
    // Takes one ITEM's worth of the running stream's credit, blocking until
    // the parent grants some; throws cancelled_error when the task is
    // cancelled meanwhile.
    void (*take_credit)(void* session);
};

// A START frame; `ran`: how long the task has run when it is sent late.
byte_buffer start_frame(std::uint64_t work_id, std::optional<std::chrono::steady_clock::duration> ran);

// The hard limit the worker runs under (apply_address_space_limit), or 0:
// with one, a task's std::bad_alloc becomes memory_limit_exceeded.
void set_address_space_limit(std::uint64_t bytes) noexcept;

// Runs `task` and returns its answer for the caller to send. Progress
// reports and a stream's ITEMs go out through `hooks`, before the answer.
outgoing run_call(call& task, std::stop_token token, const task_hooks& hooks);

} // namespace coproc::detail

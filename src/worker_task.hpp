// Running one CALL in a worker and framing its answer. Private to src/.
//
//   call (function id + encoded arguments, or arguments received in place)
//     --run_call--> the function, with the task's stop token and progress
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

namespace coproc::detail {

// A CALL as the worker holds it until it runs.
struct call {
    std::uint64_t work_id;
    std::uint16_t flags;
    byte_buffer payload;           // the function id, then its encoded arguments...
    prepared_arguments prepared{}; // ... or, when set, those arguments received in place
};

// A START frame; `ran`: how long the task has run when it is sent late.
byte_buffer start_frame(std::uint64_t work_id, std::optional<std::chrono::steady_clock::duration> ran);

// Runs `task` and returns its answer for the caller to send. Progress
// reports go out through `send`, before the answer.
outgoing run_call(const call& task, std::stop_token token, task_progress::send_function send, void* session);

} // namespace coproc::detail

// report_progress in a worker: a PROGRESS frame per progress_interval at
// most, the latest value always before the task's answer. The states are
// drawn in task_progress.hpp.
#include "task_progress.hpp"

#include <coproc/detail/serialization.hpp>
#include <coproc/detail/wire.hpp>
#include <coproc/progress.hpp>

#include <cstdlib>
#include <utility>

namespace coproc {

namespace detail {

namespace {

// Set and cleared by the thread itself only: no other thread reads it.
thread_local task_progress* current_task = nullptr;

} // namespace

std::chrono::milliseconds progress_interval() noexcept {
    // Read once; the environment does not change in a worker.
    static const std::chrono::milliseconds interval = [] {
        const char* text = std::getenv("COPROC_PROGRESS_INTERVAL_MS");
        return std::chrono::milliseconds{text != nullptr ? std::atoll(text) : 50};
    }();
    return interval;
}

task_progress::task_progress(std::uint64_t work_id, send_function send, void* session) noexcept
    : work_id_(work_id), send_(send), session_(session), outer_(std::exchange(current_task, this)) {}

task_progress::~task_progress() {
    current_task = outer_;
    if (held_) send_now(*held_);
}

task_progress* task_progress::current() noexcept { return current_task; }

void task_progress::report(double value) noexcept {
    const auto now = std::chrono::steady_clock::now();
    if (sent_any_ && now - last_sent_ < progress_interval()) {
        held_ = value;
        return;
    }
    sent_any_ = true;
    last_sent_ = now;
    held_.reset();
    send_now(value);
}

void task_progress::send_now(double value) noexcept {
    try {
        byte_buffer frame;
        const auto offset = wire::begin_frame(frame, wire::frame_kind::progress, work_id_);
        encode_into(frame, value);
        wire::finish_frame(frame, offset);
        send_(session_, frame);
    } catch (...) {
        // Out of memory for 24 bytes: this report is lost, the task goes on.
    }
}

} // namespace detail

void report_progress(double value) noexcept {
    if (detail::task_progress* task = detail::task_progress::current()) task->report(value);
}

} // namespace coproc

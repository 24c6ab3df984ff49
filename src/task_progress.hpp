// The worker side of report_progress (coproc/progress.hpp), private to
// src/: worker.cpp installs a task_progress around each task it runs, and
// report_progress sends PROGRESS frames through it, throttled.
//
//   report_progress(v) --first report, or progress_interval since the last sent--> PROGRESS now
//          |
//          +--sooner---> held (replaces any held value)
//   task returns -------> the held value, if any, is sent; then the caller sends RESULT/ERROR
#pragma once

#include <coproc/detail/byte_buffer.hpp>

#include <chrono>
#include <cstdint>
#include <optional>

namespace coproc::detail {

class task_progress {
public:
    // Sends one complete frame to the parent (the worker's send, which
    // serializes writes from its threads).
    using send_function = void (*)(void* session, const byte_buffer& frame);

    // Makes this the calling thread's task until destroyed.
    task_progress(std::uint64_t work_id, send_function send, void* session) noexcept;
    // Sends the report held back, if any: before the task's answer, which
    // the caller sends after this.
    ~task_progress();
    task_progress(const task_progress&) = delete;
    task_progress& operator=(const task_progress&) = delete;

    // The calling thread's task, or null.
    static task_progress* current() noexcept;
    void report(double value) noexcept;

private:
    void send_now(double value) noexcept;

    std::uint64_t work_id_;
    send_function send_;
    void* session_;
    task_progress* outer_; // a task run inside a task (none today): restored after
    std::chrono::steady_clock::time_point last_sent_{};
    bool sent_any_ = false;
    std::optional<double> held_;
};

// process_pool_options::progress_interval, which the pool passes to its
// workers as COPROC_PROGRESS_INTERVAL_MS; 50 ms when not set.
std::chrono::milliseconds progress_interval() noexcept;

} // namespace coproc::detail

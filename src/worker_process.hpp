// One worker's life, private to src/: its part of worker_handle and what
// the other files use of it. The code is in worker_process.cpp, whose top
// draws this step of DESIGN.md's data flow and the worker's phases.
#pragma once

#include <coproc/event_loop.hpp>
#include <coproc/task.hpp>

#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstddef>
#include <string>
#include <vector>

namespace coproc::detail {

// A worker_handle's process.
struct worker_process {
    // Worker phases: drawn at the top of worker_process.cpp.
    enum class phase { starting, initializing, ready, retiring, exited };

    int pid = -1;
    int pidfd = -1;
    // A worker that process_pool_options::placement started on another host
    // (coproc/placement.hpp): no pidfd, no start word; its exit is announced
    // on the placement's `exit_event`, it is signalled and freed through the
    // placement, and its pid is the one its HELLO gives (0 until then).
    bool remote = false;
    std::uint64_t remote_handle = 0;
    int exit_event = -1; // owned by the placement
    std::string host;    // where it runs; empty for a local worker
    std::string exit_reason; // a remote worker's exit_status::reason
    // Its start failed for a passing shortage on its host: not the
    // program's failure (the pool backs off, as for a local one).
    bool start_shortage = false;
    // It was lost with its host (exit_status::host_lost): not its failure.
    bool host_lost = false;
    // Unique in the pool, unlike pids, which two hosts may share: what a
    // work_item names its worker by (work_item::worker_serial).
    std::uint64_t serial = 0;
    phase state = phase::starting;
    std::string kill_reason; // why the parent killed it, if it did
    // The pool sent it SIGKILL: nothing more is dispatched to it, whatever
    // its phase, in the time until its exit is seen.
    bool condemned = false;
    bool idle_timer = false;
    ::siginfo_t exit_info{};
    // The start word (wire.hpp), mapped shared with the worker; null when
    // it could not be made (the worker then sends START before each task).
    std::uint64_t* start_word = nullptr;

    worker_process() = default;
    worker_process(const worker_process&) = delete;
    worker_process& operator=(const worker_process&) = delete;
    ~worker_process();

    // Whether the task `work_id` began running, as the worker last stored
    // it. Read once the worker is reaped: its stores came before its exit,
    // which the parent learned through the kernel (waitid), so a relaxed
    // load sees them.
    [[nodiscard]] bool started(std::uint64_t work_id) const noexcept {
        return start_word != nullptr && std::atomic_ref<std::uint64_t>{*start_word}.load(std::memory_order_relaxed) == work_id;
    }
};

// Defined in worker_process.cpp, used by the constructor (process_pool.cpp)
// and by the scheduler.

// posix_spawn of `executable` in worker mode, shown as `title`: `child_end`
// becomes its descriptor 3 (its socket) and `start_word_fd`, unless -1, its
// descriptor 4; every other descriptor is closed and every signal is reset.
// 0, with `pid` set, or the error. The caller keeps and closes its
// descriptors. Also used by the MPI host agents (src/mpi/).
int spawn_worker_program(const std::string& executable, const std::string& title, char* const* environment,
                         int child_end, int start_word_fd, ::pid_t& pid) noexcept;
void add_huge_page_tunable(std::vector<std::string>& environment);
bool failed_by_itself(const ::siginfo_t& info);
std::string describe_shortage(int error);
std::string describe_exit(const ::siginfo_t& info);
task<void> sleep_idle(event_loop* loop, std::chrono::milliseconds duration);
// The resident memory of process `pid` (/proc/PID/statm), in bytes; 0 when
// it cannot be read.
std::size_t resident_bytes(int pid);

} // namespace coproc::detail

// The queue and the scheduler, private to src/: its part of worker_handle
// and the blocking waiters it wakes. The code is in pool_scheduler.cpp,
// whose top draws this step of DESIGN.md's data flow and the work item
// states.
#pragma once

#include <coproc/detail/work_item.hpp>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>

namespace coproc::detail {

// A worker_handle's tasks, as the scheduler handed them out.
struct worker_assignment {
    std::deque<work_item*> assigned; // retained, in dispatch order
    std::size_t dispatched_total = 0;
    // Idle timeout: `generation` counts tasks handed to the worker, so the
    // timer can tell whether it stayed idle all along.
    std::uint64_t generation = 0;
};

// The blocking get()'s waiters, defined in pool_scheduler.cpp: deliver
// notifies them, wait_work_item (process_pool.cpp) waits.
extern std::mutex waiters_mutex;
extern std::condition_variable waiters_cv;
extern std::atomic<int> blocked_waiters;

} // namespace coproc::detail

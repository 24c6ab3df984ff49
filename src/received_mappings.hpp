// A worker's mappings of the shared buffers it received, kept between tasks
// (process_pool_options::keep_result_memory), so that a buffer the parent
// passes again is not mapped again: mapping 64 MiB with MAP_POPULATE and
// unmapping it cost about 10 ms here, as much as reading and writing it
// once (bench/README.md, "Shared buffers"). Private to src/.
//
//   decoding a frame (shared_buffer.cpp) --a sealed memfd--> find: the mapping kept for
//       that file and size, if any (the new descriptor is closed); else the caller maps
//       it and keeps it here
//   janitor thread --a mapping unused for keep_for--> dropped (unmapped, closed once
//       no task holds it)
//
// A kept mapping holds its memfd open: the parent's memory lives on in the
// worker for keep_for after its last use, as a spare result block does.
// Only a worker turns it on; the parent never keeps a buffer it was sent.
#pragma once

#include <coproc/shared_buffer.hpp>

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <vector>

namespace coproc::detail {

class received_mappings {
public:
    // The instance decoding uses, if one was made (the worker's).
    static received_mappings* current() noexcept;
    // Makes this process keep received mappings for `keep_for` (0: never);
    // once, at a worker's start.
    static void enable(std::chrono::milliseconds keep_for);

    // The mapping kept for the file (`device`, `inode`) with `size` bytes.
    std::shared_ptr<const shared_mapping> find(::dev_t device, ::ino_t inode, std::size_t size);
    // Keeps `mapping` of that file; false when it cannot (no janitor thread).
    bool keep(::dev_t device, ::ino_t inode, const std::shared_ptr<const shared_mapping>& mapping);
    // How many are kept now (tests, diagnostics).
    std::size_t size();

    // At most this many, least recently used dropped first.
    static constexpr std::size_t capacity = 16;

private:
    using clock_type = std::chrono::steady_clock;
    struct entry {
        ::dev_t device;
        ::ino_t inode;
        std::shared_ptr<const shared_mapping> mapping;
        clock_type::time_point expiry;
    };

    explicit received_mappings(std::chrono::milliseconds keep_for) : keep_for_(keep_for) {}
    bool start_janitor();
    void run_janitor();

    std::chrono::milliseconds keep_for_;
    std::mutex mutex_;
    std::condition_variable changed_;
    std::vector<entry> entries_; // least recently used first
    bool janitor_started_ = false;
    bool janitor_running_ = false;
};

} // namespace coproc::detail

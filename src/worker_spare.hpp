// The memory of a worker's last large block result, kept for the next
// large block argument of its type (process_pool_options::
// keep_result_memory). Private to src/.
//
//   keep(sent) --largest block container of a result just sent--> the spare (one at a time)
//   prepare(function, ...) --takes the spare--> the arguments are received into its memory
//   janitor thread --spare not taken within keep_for--> freed
//
// The janitor starts with the first spare. When no thread can be created
// the worker serves on, keeping no spares.
#pragma once

#include "worker_channel.hpp"

#include <coproc/detail/remote_function.hpp>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <mutex>

namespace coproc::detail {

class spare_memory {
public:
    explicit spare_memory(std::chrono::milliseconds keep_for) : keep_for_(keep_for) {}

    // After `sent` went out: keeps its largest block container (a result
    // sent from where the function left it) as the spare, in place of the
    // one kept before; frees the rest. `sent` is left empty.
    void keep(outgoing& sent);

    // The arguments of `function` (`count` elements, `bytes` on the wire)
    // prepared to be received in place, in the spare's memory when it fits.
    prepared_arguments prepare(const remote_function_entry& function, std::uint64_t count, std::size_t bytes);

private:
    using clock_type = std::chrono::steady_clock;

    // A block container kept for its memory, with how much it holds and
    // when it is to be freed.
    struct kept_block {
        spare_block block;
        std::size_t bytes = 0;
        clock_type::time_point expiry{};
    };

    bool start_janitor();
    kept_block take();
    void put_back(kept_block spare);
    void run_janitor();

    std::chrono::milliseconds keep_for_;
    std::mutex mutex_;
    std::condition_variable changed_;
    kept_block spare_;
    bool janitor_started_ = false; // these two under mutex_
    bool janitor_running_ = false;
};

} // namespace coproc::detail

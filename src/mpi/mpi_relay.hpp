// Rank 0's relay: the one thread of rank 0 that calls MPI. It starts MPI,
// waits for every agent's HELLO, then moves the bytes of each remote
// worker's socket between the pool's end of a local socket pair and the
// worker's agent (mpi_channel.hpp draws the path). Its public members are
// called from any thread (the pools' loop threads, exit); they hand requests
// to the relay thread through a queue and an eventfd that wakes it.
#pragma once

#include <coproc/mpi.hpp>
#include <coproc/placement.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace coproc::mpi::detail {

class relay {
public:
    // The relay of this process, started on first use (it waits up to
    // `start_timeout` for the agents); throws coproc::error if it cannot start.
    static relay& get(std::chrono::milliseconds start_timeout);
    // At exit: tells every agent to stop and finalizes MPI, starting MPI
    // first if no relay ever ran (the agents wait for rank 0 in MPI_Init).
    static void stop_at_exit();

    // Every agent, a lost one marked so.
    [[nodiscard]] std::vector<rank_info> agents() const;
    [[nodiscard]] bool lost(int rank) const;
    // How long an agent may stay silent before it counts as lost (0: never);
    // the job's setting, the latest call's.
    void set_agent_timeout(std::chrono::milliseconds timeout);

    // A worker on `rank`: the pool's socket and the exit event for it.
    worker_placement::started start(int rank, const std::string& host, const std::string& program,
                                    const std::vector<std::string>& environment);
    worker_placement::exit_status exit(std::uint32_t slot);
    void signal(std::uint32_t slot, int number);
    void release(std::uint32_t slot);
    [[nodiscard]] std::size_t held() const;

    relay(const relay&) = delete;
    relay& operator=(const relay&) = delete;
    ~relay();

private:
    relay() = default;
    void run(std::chrono::milliseconds start_timeout);
    // False once the relay stopped (the request is dropped).
    bool post(std::function<void()> request);
    void stop();

    struct state;
    std::unique_ptr<state> state_;
    std::vector<rank_info> agents_; // written once, before `started`; `lost` under the state's mutex
    std::atomic<std::size_t> held_{0}; // remotes, as the relay thread last counted them
    std::thread thread_;
};

} // namespace coproc::mpi::detail

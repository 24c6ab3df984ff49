// coproc::mpi::placement (coproc/mpi.hpp): the worker_placement that puts a
// pool's remote workers on the agents of an MPI job, and the launch hook
// that makes every rank but 0 an agent.

#include "mpi_relay.hpp"

#include <coproc/error.hpp>
#include <coproc/mpi.hpp>
#include <coproc/worker.hpp>

#include <cerrno>
#include <cstdlib>
#include <map>
#include <mutex>
#include <system_error>
#include <utility>

namespace coproc::mpi {

namespace detail {
[[noreturn]] void run_agent(); // mpi_agent.cpp
} // namespace detail

namespace {

// The launcher's word on this process's place in the job, read before MPI
// starts (Open MPI's mpiexec, then PMIx, then other PMI launchers).
int from_environment(const char* const* names, int fallback) noexcept {
    for (const char* const* name = names; *name != nullptr; ++name) {
        if (const char* value = std::getenv(*name); value != nullptr && *value != '\0') return std::atoi(value);
    }
    return fallback;
}

// Placement of workers on the agents: the one with the most free slots.
class mpi_placement final : public worker_placement {
public:
    mpi_placement(detail::relay& relay, const placement_options& options) : relay_(relay) {
        for (const auto& agent : relay.agents()) {
            if (agent.lost) continue;
            const std::size_t offered = options.workers_per_rank > 0 ? options.workers_per_rank : agent.cpus;
            ranks_.push_back({agent.rank, agent.host + " (rank " + std::to_string(agent.rank) + ")", offered, 0});
            slots_ += offered;
        }
    }

    ~mpi_placement() override {
        std::lock_guard lock{mutex_};
        for (const auto& [slot, rank] : live_) relay_.release(slot);
    }

    [[nodiscard]] std::size_t slots() const override { return slots_; }

    started start(const std::string& program, const std::vector<std::string>& environment) override {
        std::lock_guard lock{mutex_};
        if (ranks_.empty()) throw error("coproc: coproc::mpi::placement() has no agent to start a worker on");
        const auto free = [](const rank_slots& r) {
            return static_cast<long long>(r.capacity) - static_cast<long long>(r.live);
        };
        rank_slots* best = nullptr;
        std::string lost;
        for (auto& rank : ranks_) {
            if (relay_.lost(rank.rank)) {
                lost += (lost.empty() ? "" : ", ") + rank.name;
                continue;
            }
            if (best == nullptr || free(rank) > free(*best)) best = &rank;
        }
        // Without lost agents, a start beyond the slots (a worker counted
        // until the pool released it) goes to the least loaded agent; with
        // some lost, the pool does not crowd their workers onto the others.
        if (best == nullptr || (!lost.empty() && free(*best) <= 0)) {
            throw std::system_error(EHOSTDOWN, std::system_category(),
                                    best == nullptr ? "coproc: every MPI agent was lost (" + lost + ")"
                                                    : "coproc: every slot of the MPI agents left is taken (lost: " + lost + ")");
        }
        auto started = relay_.start(best->rank, best->name, program, environment);
        ++best->live;
        live_.emplace(static_cast<std::uint32_t>(started.handle), best->rank);
        return started;
    }

    exit_status exit(std::uint64_t handle) override { return relay_.exit(static_cast<std::uint32_t>(handle)); }

    void signal(std::uint64_t handle, int number) noexcept override {
        try {
            relay_.signal(static_cast<std::uint32_t>(handle), number);
        } catch (...) {
            // Out of memory: the worker lives on until the pool's end.
        }
    }

    void release(std::uint64_t handle) noexcept override {
        std::lock_guard lock{mutex_};
        const auto found = live_.find(static_cast<std::uint32_t>(handle));
        if (found == live_.end()) return;
        for (auto& rank : ranks_) {
            if (rank.rank == found->second) --rank.live;
        }
        live_.erase(found);
        try {
            relay_.release(static_cast<std::uint32_t>(handle));
        } catch (...) {
        }
    }

private:
    struct rank_slots {
        int rank;
        std::string name;
        std::size_t capacity;
        std::size_t live;
    };
    detail::relay& relay_;
    std::mutex mutex_;
    std::vector<rank_slots> ranks_;
    std::map<std::uint32_t, int> live_; // handle -> rank
    std::size_t slots_ = 0;
};

// No MPI job: nothing to place.
class no_placement final : public worker_placement {
public:
    [[nodiscard]] std::size_t slots() const override { return 0; }
    started start(const std::string&, const std::vector<std::string>&) override {
        throw error("coproc: coproc::mpi::placement() outside an MPI job has no slots");
    }
    exit_status exit(std::uint64_t) override { return {}; }
    void signal(std::uint64_t, int) noexcept override {}
    void release(std::uint64_t) noexcept override {}
};

void launch(int, char**) {
    if (size() <= 1) return;
    if (rank() != 0) detail::run_agent();
    // Rank 0 runs main; at its exit the agents are let go and MPI ends.
    std::atexit([] { detail::relay::stop_at_exit(); });
}

const bool hook_set = [] {
    coproc::detail::set_launch_hook(&launch);
    return true;
}();

} // namespace

int rank() noexcept {
    static const char* const names[] = {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", nullptr};
    return from_environment(names, 0);
}

int size() noexcept {
    static const char* const names[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", nullptr};
    return from_environment(names, 1);
}

std::shared_ptr<worker_placement> placement(placement_options options) {
    (void)hook_set;
    if (size() <= 1) return std::make_shared<no_placement>();
    if (rank() != 0) throw error("coproc: coproc::mpi::placement() on rank " + std::to_string(rank()) + "; only rank 0 runs main");
    auto& relay = detail::relay::get(options.start_timeout);
    relay.set_agent_timeout(options.agent_timeout);
    return std::make_shared<mpi_placement>(relay, options);
}

std::size_t detail::relay_workers() {
    if (size() <= 1 || rank() != 0) return 0;
    return relay::get(placement_options{}.start_timeout).held();
}

std::vector<rank_info> agents() {
    if (size() <= 1 || rank() != 0) return {};
    return detail::relay::get(placement_options{}.start_timeout).agents();
}

} // namespace coproc::mpi

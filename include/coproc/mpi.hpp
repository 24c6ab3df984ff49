// coproc/mpi.hpp - workers on the other hosts of an MPI job (library
// coproc_mpi, built with -Dmpi; the core library never needs MPI).
//
// Launched as `mpiexec -n N ./app`, rank 0 runs main and every other rank
// becomes a host agent inside run_worker_if_requested (which main already
// calls first): it starts workers of the program on its host with
// posix_spawn and relays their frames to rank 0 over MPI. A pool on rank 0
// gets them with one option:
//
//     int main(int argc, char** argv) {
//         coproc::run_worker_if_requested(argc, argv); // ranks 1..N-1 serve here
//         coproc::event_loop loop;
//         coproc::process_pool pool{loop, {.placement = coproc::mpi::placement()}};
//         ...
//
// A crashing task kills its worker, not its rank: the future fails with
// worker_died naming the pid, the signal and the host, and the agent starts
// another worker when one is needed. MPI calls happen on one thread of rank 0
// (and of each agent), which sleeps in poll(2) when idle: a frame that
// arrives over MPI after a quiet spell waits up to 1 ms to be seen.
//
// Without mpiexec (no rank in the environment), placement() offers no slots
// and the pool runs its local workers only.
#pragma once

#include <coproc/placement.hpp>

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace coproc::mpi {

struct placement_options {
    // Workers per agent rank at most; 0: as many as the CPUs the agent may
    // run on (sched_getaffinity on its host).
    std::size_t workers_per_rank = 0;
    // How long to wait for every agent to report at the first placement().
    std::chrono::milliseconds start_timeout{60'000};
    // How long rank 0 may hear nothing from an agent before it counts it as
    // lost (each agent sends a heartbeat every agent_timeout / 5, at most
    // every second): the tasks its workers were running fail with
    // worker_died ("was lost with its host agent (rank N): ..."), and so
    // do those sent there but not known to have started (their START may be
    // lost with the agent; a task never runs twice); no worker is started
    // there again. An agent that hears nothing from rank 0 for as long
    // kills its workers and ends (so a rank 0 held in a debugger loses its
    // agents: set 0 when debugging). 0: never. One setting for the whole job:
    // each placement() call sets it. Only under `mpiexec --enable-recovery`
    // does the job outlive a lost agent (README, "Beyond one machine").
    std::chrono::milliseconds agent_timeout{10'000};
};

// The workers of the other ranks of this MPI job (rank 0 only). The first
// call starts the MPI thread (MPI_Init_thread on it) and waits for every
// agent; MPI_Finalize runs at exit, after the agents were told to stop.
// Throws coproc::error when called on another rank or when an agent does not
// report in time.
std::shared_ptr<worker_placement> placement(placement_options options = {});

// One rank of the job as rank 0 sees it.
struct rank_info {
    int rank = 0;
    std::string host;
    std::size_t cpus = 0; // what its agent offers
    bool lost = false;    // its agent stopped answering (placement_options::agent_timeout)
};

// The job: this process's rank and size (from the launcher's environment:
// rank 0 of 1 without mpiexec), and, once placement() ran, every agent.
int rank() noexcept;
int size() noexcept;
std::vector<rank_info> agents();

namespace detail {
// How many remote workers rank 0's relay still holds (started and not yet
// both exited and released): 0 once every pool let go of its workers. For
// tests and diagnostics.
std::size_t relay_workers();
} // namespace detail

} // namespace coproc::mpi

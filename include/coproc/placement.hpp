// coproc/placement.hpp - workers beyond the local ones.
//
// A process_pool starts its own workers with posix_spawn on this machine.
// With process_pool_options::placement set, it can also run workers that a
// worker_placement starts elsewhere: coproc::mpi::placement() (coproc/mpi.hpp,
// library coproc_mpi) starts them on the other ranks of an MPI job. The pool
// then uses up to max_workers local workers plus placement->slots() remote
// ones; the scheduler treats both alike.
//
// A remote worker speaks the worker protocol over a local socket whose other
// end the placement relays to it; its exit is announced on a descriptor that
// polls readable, as a pidfd does for a local worker. Every member is called
// on the pool's loop thread; an implementation does its own work on a thread
// of its own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace coproc {

class worker_placement {
public:
    // A worker being started elsewhere.
    struct started {
        int socket = -1;       // the pool's end of the worker's frames (the pool closes it)
        int exit_event = -1;   // polls readable once the worker has exited (the placement owns it)
        std::uint64_t handle = 0;
        std::string host;      // where it runs, for errors: "host (rank 2)"
    };
    // How a remote worker ended.
    struct exit_status {
        int pid = 0;           // its pid on its host; 0 if it never started
        bool exited = false;   // true: `status` is an exit code; false: a signal number
        int status = 0;
        std::string reason;    // why, when the worker could not be started or its host was lost; else empty
        // The errno of a start that failed (posix_spawn, socketpair), else 0.
        // A passing shortage (EAGAIN, ENOMEM, EMFILE, ENFILE, ENOBUFS) makes
        // the pool back off and retry, as for a local worker; any other
        // counts against the program (a missing program breaks the pool).
        int start_error = 0;
        // The worker was lost with its host (the host, or what relayed its
        // frames, stopped answering): not the program's failure, so it
        // never counts against the program's start-up.
        bool host_lost = false;
    };

    worker_placement() = default;
    worker_placement(const worker_placement&) = delete;
    worker_placement& operator=(const worker_placement&) = delete;
    virtual ~worker_placement() = default;

    // How many workers it can run at once, over all its hosts.
    [[nodiscard]] virtual std::size_t slots() const = 0;
    // Starts a worker of `program` (empty: the program that runs on that
    // host, re-executed in worker mode), with `environment` ("NAME=value"),
    // on the host with the most free slots. Throws std::system_error when no
    // host can take a worker now (the pool backs off and tries again later,
    // or fails the queued tasks if it has no worker at all); anything else
    // it throws breaks the pool.
    virtual started start(const std::string& program, const std::vector<std::string>& environment) = 0;
    // Once exit_event polls readable: how the worker ended.
    virtual exit_status exit(std::uint64_t handle) = 0;
    // Sends `signal` to the worker (SIGKILL, SIGTERM).
    virtual void signal(std::uint64_t handle, int signal) noexcept = 0;
    // The pool forgets the worker: the placement kills it if it still runs
    // and frees what it held for it, exit_event included.
    virtual void release(std::uint64_t handle) noexcept = 0;
};

} // namespace coproc

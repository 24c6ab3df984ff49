// coproc/worker.hpp - worker mode.
//
// A program that submits to a process_pool calls run_worker_if_requested at
// the top of main. In a worker process it serves the pool and never returns;
// in any other process it returns at once and costs nothing.
//
// A separate worker program (process_pool_options::worker_executable) is a
// main() that calls run_worker_if_requested, plus one COPROC_REGISTER(f)
// line per function it serves, built from the same sources as the parent.
#pragma once

#include <coproc/detail/remote_function.hpp>

namespace coproc {

// In a worker process (started by a process_pool), serves tasks until the
// pool says BYE, its socket closes or the parent dies, then exits the
// process. In a program linked with coproc_mpi and started by mpiexec, every
// rank but 0 serves as a host agent here and exits (coproc/mpi.hpp).
// Otherwise returns.
void run_worker_if_requested(int argc, char** argv);

namespace detail {
// What run_worker_if_requested runs in a process that is not a worker:
// coproc_mpi sets it, at static initialization, to its host agent.
using launch_hook = void (*)(int argc, char** argv);
void set_launch_hook(launch_hook hook) noexcept;

// In a worker: how many large block arguments were received into the memory
// of a result it had sent, and how many bytes of such memory it keeps now.
// For tests and diagnostics.
std::size_t worker_blocks_reused() noexcept;
std::size_t worker_spare_bytes() noexcept;
} // namespace detail

} // namespace coproc

#define COPROC_DETAIL_CONCAT2(a, b) a##b
#define COPROC_DETAIL_CONCAT(a, b) COPROC_DETAIL_CONCAT2(a, b)

// Registers function `f` with the process, so that a worker program serves
// submit<f> calls from a parent built from the same sources. Write it at
// namespace scope, naming f exactly as the parent's submit<f> does.
#define COPROC_REGISTER(f) \
    [[maybe_unused]] static const bool COPROC_DETAIL_CONCAT(coproc_registered_, __COUNTER__) = \
        ::coproc::detail::remote<f>::registered

// Registers a callable object type for submit(object, args...) in a separate
// worker program (the parent's own workers need no registration).
#define COPROC_REGISTER_CALLABLE(T) \
    [[maybe_unused]] static const bool COPROC_DETAIL_CONCAT(coproc_registered_, __COUNTER__) = \
        ::coproc::detail::remote_object<T>::registered

// Registers exception type E to travel from workers to the parent as itself
// instead of as coproc::remote_error. E derives from std::exception, is
// default-constructible and has a serialize(Archive&) member listing its
// state, from which its what() must come. Write it once at namespace scope
// in a source file of the program (and of a separate worker program).
#define COPROC_REGISTER_EXCEPTION(E) \
    [[maybe_unused]] static const bool COPROC_DETAIL_CONCAT(coproc_registered_, __COUNTER__) = \
        ::coproc::detail::remote_exception<E>::registered

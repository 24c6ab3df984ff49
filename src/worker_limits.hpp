// Resource limits in a worker: what it says when the system refuses it a
// thread (the error and the limit that likely applies: RLIMIT_NPROC,
// kernel.threads-max, a cgroup's pids.max; RLIMIT_AS or memory.max for a
// stack, with the values in force), and the hard memory limit a pool may
// set on its workers. Private to src/.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>

namespace coproc::detail {

// The line a worker prints on stderr when std::thread could not start its
// `thread`: the error, the limit that likely applies, and `consequence`.
std::string describe_thread_failure(std::string_view thread, const std::system_error& error, std::string_view consequence);

// process_pool_options::worker_address_space_limit, passed by the pool as
// COPROC_ADDRESS_SPACE_LIMIT: sets RLIMIT_AS on this process and returns the
// limit, or 0 when none was asked for or it could not be set (said on
// stderr; so is a sanitizer build, which ignores it).
std::uint64_t apply_address_space_limit();

// The CPUs this process may run on (sched_getaffinity; the online CPUs if
// that fails), at least 1.
int usable_cpus() noexcept;

} // namespace coproc::detail

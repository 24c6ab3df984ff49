// What a worker says when the system refuses it a thread: the error and the
// limit that likely applies (RLIMIT_NPROC, kernel.threads-max, a cgroup's
// pids.max; RLIMIT_AS or memory.max for a stack), with the values in force.
// Private to src/.
#pragma once

#include <string>
#include <string_view>
#include <system_error>

namespace coproc::detail {

// The line a worker prints on stderr when std::thread could not start its
// `thread`: the error, the limit that likely applies, and `consequence`.
std::string describe_thread_failure(std::string_view thread, const std::system_error& error, std::string_view consequence);

} // namespace coproc::detail

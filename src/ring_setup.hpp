// Internal: creating the io_uring instance with the best flags the kernel
// accepts, and turning a failed io_uring_setup(2) into an actionable message.
#pragma once

#include <liburing.h>

#include <span>
#include <string>

namespace coproc::detail {

// Value of /proc/sys/kernel/io_uring_disabled, or -1 when the file does not
// exist (kernels before 6.6) or cannot be read.
int read_io_uring_disabled_sysctl() noexcept;

// The message of coproc::io_uring_unavailable for io_uring_setup failing
// with errno `error`, given the sysctl value above.
std::string describe_io_uring_setup_failure(int error, int disabled_sysctl);

// Flag sets to try, best first; each later one drops what an older kernel
// rejects with EINVAL.
std::span<const unsigned> default_ring_setup_attempts() noexcept;

// Initialises `ring` with the first of `attempts` the kernel accepts, moving
// on only when a set is rejected with EINVAL. Returns 0 and stores the
// accepted flags, or the negative errno of the last failure.
int create_ring(::io_uring& ring, unsigned entries, std::span<const unsigned> attempts, unsigned& accepted_flags) noexcept;

} // namespace coproc::detail

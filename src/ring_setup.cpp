#include "ring_setup.hpp"

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace coproc::detail {

namespace {
constexpr unsigned setup_attempts[] = {
    IORING_SETUP_R_DISABLED | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL |
        IORING_SETUP_CQSIZE,                                                              // Linux 6.1
    IORING_SETUP_R_DISABLED | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL |
        IORING_SETUP_CQSIZE,                                                              // Linux 6.0
    IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_CQSIZE,            // Linux 5.19
    IORING_SETUP_SUBMIT_ALL | IORING_SETUP_CQSIZE,                                        // Linux 5.18
    IORING_SETUP_CQSIZE,                                                                  // Linux 5.5
    0,
};
} // namespace

std::span<const unsigned> default_ring_setup_attempts() noexcept { return setup_attempts; }

int create_ring(::io_uring& ring, unsigned entries, std::span<const unsigned> attempts, unsigned& accepted_flags) noexcept {
    int result = -EINVAL;
    for (unsigned flags : attempts) {
        ::io_uring_params params{};
        // CLAMP: a large `entries` gets the kernel's maximum queue sizes
        // instead of failing every flag set with EINVAL.
        params.flags = (flags & IORING_SETUP_CQSIZE) != 0 ? flags | IORING_SETUP_CLAMP : flags;
        params.cq_entries = entries * 8;
        result = ::io_uring_queue_init_params(entries, &ring, &params);
        if (result == 0) {
            accepted_flags = flags;
            return 0;
        }
        if (result != -EINVAL) return result;
    }
    return result;
}

int read_io_uring_disabled_sysctl() noexcept {
    std::FILE* file = std::fopen("/proc/sys/kernel/io_uring_disabled", "re");
    if (file == nullptr) return -1;
    int value = -1;
    if (std::fscanf(file, "%d", &value) != 1) value = -1;
    std::fclose(file);
    return value;
}

std::string describe_io_uring_setup_failure(int error, int disabled_sysctl) {
    std::string message = "coproc: io_uring is unavailable: io_uring_setup failed with ";
    message += std::strerror(error);
    message += " (errno ";
    message += std::to_string(error);
    message += "). ";
    if (disabled_sysctl == 2) {
        message += "The kernel forbids io_uring for every process (sysctl kernel.io_uring_disabled=2). "
                   "Fix: as root, run 'sysctl -w kernel.io_uring_disabled=0'.";
    } else if (disabled_sysctl == 1 && error == EPERM) {
        message += "The kernel allows io_uring only to privileged processes and members of the group in "
                   "kernel.io_uring_group (sysctl kernel.io_uring_disabled=1). Fix: run as a member of that "
                   "group, or as root run 'sysctl -w kernel.io_uring_disabled=0'.";
    } else if (error == EPERM || error == EACCES) {
        message += "A seccomp filter or security module denied the system call; container runtimes do this "
                   "by default (Docker's default seccomp profile blocks io_uring_setup). Fix: run the "
                   "container with a seccomp profile that allows io_uring_setup, io_uring_enter and "
                   "io_uring_register (for example 'docker run --security-opt seccomp=<profile>'), or outside "
                   "the sandbox.";
    } else if (error == ENOSYS) {
        message += "The kernel has no io_uring (built without CONFIG_IO_URING, older than Linux 5.1), or a "
                   "sandbox hides the system call. coproc needs Linux 5.11 or newer with io_uring enabled; "
                   "Linux 6.1 or newer is best.";
    } else if (error == ENOMEM) {
        message += "The ring's memory could not be allocated or locked; kernels before 5.12 charge it to "
                   "RLIMIT_MEMLOCK. Fix: raise the locked-memory limit ('ulimit -l', LimitMEMLOCK= in a "
                   "systemd unit), or use fewer entries in event_loop_options.";
    } else if (error == EMFILE || error == ENFILE) {
        message += "The process or the system is out of file descriptors. Fix: close descriptors or raise "
                   "'ulimit -n'.";
    } else {
        message += "Fix: check that the kernel is Linux 5.11 or newer and that no sandbox restricts io_uring.";
    }
    return message;
}

} // namespace coproc::detail

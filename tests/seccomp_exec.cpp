// seccomp_exec PROGRAM [ARGS...]: runs PROGRAM with the io_uring system
// calls denied (EPERM), the way Docker's default seccomp profile (Docker 25
// and later) and containerd 2.0's RuntimeDefault deny them. The filter is
// inherited by everything PROGRAM starts (a pool's workers included).
// Checks that the filter works before it runs PROGRAM, so a test that
// passes under it has really run without io_uring.
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <iterator>

namespace {

#if defined(__x86_64__)
constexpr unsigned this_audit_arch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
constexpr unsigned this_audit_arch = AUDIT_ARCH_AARCH64;
#else
#error "add this architecture's AUDIT_ARCH value"
#endif

bool deny_io_uring() {
    constexpr unsigned denied = SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA);
    ::sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(::seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, this_audit_arch, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(::seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 3, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_enter, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_register, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, denied),
    };
    ::sock_fprog program{static_cast<unsigned short>(std::size(filter)), filter};
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return false;
    return ::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &program) == 0;
}

} // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: seccomp_exec PROGRAM [ARGS...]\n");
        return 2;
    }
    if (!deny_io_uring()) {
        std::fprintf(stderr, "seccomp_exec: installing the filter failed: %s\n", std::strerror(errno));
        return 2;
    }
    if (::syscall(__NR_io_uring_setup, 8, nullptr) != -1 || errno != EPERM) {
        std::fprintf(stderr, "seccomp_exec: io_uring_setup is not denied with EPERM under the filter\n");
        return 2;
    }
    ::execv(argv[1], argv + 1);
    std::fprintf(stderr, "seccomp_exec: cannot run %s: %s\n", argv[1], std::strerror(errno));
    return 127;
}

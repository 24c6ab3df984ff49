// io_uring unavailable: the event_loop constructor throws
// coproc::io_uring_unavailable with a message naming the cause and the fix.
// The condition is produced for real: a thread installs a seccomp filter that
// makes io_uring_setup fail (seccomp filters are per thread, so the rest of
// the test process is unaffected), then constructs a loop.
#include "support.hpp"

#include "ring_setup.hpp"

#include <cstddef>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <optional>
#include <string>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <thread>

namespace {

struct attempt {
    bool threw_unavailable = false;
    int cause = 0;
    std::string message;
};

attempt construct_loop_under_filter(int error) {
    attempt result;
    std::thread sandboxed([&] {
        test_support::deny_syscall(__NR_io_uring_setup, error);
        try {
            coproc::event_loop loop;
        } catch (const coproc::io_uring_unavailable& unavailable) {
            result.threw_unavailable = true;
            result.cause = unavailable.cause();
            result.message = unavailable.what();
        }
    });
    sandboxed.join();
    return result;
}

bool contains(const std::string& text, const char* part) { return text.find(part) != std::string::npos; }

} // namespace

TEST_CASE("io_uring_setup denied by seccomp with EPERM: the error names seccomp and the fix") {
    const attempt result = construct_loop_under_filter(EPERM);
    REQUIRE(result.threw_unavailable);
    CHECK(result.cause == EPERM);
    CHECK(contains(result.message, "io_uring_setup"));
    CHECK(contains(result.message, "Operation not permitted"));
    if (coproc::detail::read_io_uring_disabled_sysctl() <= 0) {
        CHECK(contains(result.message, "seccomp"));
        CHECK(contains(result.message, "Fix:"));
    }
}

TEST_CASE("io_uring_setup hidden with ENOSYS: the error names the kernel requirement") {
    const attempt result = construct_loop_under_filter(ENOSYS);
    REQUIRE(result.threw_unavailable);
    CHECK(result.cause == ENOSYS);
    CHECK(contains(result.message, "Linux 5.11"));
}

TEST_CASE("io_uring_setup failing with ENOMEM: the error names the locked-memory limit") {
    const attempt result = construct_loop_under_filter(ENOMEM);
    REQUIRE(result.threw_unavailable);
    CHECK(result.cause == ENOMEM);
    CHECK(contains(result.message, "RLIMIT_MEMLOCK"));
}

TEST_CASE("the message explains kernel.io_uring_disabled when the sysctl forbids io_uring") {
    const std::string all = coproc::detail::describe_io_uring_setup_failure(EPERM, 2);
    CHECK(contains(all, "kernel.io_uring_disabled=2"));
    CHECK(contains(all, "sysctl -w kernel.io_uring_disabled=0"));
    const std::string group = coproc::detail::describe_io_uring_setup_failure(EPERM, 1);
    CHECK(contains(group, "kernel.io_uring_group"));
}

static_assert(std::is_base_of_v<coproc::error, coproc::io_uring_unavailable>);

namespace {
coproc::task<int> sleep_and_answer(coproc::event_loop* loop) {
    co_await loop->sleep_for(std::chrono::milliseconds{1});
    co_return 7;
}
} // namespace

TEST_CASE("the rest of the process keeps io_uring after a sandboxed thread was denied it") {
    REQUIRE(construct_loop_under_filter(EPERM).threw_unavailable);
    coproc::event_loop loop; // throws if the filter had reached this thread
    CHECK(test_support::run_bounded(loop, sleep_and_answer(&loop)) == 7);
}

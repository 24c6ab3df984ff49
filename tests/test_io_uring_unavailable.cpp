// io_uring unavailable: a loop that requires io_uring throws
// coproc::io_uring_unavailable with a message naming the cause and the fix;
// by default the loop falls back to epoll and says why, and the process pool
// works there. The condition is produced for real: a thread installs a
// seccomp filter that makes io_uring_setup fail (seccomp filters are per
// thread, so the rest of the test process is unaffected; workers spawned
// from that thread inherit it), then constructs a loop.
#include "support.hpp"

#include "remote_functions.hpp"
#include "ring_setup.hpp"

#include <cstddef>
#include <cstdlib>
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
            coproc::event_loop loop{coproc::event_loop_options{.backend = coproc::event_loop_backend::io_uring}};
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
    coproc::event_loop loop{coproc::event_loop_options{.backend = coproc::event_loop_backend::io_uring}};
    CHECK(loop.backend().kind == coproc::event_loop_backend::io_uring);
    CHECK(test_support::run_bounded(loop, sleep_and_answer(&loop)) == 7);
}

// --- the fallback to epoll

namespace {

// Denies the io_uring system calls to the calling thread the way Docker's
// default seccomp profile (since Docker 25) and containerd 2.0's
// RuntimeDefault do: EPERM.
void deny_io_uring_like_docker() {
    test_support::deny_syscall(__NR_io_uring_setup, EPERM);
    test_support::deny_syscall(__NR_io_uring_enter, EPERM);
    test_support::deny_syscall(__NR_io_uring_register, EPERM);
}

// Sets an environment variable for the scope (the tests run on one thread).
class scoped_environment {
public:
    scoped_environment(const char* name, const char* value) : name_(name) {
        if (const char* old = std::getenv(name)) old_ = old;
        if (value != nullptr) {
            ::setenv(name, value, 1);
        } else {
            ::unsetenv(name);
        }
    }
    ~scoped_environment() {
        if (old_) {
            ::setenv(name_, old_->c_str(), 1);
        } else {
            ::unsetenv(name_);
        }
    }
    scoped_environment(const scoped_environment&) = delete;
    scoped_environment& operator=(const scoped_environment&) = delete;

private:
    const char* name_;
    std::optional<std::string> old_;
};

struct pool_outcome {
    bool ran = false;
    coproc::event_loop_backend backend = coproc::event_loop_backend::io_uring;
    std::string reason;
    int square = 0;
    bool crash_isolated = false;
    bool cancelled = false;
    int after_crash = 0;
    std::string failure;
};

coproc::task<void> exercise_pool(coproc::event_loop* loop, coproc::process_pool* pool, pool_outcome* outcome) {
    outcome->square = co_await pool->submit<pool_test::square>(12);
    try {
        co_await pool->submit<pool_test::crash_segfault>();
    } catch (const coproc::worker_died&) {
        outcome->crash_isolated = true;
    }
    auto long_task = pool->submit<pool_test::sleep_ms>(60'000);
    co_await loop->sleep_for(std::chrono::milliseconds{200}); // let it start
    long_task.cancel(true);
    try {
        co_await std::move(long_task);
    } catch (const coproc::cancelled_error&) {
        outcome->cancelled = true;
    }
    outcome->after_crash = co_await pool->submit<pool_test::square>(5);
    co_await pool->shutdown();
}

// On a thread of its own that `deny` first sandboxes (its workers inherit
// the filter): a loop made with `options`, a pool of 2 on it, exercise_pool.
template <class Deny>
pool_outcome exercise_pool_in_sandbox(Deny deny, coproc::event_loop_options options) {
    pool_outcome outcome;
    std::thread sandboxed([&] {
        deny();
        try {
            coproc::event_loop loop{options};
            outcome.backend = loop.backend().kind;
            outcome.reason = loop.backend().reason;
            coproc::process_pool pool{loop, {.max_workers = 2}};
            test_support::run_bounded(loop, exercise_pool(&loop, &pool, &outcome), std::chrono::seconds{60});
            outcome.ran = true;
        } catch (const std::exception& e) {
            outcome.failure = e.what();
        }
    });
    sandboxed.join();
    return outcome;
}

} // namespace

TEST_CASE("denied io_uring like Docker's default profile, a default loop runs on epoll, says why, and the pool works") {
    scoped_environment no_override{"COPROC_BACKEND", nullptr};
    const pool_outcome outcome = exercise_pool_in_sandbox(deny_io_uring_like_docker, {});
    INFO(outcome.failure);
    REQUIRE(outcome.ran);
    CHECK(outcome.backend == coproc::event_loop_backend::epoll);
    CHECK(contains(outcome.reason, "io_uring_setup"));
    CHECK(contains(outcome.reason, "Operation not permitted"));
    CHECK(outcome.square == 144);
    CHECK(outcome.crash_isolated);
    CHECK(outcome.cancelled);
    CHECK(outcome.after_crash == 25);
}

// A worker waits for frames in io_uring_enter where it can
// (worker_channel.cpp). A sandbox that lets io_uring_setup through but
// refuses io_uring_enter must leave it waiting in poll instead, not failing
// its first read (which would read as the parent gone).
TEST_CASE("workers denied io_uring_enter alone wait in poll and serve") {
    scoped_environment no_override{"COPROC_BACKEND", nullptr};
    const pool_outcome outcome = exercise_pool_in_sandbox([] { test_support::deny_syscall(__NR_io_uring_enter, EPERM); },
                                                          {.backend = coproc::event_loop_backend::epoll});
    INFO(outcome.failure);
    REQUIRE(outcome.ran);
    CHECK(outcome.square == 144);
    CHECK(outcome.crash_isolated);
    CHECK(outcome.cancelled);
    CHECK(outcome.after_crash == 25);
}

TEST_CASE("COPROC_BACKEND picks the backend of a default loop, and only of a default one") {
    {
        scoped_environment variable{"COPROC_BACKEND", "epoll"};
        coproc::event_loop loop;
        CHECK(loop.backend().kind == coproc::event_loop_backend::epoll);
        CHECK(loop.backend().reason == "requested by COPROC_BACKEND=epoll");
        CHECK_FALSE(loop.features().single_issuer);
        CHECK(test_support::run_bounded(loop, sleep_and_answer(&loop)) == 7);
        coproc::event_loop explicit_loop{coproc::event_loop_options{.backend = coproc::event_loop_backend::io_uring}};
        CHECK(explicit_loop.backend().kind == coproc::event_loop_backend::io_uring);
    }
    {
        scoped_environment variable{"COPROC_BACKEND", "io_uring"};
        coproc::event_loop loop;
        CHECK(loop.backend().kind == coproc::event_loop_backend::io_uring);
        CHECK(loop.backend().reason.empty());
    }
    {
        scoped_environment variable{"COPROC_BACKEND", "kqueue"};
        CHECK_THROWS_AS(coproc::event_loop{}, std::invalid_argument);
    }
    {
        scoped_environment variable{"COPROC_BACKEND", nullptr};
        coproc::event_loop loop{coproc::event_loop_options{.backend = coproc::event_loop_backend::epoll}};
        CHECK(loop.backend().kind == coproc::event_loop_backend::epoll);
        CHECK(loop.backend().reason == "requested by event_loop_options::backend");
        CHECK(std::string(coproc::to_string(loop.backend().kind)) == "epoll");
    }
}

TEST_CASE("COPROC_BACKEND=io_uring where io_uring is denied throws io_uring_unavailable instead of falling back") {
    scoped_environment variable{"COPROC_BACKEND", "io_uring"};
    bool threw = false;
    std::thread sandboxed([&] {
        deny_io_uring_like_docker();
        try {
            coproc::event_loop loop;
        } catch (const coproc::io_uring_unavailable& e) {
            threw = e.cause() == EPERM;
        }
    });
    sandboxed.join();
    CHECK(threw);
}

// A separate, smaller worker program: it serves some of the test functions
// (not pool_test::cube, so that the tests can check the unknown-function
// error) and nothing else.
#include "remote_functions.hpp"

#include <coproc/coproc.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unistd.h>

COPROC_REGISTER(pool_test::square);
COPROC_REGISTER(pool_test::greet);
COPROC_REGISTER(pool_test::worker_pid);

namespace {
coproc::task<int> first_worker_pid(coproc::process_pool* pool) { co_return co_await pool->submit<pool_test::worker_pid>(); }
} // namespace

int main(int argc, char** argv) {
    // Misbehaving workers, for the tests of the pool's defences.
    if (std::getenv("COPROC_TEST_SILENT_WORKER") != nullptr) {
        for (;;) ::pause(); // alive, but never says HELLO
    }
    if (std::getenv("COPROC_TEST_FORGETFUL_WORKER") != nullptr) {
        // main "forgot" run_worker_if_requested and goes on to make a pool.
        coproc::event_loop loop;
        coproc::process_pool pool{loop};
        return 0;
    }
    coproc::run_worker_if_requested(argc, argv);
    if (argc == 2 && std::strcmp(argv[1], "--orphan-test") == 0) {
        // Helper for the parent-death test: become a pool's parent, print
        // the worker's pid, then wait to be killed.
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .worker_executable = "/proc/self/exe"}};
        std::printf("%d\n", loop.run(first_worker_pid(&pool)));
        std::fflush(stdout);
        for (;;) ::pause();
    }
    return 2; // otherwise only ever started by a process_pool
}

// A separate, smaller worker program: it serves some of the test functions
// (not pool_test::cube, so that the tests can check the unknown-function
// error) and nothing else.
#include "remote_functions.hpp"

#include <coproc/worker.hpp>

COPROC_REGISTER(pool_test::square);
COPROC_REGISTER(pool_test::greet);
COPROC_REGISTER(pool_test::worker_pid);

int main(int argc, char** argv) {
    coproc::run_worker_if_requested(argc, argv);
    return 2; // only ever started by a process_pool
}

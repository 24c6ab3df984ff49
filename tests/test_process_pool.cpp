// coproc::process_pool: submit, results, errors, crash isolation, shutdown,
// and no stray processes or descriptors afterwards.
#include "support.hpp"

#include <csignal>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <sys/wait.h>
#include <vector>

using coproc::task;
using namespace test_support;

namespace {

int square(int x) { return x * x; }

std::string greet(std::string name, int times) {
    std::string out;
    for (int i = 0; i < times; ++i) out += "hello " + name + ";";
    return out;
}

task<int> submit_square(coproc::process_pool* pool, int x) { co_return co_await pool->submit<square>(x); }

} // namespace

TEST_CASE("smoke: a function runs in a worker and its value comes back") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    CHECK(run_bounded(loop, submit_square(&pool, 7)) == 49);
}

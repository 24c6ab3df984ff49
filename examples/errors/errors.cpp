// errors: what a task's exception looks like in the parent. Standard
// exception types come back as themselves; any other type arrives as
// coproc::remote_error with its type name, message and the worker's pid.
#include <coproc/coproc.hpp>

#include <cstdio>
#include <stdexcept>
#include <string>

namespace {

struct ledger_mismatch : std::runtime_error {
    using std::runtime_error::runtime_error;
};

double checked_ratio(double numerator, double denominator) {
    if (denominator == 0) throw std::invalid_argument("denominator is zero");
    return numerator / denominator;
}

int reconcile(int account) {
    if (account % 2 == 1) throw ledger_mismatch("account " + std::to_string(account) + " does not balance");
    return account;
}

coproc::task<int> demonstrate(coproc::process_pool* pool) {
    int caught = 0;
    std::printf("ratio: %.2f\n", co_await pool->submit<checked_ratio>(3.0, 4.0));
    try {
        co_await pool->submit<checked_ratio>(1.0, 0.0);
    } catch (const std::invalid_argument& e) {
        std::printf("std::invalid_argument from the worker: %s\n", e.what());
        ++caught;
    }
    try {
        co_await pool->submit<reconcile>(7);
    } catch (const coproc::remote_error& e) {
        std::printf("remote_error: type %s, message '%s', worker %d\n", e.type_name().c_str(), e.message().c_str(), e.pid());
        ++caught;
    }
    std::printf("the pool still serves: reconcile(8) = %d\n", co_await pool->submit<reconcile>(8));
    co_return caught == 2 ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
    coproc::run_worker_if_requested(argc, argv);
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    return loop.run(demonstrate(&pool));
}

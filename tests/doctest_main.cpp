// The main of every test program. It is also the workers' main: a test
// program that submits to a process_pool re-executes itself in worker mode.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <coproc/worker.hpp>

int main(int argc, char** argv) {
    coproc::run_worker_if_requested(argc, argv);
    return doctest::Context(argc, argv).run();
}

// A program outside the coproc tree that uses coproc/asio.hpp, built by
// scripts/check_packaging against coproc as a Meson subproject
// (coproc_asio_dep) when the parent project has Asio.
#include <coproc/asio.hpp>
#include <coproc/coproc.hpp>

#include <asio/bind_executor.hpp>
#include <asio/io_context.hpp>

#include <cstdio>
#include <exception>

int twice(int x) { return 2 * x; }

int main(int argc, char** argv) {
    coproc::run_worker_if_requested(argc, argv);
    asio::io_context io;
    coproc::event_loop loop{coproc::driven_loop_options};
    coproc::process_pool pool{loop, {.max_workers = 1}};
    coproc::asio_driver driver{io, loop};
    int result = 0;
    // The handler runs on its associated executor: bound to io, so that
    // io.run() waits for it (unbound, it would run on asio::system_executor).
    coproc::async_submit<twice>(pool, 21, asio::bind_executor(io, [&](std::exception_ptr error, int value) {
        if (!error) {
            result = value;
            return;
        }
        try {
            std::rethrow_exception(error);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "consumer_asio: %s\n", e.what());
        }
    }));
    io.run();
    std::printf("consumer_asio: %d\n", result);
    return result == 42 ? 0 : 1;
}

// TCP echo server on coproc's event loop, for the runtime echo benchmark.
//
// Usage: echo_server_coproc io_uring|epoll [lifetime_seconds]
// Listens on 127.0.0.1 at a free port, prints "port N", and echoes every
// byte it receives on each connection until the peer closes, one coroutine
// per connection, all on one loop (one thread). Exits after the lifetime
// (default 120 s) by SIGALRM.
#include "echo_common.hpp"

#include <coproc/coproc.hpp>

#include <array>
#include <cstddef>
#include <span>
#include <string_view>

namespace {

coproc::task<void> session(coproc::event_loop* loop, int fd) {
    std::array<std::byte, 4096> buffer;
    try {
        for (;;) {
            const std::size_t received = co_await loop->recv(fd, buffer);
            if (received == 0) break;
            std::size_t sent = 0;
            while (sent < received) {
                sent += co_await loop->send(fd, std::span<const std::byte>(buffer).subspan(sent, received - sent));
            }
        }
    } catch (const std::exception&) {
        // a peer reset ends its session only
    }
    ::close(fd);
}

coproc::task<void> acceptor(coproc::event_loop* loop, int listener) {
    for (;;) {
        const int fd = co_await loop->accept(listener);
        echo_bench::set_nodelay(fd);
        loop->spawn(session(loop, fd));
    }
}

} // namespace

int main(int argc, char** argv) {
    const std::string_view name = argc > 1 ? argv[1] : "io_uring";
    coproc::event_loop_options options;
    if (name == "io_uring") {
        options.backend = coproc::event_loop_backend::io_uring;
    } else if (name == "epoll") {
        options.backend = coproc::event_loop_backend::epoll;
    } else {
        std::fprintf(stderr, "usage: echo_server_coproc io_uring|epoll [lifetime_seconds]\n");
        return 2;
    }
    coproc::event_loop loop(options);
    std::fprintf(stderr, "coproc backend: %s\n", coproc::to_string(loop.backend().kind));
    const int listener = echo_bench::listen_loopback(false);
    echo_bench::bound_lifetime(argc, argv, 2);
    loop.run(acceptor(&loop, listener));
    return 0;
}

// echo: the coproc runtime on its own. A server coroutine echoes lines on one
// end of a socket pair; a client sends lines and checks every reply under a
// deadline; a ticker prints timestamps meanwhile. when_all runs all three.
//
// Build and run: meson setup build && meson compile -C build && build/examples/echo
#include <coproc/coproc.hpp>

#include <chrono>
#include <cstdio>
#include <span>
#include <string>
#include <string_view>
#include <sys/socket.h>
#include <unistd.h>

using namespace std::chrono_literals;

namespace {

std::span<const std::byte> as_bytes(std::string_view text) { return std::as_bytes(std::span{text.data(), text.size()}); }

// Echoes everything received on `fd` until the peer shuts down its side.
coproc::task<std::size_t> serve(coproc::event_loop* loop, int fd) {
    std::byte buffer[4096];
    std::size_t echoed = 0;
    for (;;) {
        const std::size_t received = co_await loop->recv(fd, buffer);
        if (received == 0) break; // peer shut down its writing side
        std::size_t sent = 0;
        while (sent < received) sent += co_await loop->send(fd, std::span{buffer}.subspan(sent, received - sent));
        echoed += received;
    }
    co_await loop->close(fd);
    co_return echoed;
}

// Sends each line and waits, under a deadline, for its echo.
coproc::task<int> talk(coproc::event_loop* loop, int fd, int lines) {
    int matched = 0;
    for (int i = 0; i < lines; ++i) {
        const std::string line = "line " + std::to_string(i) + "\n";
        co_await loop->send(fd, as_bytes(line));
        std::string reply(line.size(), '\0');
        std::size_t got = 0;
        while (got < reply.size()) {
            auto destination = std::as_writable_bytes(std::span{reply}).subspan(got);
            got += co_await coproc::with_timeout(loop->recv(fd, destination), 1s);
        }
        if (reply == line) ++matched;
        co_await loop->sleep_for(2ms);
    }
    ::shutdown(fd, SHUT_WR);
    co_return matched;
}

coproc::task<int> tick(coproc::event_loop* loop, int ticks) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 1; i <= ticks; ++i) {
        co_await loop->sleep_until(start + i * 10ms);
        const auto elapsed = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start);
        std::printf("tick %d at %lld us\n", i, static_cast<long long>(elapsed.count()));
    }
    co_return ticks;
}

coproc::task<int> amain(coproc::event_loop* loop) {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) co_return 1;
    constexpr int lines = 20;
    auto [echoed, matched, ticks] = co_await coproc::when_all(serve(loop, fds[0]), talk(loop, fds[1], lines), tick(loop, 5));
    co_await loop->close(fds[1]);
    std::printf("echoed %zu bytes, %d of %d lines matched, %d ticks\n", echoed, matched, lines, ticks);
    co_return matched == lines ? 0 : 1;
}

} // namespace

int main() {
    coproc::event_loop loop;
    return loop.run(amain(&loop));
}

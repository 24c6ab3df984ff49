// Helpers shared by the tests: socket pairs, byte spans, fd counting, and a
// bound on every loop run so that a hang fails the test instead of stalling it.
#pragma once

#include <coproc/coproc.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <cstddef>
#include <dirent.h>
#include <span>
#include <string>
#include <string_view>
#include <sys/socket.h>
#include <system_error>
#include <unistd.h>
#include <utility>

namespace test_support {

using namespace std::chrono_literals;

// A connected AF_UNIX stream socket pair, closed on destruction.
class socket_pair {
public:
    socket_pair() {
        int fds[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
            throw std::system_error(errno, std::system_category(), "socketpair");
        }
        first_ = fds[0];
        second_ = fds[1];
    }
    ~socket_pair() {
        if (first_ >= 0) ::close(first_);
        if (second_ >= 0) ::close(second_);
    }
    socket_pair(const socket_pair&) = delete;
    socket_pair& operator=(const socket_pair&) = delete;

    [[nodiscard]] int first() const noexcept { return first_; }
    [[nodiscard]] int second() const noexcept { return second_; }
    // Gives up ownership of the first end (for tests that close it themselves).
    int release_first() noexcept { return std::exchange(first_, -1); }

private:
    int first_ = -1;
    int second_ = -1;
};

inline std::span<const std::byte> bytes_of(std::string_view text) noexcept {
    return std::as_bytes(std::span{text.data(), text.size()});
}

inline std::span<std::byte> writable_bytes(std::string& buffer) noexcept {
    return std::as_writable_bytes(std::span{buffer.data(), buffer.size()});
}

// Number of file descriptors this process has open.
inline int count_open_fds() {
    int count = 0;
    DIR* dir = ::opendir("/proc/self/fd");
    REQUIRE(dir != nullptr);
    while (::dirent* entry = ::readdir(dir)) {
        if (entry->d_name[0] != '.') ++count;
    }
    ::closedir(dir);
    return count - 1; // the directory stream's own descriptor
}

// Runs `body` with this process's stderr (descriptor 2, which workers
// inherit) redirected to an anonymous temporary file; returns what was
// written to it.
template <class Body>
std::string capture_stderr(Body body) {
    std::FILE* capture = std::tmpfile();
    REQUIRE(capture != nullptr);
    std::fflush(stderr);
    const int saved = ::dup(STDERR_FILENO);
    ::dup2(::fileno(capture), STDERR_FILENO);
    body();
    std::fflush(stderr);
    ::dup2(saved, STDERR_FILENO);
    ::close(saved);
    std::string text(1 << 16, '\0');
    std::rewind(capture);
    text.resize(std::fread(text.data(), 1, text.size(), capture));
    std::fclose(capture);
    return text;
}

// Runs `body` on `loop`, failing with coproc::timeout_error instead of
// hanging when it takes longer than `limit`.
template <class T>
T run_bounded(coproc::event_loop& loop, coproc::task<T> body, std::chrono::steady_clock::duration limit = 10s) {
    return loop.run(coproc::with_timeout(std::move(body), limit));
}

} // namespace test_support

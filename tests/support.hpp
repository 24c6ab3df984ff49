// Helpers shared by the tests: socket pairs, byte spans, fd counting, and a
// bound on every loop run so that a hang fails the test instead of stalling it.
#pragma once

#include <coproc/coproc.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
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
#include <vector>

namespace test_support {

// doctest_main.cpp: run once before the first case, if a program sets it.
extern void (*before_tests)();
// Set by a case that expects descriptors to close outside its control (an
// MPI connection to a rank it kills): fewer at its end is then no leak.
// The check resets it after each case.
extern bool fewer_descriptors_allowed;

#if defined(__x86_64__)
inline constexpr unsigned this_audit_arch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
inline constexpr unsigned this_audit_arch = AUDIT_ARCH_AARCH64;
#else
#error "add this architecture's AUDIT_ARCH value"
#endif

// Makes system call `number` fail with `error` on the calling thread only
// (seccomp filters are per thread; threads and processes it starts later
// inherit it). Used to produce "the kernel or a sandbox denies X" for real.
inline void deny_syscall(long number, int error) {
    ::sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(::seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, this_audit_arch, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(::seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, static_cast<unsigned>(number), 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (static_cast<unsigned>(error) & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    ::sock_fprog program{static_cast<unsigned short>(std::size(filter)), filter};
    REQUIRE(::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0);
    REQUIRE(::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &program) == 0);
}

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

// The value of a pool future, awaited on the loop.
template <class T>
coproc::task<T> await_future(coproc::future<T> pending) {
    co_return co_await std::move(pending);
}

// The values of pool futures, in order.
template <class T>
coproc::task<std::vector<T>> await_all(std::vector<coproc::future<T>> futures) {
    std::vector<T> values;
    for (auto& pending : futures) values.push_back(co_await std::move(pending));
    co_return values;
}

// Returns once a worker has started the task (its START arrived): a future's
// or a stream's.
template <class Pending>
coproc::task<void> until_running(coproc::event_loop* loop, Pending* pending) {
    while (!pending->running()) co_await loop->sleep_for(std::chrono::milliseconds{1});
}

// A marker file path unique to this test process, removed on destruction.
class marker_file {
public:
    explicit marker_file(const std::string& name)
        : path_(std::filesystem::temp_directory_path() / ("coproc-" + name + "-" + std::to_string(::getpid()))) {
        std::filesystem::remove(path_);
    }
    ~marker_file() { std::filesystem::remove(path_); }
    [[nodiscard]] std::string path() const { return path_.string(); }
    [[nodiscard]] bool exists() const { return std::filesystem::exists(path_); }

private:
    std::filesystem::path path_;
};

// Lets the loop run for `duration`.
inline coproc::task<void> pause_for(coproc::event_loop* loop, std::chrono::milliseconds duration) {
    co_await loop->sleep_for(duration);
}

// A zeroed file of `count` 32-bit run counters, removed on destruction.
class run_counters {
public:
    explicit run_counters(int count)
        : path_(std::filesystem::temp_directory_path() / ("coproc-runs-" + std::to_string(::getpid()))), count_(count) {
        std::ofstream file{path_, std::ios::binary};
        const std::vector<char> zeros(static_cast<std::size_t>(count) * sizeof(std::uint32_t), '\0');
        file.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
    }
    ~run_counters() { std::filesystem::remove(path_); }
    [[nodiscard]] std::string path() const { return path_.string(); }
    [[nodiscard]] std::vector<std::uint32_t> read() const {
        std::vector<std::uint32_t> runs(static_cast<std::size_t>(count_));
        std::ifstream file{path_, std::ios::binary};
        file.read(reinterpret_cast<char*>(runs.data()), static_cast<std::streamsize>(runs.size() * sizeof(std::uint32_t)));
        return runs;
    }

private:
    std::filesystem::path path_;
    int count_;
};

} // namespace test_support

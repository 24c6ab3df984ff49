// What moving a large buffer costs on this machine, without coproc: the
// pieces a 64 MiB echo is made of, each timed on its own (bench/README.md,
// "The 64 MiB echo", adds them up).
//
//   memory_costs [--quick]
//
// Prints one JSON object; each figure is the median over 5 repetitions, in
// milliseconds:
//   fresh_4k_copy_ms     copy into a new malloc block (glibc maps it; 4 KiB
//                        pages, each faulted in and zeroed on first touch)
//   fresh_huge_copy_ms   copy into a new mapping advised MADV_HUGEPAGE
//   reused_copy_ms       copy into a buffer already touched
//   memfd_write_ms       write into a new memfd (shared memory's first use)
//   socket_round_trip_ms to a peer process and back over a socket pair,
//                        both ends' buffers already touched
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;

double median_ms(const std::function<void()>& body) {
    std::vector<double> times;
    for (int i = 0; i < 5; ++i) {
        const auto start = clock_type::now();
        body();
        times.push_back(std::chrono::duration<double, std::milli>(clock_type::now() - start).count());
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

void keep(const void* data) { asm volatile("" : : "r"(data) : "memory"); }

bool transfer(int fd, char* data, std::size_t size, bool sending) {
    std::size_t done = 0;
    while (done < size) {
        const ssize_t n = sending ? ::send(fd, data + done, size - done, MSG_NOSIGNAL) : ::recv(fd, data + done, size - done, 0);
        if (n <= 0) return false;
        done += static_cast<std::size_t>(n);
    }
    return true;
}

} // namespace

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
    const std::size_t size = quick ? (std::size_t{4} << 20) : (std::size_t{64} << 20);
    std::vector<char> source(size, 'x');

    const double fresh_4k = median_ms([&] {
        char* block = static_cast<char*>(std::malloc(size));
        std::memcpy(block, source.data(), size);
        keep(block);
        std::free(block);
    });
    const double fresh_huge = median_ms([&] {
        void* block = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (block == MAP_FAILED) std::exit(1);
        ::madvise(block, size, MADV_HUGEPAGE);
        std::memcpy(block, source.data(), size);
        keep(block);
        ::munmap(block, size);
    });
    std::vector<char> target(size, 'y');
    const double reused = median_ms([&] {
        std::memcpy(target.data(), source.data(), size);
        keep(target.data());
    });
    const double memfd = median_ms([&] {
        const int fd = ::memfd_create("memory_costs", MFD_CLOEXEC);
        if (fd < 0) std::exit(1);
        std::size_t done = 0;
        while (done < size) {
            const ssize_t n = ::write(fd, source.data() + done, size - done);
            if (n <= 0) std::exit(1);
            done += static_cast<std::size_t>(n);
        }
        ::close(fd);
    });

    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return 1;
    const ::pid_t peer = ::fork(); // a bare peer, no exec: this program is not a library user
    if (peer < 0) return 1;
    if (peer == 0) {
        ::close(fds[0]);
        std::vector<char> block(size, 'z');
        while (transfer(fds[1], block.data(), size, false) && transfer(fds[1], block.data(), size, true)) {
        }
        ::_exit(0);
    }
    ::close(fds[1]);
    const double round_trip = median_ms([&] {
        // The peer echoes once it has it all; send and receive concurrently
        // in case it starts early.
        std::size_t sent = 0;
        std::size_t received = 0;
        while (received < size) {
            if (sent < size) {
                const ssize_t n = ::send(fds[0], source.data() + sent, std::min<std::size_t>(size - sent, 1 << 20),
                                         MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n > 0) sent += static_cast<std::size_t>(n);
            }
            const ssize_t n = ::recv(fds[0], target.data() + received, size - received, sent < size ? MSG_DONTWAIT : 0);
            if (n > 0) received += static_cast<std::size_t>(n);
            if (n == 0) std::exit(1);
        }
    });
    ::close(fds[0]);
    ::waitpid(peer, nullptr, 0);

    std::printf("{\"bytes\": %zu, \"fresh_4k_copy_ms\": %.2f, \"fresh_huge_copy_ms\": %.2f, \"reused_copy_ms\": %.2f, "
                "\"memfd_write_ms\": %.2f, \"socket_round_trip_ms\": %.2f}\n",
                size, fresh_4k, fresh_huge, reused, memfd, round_trip);
    return 0;
}

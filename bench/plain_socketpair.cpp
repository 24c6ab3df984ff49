// The physical limit: the same exchanges as the pool's, done directly over a
// socket pair between two processes, with no coproc, no serialization and
// no event loop. Prints one JSON object.
//
//   plain_socketpair [--quick] latency | pipelined | bulk
//
//   latency    one 16-byte message each way, sequentially: p50/p99 (us)
//   pipelined  16-byte messages, 64 in flight: messages/s
//              (both also give the context switches per message of this
//              process and of its peer: voluntary, involuntary)
//   bulk       64 MiB to the peer and back: GiB/s of the first round, and
//              the median of 5 more
//
// The peer is this program again, started with posix_spawn.
#include "switch_counts.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <spawn.h>
#include <string>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

extern char** environ;

namespace {

using clock_type = std::chrono::steady_clock;
constexpr std::size_t message = 16;

bool send_all(int fd, const char* data, std::size_t size) {
    while (size > 0) {
        const ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
        if (n <= 0) return false;
        data += n;
        size -= static_cast<std::size_t>(n);
    }
    return true;
}

bool recv_all(int fd, char* data, std::size_t size) {
    while (size > 0) {
        const ssize_t n = ::recv(fd, data, size, 0);
        if (n <= 0) return false;
        data += n;
        size -= static_cast<std::size_t>(n);
    }
    return true;
}

// The peer: echoes `size`-byte blocks until EOF.
int serve(int fd, std::size_t size) {
    std::vector<char> block(size);
    while (recv_all(fd, block.data(), size)) {
        if (!send_all(fd, block.data(), size)) break;
    }
    return 0;
}

double seconds_since(clock_type::time_point start) { return std::chrono::duration<double>(clock_type::now() - start).count(); }

} // namespace

int main(int argc, char** argv) {
    if (argc == 4 && std::strcmp(argv[1], "--peer") == 0) return serve(std::atoi(argv[2]), std::strtoull(argv[3], nullptr, 10));
    int arg = 1;
    const bool quick = argc > arg && std::strcmp(argv[arg], "--quick") == 0;
    if (quick) ++arg;
    if (argc <= arg) return 2;
    const std::string workload = argv[arg];
    const std::size_t bulk_size = quick ? (1u << 20) : (64u << 20);
    const std::size_t block = workload == "bulk" ? bulk_size : message;

    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) return 1;
    char self[PATH_MAX];
    if (::realpath(argv[0], self) == nullptr) return 1;
    std::string fd_text = std::to_string(fds[1]);
    std::string size_text = std::to_string(block);
    std::string flag = "--peer";
    char* peer_argv[] = {self, flag.data(), fd_text.data(), size_text.data(), nullptr};
    ::pid_t peer = -1;
    if (::posix_spawn(&peer, self, nullptr, nullptr, peer_argv, environ) != 0) return 1;
    ::close(fds[1]);
    const int fd = fds[0];

    if (workload == "latency") {
        const int rounds = quick ? 200 : 20'000;
        std::vector<double> micros;
        char buffer[message] = {};
        for (int i = 0; i < 100; ++i) send_all(fd, buffer, message), recv_all(fd, buffer, message);
        const auto before = bench::switch_snapshot::now();
        for (int i = 0; i < rounds; ++i) {
            const auto start = clock_type::now();
            send_all(fd, buffer, message);
            recv_all(fd, buffer, message);
            micros.push_back(seconds_since(start) * 1e6);
        }
        const std::string switches = bench::switches_json(before, bench::switch_snapshot::now(), rounds, "peer");
        std::sort(micros.begin(), micros.end());
        std::printf("{\"p50_us\": %.3f, \"p99_us\": %.3f, %s}\n", micros[micros.size() / 2], micros[micros.size() * 99 / 100],
                    switches.c_str());
    } else if (workload == "pipelined") {
        const int messages = quick ? 2'000 : 500'000;
        constexpr int window = 64;
        char buffer[message * window] = {};
        const auto before = bench::switch_snapshot::now();
        const auto start = clock_type::now();
        int sent = 0;
        int received = 0;
        while (received < messages) {
            const int batch = std::min(window, messages - sent);
            if (batch > 0) {
                send_all(fd, buffer, message * static_cast<std::size_t>(batch));
                sent += batch;
            }
            const int pending = sent - received;
            recv_all(fd, buffer, message * static_cast<std::size_t>(pending));
            received += pending;
        }
        const double rate = messages / seconds_since(start);
        const std::string switches = bench::switches_json(before, bench::switch_snapshot::now(), messages, "peer");
        std::printf("{\"messages_per_s\": %.1f, %s}\n", rate, switches.c_str());
    } else if (workload == "bulk") {
        // The first round, then 5 more; each receives into a new buffer.
        std::vector<char> data(bulk_size, 'x');
        std::vector<double> rates;
        for (int round = 0; round < 6; ++round) {
            const auto start = clock_type::now();
            // Send and receive concurrently, as the peer echoes while it reads.
            std::size_t sent = 0;
            std::size_t received = 0;
            std::vector<char> back(bulk_size);
            while (received < bulk_size) {
                if (sent < bulk_size) {
                    const ssize_t n = ::send(fd, data.data() + sent, std::min<std::size_t>(bulk_size - sent, 1 << 20), MSG_NOSIGNAL | MSG_DONTWAIT);
                    if (n > 0) sent += static_cast<std::size_t>(n);
                }
                const ssize_t n = ::recv(fd, back.data() + received, bulk_size - received, sent < bulk_size ? MSG_DONTWAIT : 0);
                if (n > 0) received += static_cast<std::size_t>(n);
                if (n == 0) return 1;
            }
            rates.push_back(static_cast<double>(bulk_size) / seconds_since(start) / double(1 << 30));
        }
        const double first = rates.front();
        rates.erase(rates.begin());
        std::sort(rates.begin(), rates.end());
        std::printf("{\"gib_per_s\": %.3f, \"repeat_gib_per_s\": %.3f}\n", first, rates[rates.size() / 2]);
    } else {
        return 2;
    }
    ::shutdown(fd, SHUT_WR);
    ::close(fd);
    ::waitpid(peer, nullptr, 0);
    return 0;
}

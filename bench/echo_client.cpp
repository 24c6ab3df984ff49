// Load client of the TCP echo benchmark: closed loop over N connections to
// 127.0.0.1:port. Each connection sends a message, waits for the whole echo,
// and sends the next. One thread, level-triggered epoll, non-blocking
// sockets; each request's latency is taken from its send to the last byte
// of its echo (steady_clock).
//
// Usage: echo_client port [connections=64] [message_bytes=64] [seconds=3]
//                    [warmup_seconds=0.5] [max_requests=50000000]
// Requests completed during the warm-up are not counted. Bounded by time and
// by count. Prints one JSON line: rps, p50_us, p99_us, requests, seconds,
// and client_cpu, the share of one CPU the client used (near 1: the client
// itself limits the rate).
#include <algorithm>
#include <arpa/inet.h>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <vector>

using clock_type = std::chrono::steady_clock;

namespace {

struct connection {
    int fd = -1;
    std::size_t received = 0;
    clock_type::time_point sent_at;
};

[[noreturn]] void die(const char* what) {
    std::fprintf(stderr, "echo_client: %s: %s\n", what, std::strerror(errno));
    std::exit(1);
}

} // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: echo_client port [connections] [message_bytes] [seconds] [warmup] [max_requests]\n");
        return 2;
    }
    const int port = std::atoi(argv[1]);
    const int connections = argc > 2 ? std::atoi(argv[2]) : 64;
    const std::size_t size = argc > 3 ? static_cast<std::size_t>(std::atol(argv[3])) : 64;
    const double seconds = argc > 4 ? std::atof(argv[4]) : 3.0;
    const double warmup = argc > 5 ? std::atof(argv[5]) : 0.5;
    const long max_requests = argc > 6 ? std::atol(argv[6]) : 50'000'000;

    std::vector<char> message(size, 'x');
    std::vector<char> scratch(size);
    std::vector<connection> conns(static_cast<std::size_t>(connections));
    const int epoll_fd = ::epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd < 0) die("epoll_create1");

    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    address.sin_port = htons(static_cast<std::uint16_t>(port));
    for (int i = 0; i < connections; ++i) {
        connection& c = conns[static_cast<std::size_t>(i)];
        c.fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c.fd < 0) die("socket");
        if (::connect(c.fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) die("connect");
        int one = 1;
        ::setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        epoll_event event{};
        event.events = EPOLLIN;
        event.data.u32 = static_cast<std::uint32_t>(i);
        if (::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, c.fd, &event) != 0) die("epoll_ctl");
    }

    std::vector<float> latencies_us;
    latencies_us.reserve(8'000'000);
    const auto start = clock_type::now();
    const auto measure_from = start + std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double>(warmup));
    const auto stop_at = measure_from + std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double>(seconds));
    // 64-byte messages always fit the socket buffer: a blocking send returns at once.
    for (auto& c : conns) {
        c.sent_at = clock_type::now();
        if (::send(c.fd, message.data(), size, MSG_NOSIGNAL) != static_cast<ssize_t>(size)) die("send");
    }
    long counted = 0;
    clock_type::time_point now = clock_type::now();
    std::vector<epoll_event> events(static_cast<std::size_t>(connections));
    while (now < stop_at && counted < max_requests) {
        const int ready = ::epoll_wait(epoll_fd, events.data(), connections, 100);
        if (ready < 0 && errno != EINTR) die("epoll_wait");
        for (int e = 0; e < ready; ++e) {
            connection& c = conns[events[static_cast<std::size_t>(e)].data.u32];
            const ssize_t n = ::recv(c.fd, scratch.data(), size - c.received, MSG_DONTWAIT);
            if (n == 0) {
                std::fprintf(stderr, "echo_client: server closed a connection\n");
                return 1;
            }
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) continue;
                die("recv");
            }
            c.received += static_cast<std::size_t>(n);
            if (c.received < size) continue;
            now = clock_type::now();
            if (now >= measure_from) {
                latencies_us.push_back(std::chrono::duration<float, std::micro>(now - c.sent_at).count());
                ++counted;
            }
            c.received = 0;
            c.sent_at = now;
            if (::send(c.fd, message.data(), size, MSG_NOSIGNAL) != static_cast<ssize_t>(size)) die("send");
        }
        now = clock_type::now();
    }
    const double elapsed = std::chrono::duration<double>(now - std::max(measure_from, start)).count();
    for (auto& c : conns) ::close(c.fd);
    ::close(epoll_fd);
    if (latencies_us.empty()) {
        std::fprintf(stderr, "echo_client: no request completed\n");
        return 1;
    }
    auto percentile = [&](double p) {
        const std::size_t k = std::min(latencies_us.size() - 1, static_cast<std::size_t>(p * static_cast<double>(latencies_us.size())));
        std::nth_element(latencies_us.begin(), latencies_us.begin() + static_cast<long>(k), latencies_us.end());
        return static_cast<double>(latencies_us[k]);
    };
    rusage usage{};
    ::getrusage(RUSAGE_SELF, &usage);
    const double cpu = static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
                       static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
    const double total = std::chrono::duration<double>(now - start).count();
    const double p50 = percentile(0.50);
    const double p99 = percentile(0.99);
    std::printf("{\"rps\": %.1f, \"p50_us\": %.2f, \"p99_us\": %.2f, \"requests\": %ld, \"seconds\": %.3f, "
                "\"connections\": %d, \"message_bytes\": %zu, \"client_cpu\": %.3f}\n",
                static_cast<double>(counted) / elapsed, p50, p99, counted, elapsed, connections, size, cpu / total);
    return 0;
}

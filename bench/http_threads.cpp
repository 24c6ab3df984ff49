// bench/http_threads: examples/http_server with its work done on an
// asio::thread_pool instead of a coproc process pool, what an Asio user
// would write without coproc: threads, no isolation. The http benchmark
// (bench/http_bench.py) runs both servers side by side.
//
//   GET /fast        answers at once
//   GET /work?n=N    counts the primes below N on a thread of the pool
//   GET /crash       segfaults on a thread of the pool: the whole server dies
//
//   http_threads [--port P] [--workers N]
//
// The HTTP handling (parsing, keep-alive, the response) is the example's, so
// that the two servers differ only in where the work runs. Not here: a client
// that disconnects does not cancel its work (a thread cannot be stopped from
// outside; the computation would have to poll a flag), there is no queue
// bound, and SIGTERM simply exits.
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read_until.hpp>
#include <asio/thread_pool.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <charconv>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace {

// The same function as the example's (less the stop token).
long count_primes(long n) {
    long count = 0;
    for (long candidate = 2; candidate < n; ++candidate) {
        bool prime = true;
        for (long divisor = 2; divisor * divisor <= candidate; ++divisor) {
            if (candidate % divisor == 0) {
                prime = false;
                break;
            }
        }
        count += prime;
    }
    return count;
}

using asio::ip::tcp;
constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);

struct response {
    int status = 200;
    std::string body;
};

const char* reason(int status) {
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    default: return "Internal Server Error";
    }
}

// Runs on a thread of the pool; co_spawn's completion brings the result
// back to the connection's executor (the io_context's thread).
asio::awaitable<long> count_on_pool(long n) { co_return count_primes(n); }

asio::awaitable<int> crash_on_pool() {
    std::raise(SIGSEGV);
    co_return 0;
}

asio::awaitable<response> handle(asio::thread_pool* pool, std::string target) {
    if (target == "/fast") co_return response{200, "fast\n"};
    if (target == "/crash") {
        const int value = co_await asio::co_spawn(*pool, crash_on_pool(), asio::use_awaitable);
        co_return response{200, std::to_string(value) + "\n"};
    }
    constexpr std::string_view work_prefix = "/work?n=";
    if (target.starts_with(work_prefix)) {
        long n = 0;
        const char* first = target.data() + work_prefix.size();
        const char* last = target.data() + target.size();
        const auto [end, parsed] = std::from_chars(first, last, n);
        if (parsed != std::errc{} || end != last || n < 0) co_return response{400, "n must be a number\n"};
        const long count = co_await asio::co_spawn(*pool, count_on_pool(n), asio::use_awaitable);
        co_return response{200, std::to_string(count) + "\n"};
    }
    co_return response{404, "no such page\n"};
}

asio::awaitable<void> serve(asio::thread_pool* pool, tcp::socket socket) {
    std::string buffer;
    for (;;) {
        auto [read_error, header_size] =
            co_await asio::async_read_until(socket, asio::dynamic_buffer(buffer), "\r\n\r\n", use_tuple);
        if (read_error) break;
        const std::string head = buffer.substr(0, header_size);
        buffer.erase(0, header_size);
        const auto first_space = head.find(' ');
        const auto second_space = head.find(' ', first_space + 1);
        const bool close = head.find("Connection: close") != std::string::npos;
        response answer;
        if (head.compare(0, first_space, "GET") != 0 || second_space == std::string::npos) {
            answer = response{400, "only GET is served\n"};
        } else {
            answer = co_await handle(pool, head.substr(first_space + 1, second_space - first_space - 1));
        }
        std::string text = "HTTP/1.1 " + std::to_string(answer.status) + " " + reason(answer.status) +
                           "\r\nContent-Type: text/plain\r\nContent-Length: " + std::to_string(answer.body.size()) +
                           "\r\nConnection: " + (close ? "close" : "keep-alive") + "\r\n\r\n" + answer.body;
        auto [write_error, written] = co_await asio::async_write(socket, asio::buffer(text), use_tuple);
        (void)written;
        if (write_error || close) break;
    }
    std::error_code ignored;
    socket.shutdown(tcp::socket::shutdown_both, ignored);
}

asio::awaitable<void> accept_connections(tcp::acceptor* acceptor, asio::thread_pool* pool) {
    for (;;) {
        auto [error, socket] = co_await acceptor->async_accept(use_tuple);
        if (error) break;
        asio::co_spawn(acceptor->get_executor(), serve(pool, std::move(socket)), asio::detached);
    }
}

int option(int argc, char** argv, std::string_view name, int fallback) {
    for (int i = 1; i + 1 < argc; ++i) {
        if (argv[i] == name) return std::atoi(argv[i + 1]);
    }
    return fallback;
}

} // namespace

int main(int argc, char** argv) {
    const int port = option(argc, argv, "--port", 0);
    const int workers = option(argc, argv, "--workers", 2);
    asio::io_context io;
    asio::thread_pool pool{static_cast<std::size_t>(workers)};
    tcp::acceptor acceptor{io, tcp::endpoint{asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)}};
    asio::co_spawn(io, accept_connections(&acceptor, &pool), asio::detached);
    std::printf("listening on 127.0.0.1:%u\n", static_cast<unsigned>(acceptor.local_endpoint().port()));
    std::fflush(stdout);
    io.run();
    return 0;
}

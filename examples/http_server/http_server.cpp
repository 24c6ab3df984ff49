// examples/http_server: an Asio HTTP/1.1 server (keep-alive) whose CPU-bound
// work runs in a coproc process pool, the server and the pool on one
// thread (coproc::asio_driver).
//
//   GET /fast        answers at once
//   GET /work?n=N    counts the primes below N in a worker process
//   GET /crash       runs a function that segfaults: that request gets 500,
//                    the server serves on
//   GET /stats       the pool's counters, one "name value" per line
//
// A client that disconnects while its /work runs cancels the task. When the
// pool's queue is full (--max-pending), /work answers 503. SIGTERM (or
// SIGINT) stops accepting, lets the requests in flight finish, shuts the
// pool down and exits with 0.
//
//   http_server [--port P] [--workers N] [--max-pending M]
//
// It prints "listening on 127.0.0.1:PORT" once it accepts connections
// (--port 0, the default, picks a free port).
#include <coproc/asio.hpp>
#include <coproc/coproc.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read_until.hpp>
#include <asio/signal_set.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <charconv>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <set>
#include <stop_token>
#include <string>
#include <string_view>

// --- the work, run in worker processes

// The number of primes below `n`, by trial division: CPU-bound on purpose.
// Returns early (with -1) when the task is cancelled.
long count_primes(long n, std::stop_token stop) {
    long count = 0;
    for (long candidate = 2; candidate < n; ++candidate) {
        if ((candidate & 4095) == 0 && stop.stop_requested()) return -1;
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

int crash() {
    std::raise(SIGSEGV);
    return 0;
}

// --- the server

namespace {

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
    case 500: return "Internal Server Error";
    default: return "Service Unavailable";
    }
}

struct connection {
    tcp::socket* socket;
    bool busy = false; // a request is being answered
};

struct server {
    coproc::process_pool* pool = nullptr;
    tcp::acceptor* acceptor = nullptr;
    coproc::asio_driver::hold driving; // the loop is driven between requests too
    std::set<connection*> connections;
    bool stopping = false;
    bool shutdown_started = false;
};

asio::awaitable<void> finish(server* state) {
    auto [error] = co_await coproc::async_shutdown(*state->pool, {.wait = true}, use_tuple);
    if (error) std::fprintf(stderr, "http_server: the pool's shutdown failed\n");
    state->driving.release(); // nothing is left: io_context::run() returns
}

// Once stopping and the last connection is gone: shuts the pool down.
void finish_when_idle(server* state) {
    if (!state->stopping || !state->connections.empty() || state->shutdown_started) return;
    state->shutdown_started = true;
    asio::co_spawn(state->acceptor->get_executor(), finish(state), asio::detached);
}

// Watches a connection while its task runs: a peer that closes (or resets)
// it cancels the task through `cancel`.
struct hangup_watch {
    asio::cancellation_signal cancel;
    bool gone = false;
};

void watch_for_hangup(tcp::socket* socket, std::shared_ptr<hangup_watch> watch) {
    socket->async_wait(tcp::socket::wait_read, [socket, watch](std::error_code ec) {
        if (ec) return; // the task finished first and cancelled the wait
        char byte;
        std::error_code peek_error;
        const std::size_t peeked = socket->receive(asio::buffer(&byte, 1), tcp::socket::message_peek, peek_error);
        if (peek_error || peeked == 0) {
            watch->gone = true;
            watch->cancel.emit(asio::cancellation_type::terminal);
        }
        // Otherwise the client sent its next request early (pipelining):
        // it is still there.
    });
}

asio::awaitable<response> work(server* state, tcp::socket* socket, long n) {
    auto watch = std::make_shared<hangup_watch>();
    watch_for_hangup(socket, watch);
    auto token = asio::bind_cancellation_slot(watch->cancel.slot(), use_tuple);
    auto [error, count] = co_await coproc::async_submit<count_primes>(*state->pool, n, std::move(token));
    socket->cancel(); // ends the watch
    if (watch->gone) co_return response{0, {}};
    if (!error) co_return response{200, std::to_string(count) + "\n"};
    try {
        std::rethrow_exception(error);
    } catch (const coproc::queue_full&) {
        co_return response{503, "busy: the queue is full\n"};
    } catch (const coproc::pool_closed&) {
        co_return response{503, "shutting down\n"};
    } catch (const std::exception& e) {
        co_return response{500, std::string(e.what()) + "\n"};
    }
}

asio::awaitable<response> crash_request(server* state) {
    auto [error, value] = co_await coproc::async_submit<crash>(*state->pool, use_tuple);
    if (!error) co_return response{200, std::to_string(value) + "\n"};
    try {
        std::rethrow_exception(error);
    } catch (const coproc::worker_died& e) {
        co_return response{500, std::string("the worker died: ") + e.what() + "\n"};
    } catch (const std::exception& e) {
        co_return response{500, std::string(e.what()) + "\n"};
    }
}

std::string stats_text(const coproc::process_pool& pool) {
    const auto stats = pool.stats();
    return "workers_alive " + std::to_string(stats.workers_alive) + "\nqueued " + std::to_string(stats.tasks_queued) +
           "\nrunning " + std::to_string(stats.tasks_running) + "\ncompleted " + std::to_string(stats.tasks_completed) +
           "\nfailed " + std::to_string(stats.tasks_failed) + "\ncancelled " + std::to_string(stats.tasks_cancelled) + "\n";
}

asio::awaitable<response> handle(server* state, tcp::socket* socket, std::string target) {
    if (target == "/fast") co_return response{200, "fast\n"};
    if (target == "/stats") co_return response{200, stats_text(*state->pool)};
    if (target == "/crash") co_return co_await crash_request(state);
    constexpr std::string_view work_prefix = "/work?n=";
    if (target.starts_with(work_prefix)) {
        long n = 0;
        const char* first = target.data() + work_prefix.size();
        const char* last = target.data() + target.size();
        const auto [end, parsed] = std::from_chars(first, last, n);
        if (parsed != std::errc{} || end != last || n < 0) co_return response{400, "n must be a number\n"};
        co_return co_await work(state, socket, n);
    }
    co_return response{404, "no such page\n"};
}

asio::awaitable<void> serve(server* state, tcp::socket socket) {
    connection self{&socket};
    state->connections.insert(&self);
    std::string buffer;
    for (;;) {
        auto [read_error, header_size] =
            co_await asio::async_read_until(socket, asio::dynamic_buffer(buffer), "\r\n\r\n", use_tuple);
        if (read_error) break; // closed by the client, or by a SIGTERM while idle
        self.busy = true;
        const std::string head = buffer.substr(0, header_size);
        buffer.erase(0, header_size);
        // "GET /path HTTP/1.1"
        const auto first_space = head.find(' ');
        const auto second_space = head.find(' ', first_space + 1);
        const bool wants_close = head.find("Connection: close") != std::string::npos;
        response answer;
        if (head.compare(0, first_space, "GET") != 0 || second_space == std::string::npos) {
            answer = response{400, "only GET is served\n"};
        } else {
            answer = co_await handle(state, &socket, head.substr(first_space + 1, second_space - first_space - 1));
        }
        if (answer.status == 0) break; // the client went away
        const bool close = wants_close || state->stopping;
        std::string text = "HTTP/1.1 " + std::to_string(answer.status) + " " + reason(answer.status) +
                           "\r\nContent-Type: text/plain\r\nContent-Length: " + std::to_string(answer.body.size()) +
                           "\r\nConnection: " + (close ? "close" : "keep-alive") + "\r\n\r\n" + answer.body;
        auto [write_error, written] = co_await asio::async_write(socket, asio::buffer(text), use_tuple);
        (void)written;
        self.busy = false;
        if (write_error || close) break;
    }
    std::error_code ignored;
    socket.shutdown(tcp::socket::shutdown_both, ignored);
    state->connections.erase(&self);
    finish_when_idle(state);
}

asio::awaitable<void> accept_connections(server* state) {
    for (;;) {
        auto [error, socket] = co_await state->acceptor->async_accept(use_tuple);
        if (error) break; // closed by SIGTERM
        asio::co_spawn(state->acceptor->get_executor(), serve(state, std::move(socket)), asio::detached);
    }
}

void on_signal(server* state) {
    state->stopping = true;
    std::error_code ignored;
    state->acceptor->close(ignored);
    // Idle keep-alive connections end now; busy ones after their answer.
    for (connection* open : state->connections) {
        if (!open->busy) open->socket->cancel(ignored);
    }
    finish_when_idle(state);
}

int option(int argc, char** argv, std::string_view name, int fallback) {
    for (int i = 1; i + 1 < argc; ++i) {
        if (argv[i] == name) return std::atoi(argv[i + 1]);
    }
    return fallback;
}

} // namespace

int main(int argc, char** argv) {
    coproc::run_worker_if_requested(argc, argv);
    const int port = option(argc, argv, "--port", 0);
    const int workers = option(argc, argv, "--workers", 2);
    const int max_pending = option(argc, argv, "--max-pending", 64);

    asio::io_context io;
    coproc::event_loop loop{coproc::driven_loop_options}; // epoll: what an asio_driver drives
    // One task per worker at a time (no prefetch), so that max_pending
    // counts exactly the requests waiting for a worker.
    coproc::process_pool pool{loop, {.max_workers = workers,
                                     .prefetch = 1,
                                     .max_prefetch = 1,
                                     .cancel_grace = std::chrono::milliseconds{500},
                                     .max_pending = static_cast<std::size_t>(max_pending)}};
    coproc::asio_driver driver{io, loop}; // io.run() drives the loop too

    tcp::acceptor acceptor{io, tcp::endpoint{asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)}};
    asio::signal_set signals{io, SIGTERM, SIGINT};
    server state;
    state.pool = &pool;
    state.acceptor = &acceptor;
    state.driving = driver.keep_driving();
    signals.async_wait([&state](std::error_code ec, int) {
        if (!ec) on_signal(&state);
    });
    asio::co_spawn(io, accept_connections(&state), asio::detached);

    std::printf("listening on 127.0.0.1:%u\n", static_cast<unsigned>(acceptor.local_endpoint().port()));
    std::fflush(stdout);
    io.run();
    return 0;
}

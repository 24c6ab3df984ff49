// TCP echo server on standalone Asio (asio::io_context, its epoll reactor,
// one thread, completion handlers), for the runtime echo benchmark.
//
// Usage: echo_server_asio [lifetime_seconds]
// Listens on 127.0.0.1 at a free port, prints "port N", echoes until the
// peer closes. Exits after the lifetime (default 120 s) by SIGALRM.
#include "echo_common.hpp"

#include <asio.hpp>

#include <array>
#include <memory>

namespace {

class session : public std::enable_shared_from_this<session> {
public:
    explicit session(asio::ip::tcp::socket socket) : socket_(std::move(socket)) {}
    void start() { read(); }

private:
    void read() {
        socket_.async_read_some(asio::buffer(buffer_), [self = shared_from_this()](std::error_code error, std::size_t n) {
            if (!error) self->write(n);
        });
    }
    void write(std::size_t n) {
        asio::async_write(socket_, asio::buffer(buffer_.data(), n),
                          [self = shared_from_this()](std::error_code error, std::size_t) {
                              if (!error) self->read();
                          });
    }
    asio::ip::tcp::socket socket_;
    std::array<char, 4096> buffer_;
};

void accept(asio::ip::tcp::acceptor& acceptor) {
    acceptor.async_accept([&acceptor](std::error_code error, asio::ip::tcp::socket socket) {
        if (!error) {
            socket.set_option(asio::ip::tcp::no_delay(true));
            std::make_shared<session>(std::move(socket))->start();
        }
        accept(acceptor);
    });
}

} // namespace

int main(int argc, char** argv) {
    asio::io_context context(1); // one thread: the concurrency hint lets Asio skip locking
    const int fd = echo_bench::listen_loopback(false);
    asio::ip::tcp::acceptor acceptor(context, asio::ip::tcp::v4(), fd);
    echo_bench::bound_lifetime(argc, argv, 1);
    accept(acceptor);
    context.run();
    return 0;
}

// File-descriptor operations of the event loop, each on real descriptors:
// recv/send, read/write with offsets, sendmsg/recvmsg passing an fd with
// SCM_RIGHTS, poll readiness, accept/connect, close, and error reporting.
#include "support.hpp"

#include <arpa/inet.h>
#include <cstring>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <string>
#include <sys/mman.h>
#include <system_error>

using coproc::task;
using namespace test_support;

namespace {

int make_memfd(const char* name) {
    const int fd = ::memfd_create(name, MFD_CLOEXEC);
    REQUIRE(fd >= 0);
    return fd;
}

task<std::string> send_then_receive(coproc::event_loop* loop, int out, int in, std::string message) {
    const std::size_t sent = co_await loop->send(out, bytes_of(message));
    std::string received(message.size(), '\0');
    std::size_t got = 0;
    while (got < sent) got += co_await loop->recv(in, writable_bytes(received).subspan(got));
    co_return received;
}

task<std::string> write_then_read_at(coproc::event_loop* loop, int fd) {
    co_await loop->write(fd, bytes_of("0123456789"), 0);
    co_await loop->write(fd, bytes_of("abc"), 4); // overwrite in the middle
    std::string all(10, '\0');
    const std::size_t got = co_await loop->read(fd, writable_bytes(all), 0);
    all.resize(got);
    std::string tail(3, '\0');
    co_await loop->read(fd, writable_bytes(tail), 7);
    co_return all + "|" + tail;
}

// Sends `passed` over `channel` with SCM_RIGHTS and returns the fd received
// on `peer`.
task<int> pass_fd(coproc::event_loop* loop, int channel, int peer, int passed) {
    char payload = 'F';
    ::iovec out_vec{&payload, 1};
    alignas(::cmsghdr) char out_control[CMSG_SPACE(sizeof(int))]{};
    ::msghdr out{};
    out.msg_iov = &out_vec;
    out.msg_iovlen = 1;
    out.msg_control = out_control;
    out.msg_controllen = sizeof out_control;
    ::cmsghdr* header = CMSG_FIRSTHDR(&out);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(header), &passed, sizeof(int));
    const std::size_t sent = co_await loop->sendmsg(channel, &out);
    REQUIRE(sent == 1);

    char received_payload = 0;
    ::iovec in_vec{&received_payload, 1};
    alignas(::cmsghdr) char in_control[CMSG_SPACE(sizeof(int))]{};
    ::msghdr in{};
    in.msg_iov = &in_vec;
    in.msg_iovlen = 1;
    in.msg_control = in_control;
    in.msg_controllen = sizeof in_control;
    const std::size_t got = co_await loop->recvmsg(peer, &in, MSG_CMSG_CLOEXEC);
    REQUIRE(got == 1);
    CHECK(received_payload == 'F');
    ::cmsghdr* received = CMSG_FIRSTHDR(&in);
    REQUIRE(received != nullptr);
    REQUIRE(received->cmsg_type == SCM_RIGHTS);
    int fd = -1;
    std::memcpy(&fd, CMSG_DATA(received), sizeof(int));
    co_return fd;
}

task<unsigned> poll_for(coproc::event_loop* loop, int fd, unsigned events) { co_return co_await loop->poll(fd, events); }

task<void> send_later(coproc::event_loop* loop, int out) {
    co_await loop->sleep_for(2ms);
    co_await loop->send(out, bytes_of("!"));
}

task<unsigned> poll_after_peer_writes(coproc::event_loop* loop, int fd, int peer) {
    // The poll is in flight before the peer writes; the write completes it.
    auto [events, unused] = co_await coproc::when_all(poll_for(loop, fd, POLLIN), send_later(loop, peer));
    co_return events;
}

task<int> accept_one(coproc::event_loop* loop, int fd, ::sockaddr_in* peer, ::socklen_t* peer_length) {
    co_return co_await loop->accept(fd, reinterpret_cast<::sockaddr*>(peer), peer_length);
}

task<void> connect_to(coproc::event_loop* loop, int fd, ::sockaddr_in to) {
    co_await loop->connect(fd, reinterpret_cast<const ::sockaddr*>(&to), sizeof to);
}

task<std::string> accept_and_connect(coproc::event_loop* loop) {
    const int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(listener >= 0);
    ::sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(listener, reinterpret_cast<::sockaddr*>(&address), sizeof address) == 0);
    REQUIRE(::listen(listener, 4) == 0);
    ::socklen_t length = sizeof address;
    REQUIRE(::getsockname(listener, reinterpret_cast<::sockaddr*>(&address), &length) == 0);

    const int client = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(client >= 0);
    ::sockaddr_in peer{};
    ::socklen_t peer_length = sizeof peer;
    auto [accepted, connected] =
        co_await coproc::when_all(accept_one(loop, listener, &peer, &peer_length), connect_to(loop, client, address));
    (void)connected;
    CHECK(peer.sin_family == AF_INET);
    const std::string echoed = co_await send_then_receive(loop, client, accepted, "over tcp");
    co_await loop->close(accepted);
    co_await loop->close(client);
    co_await loop->close(listener);
    co_return echoed;
}

task<void> recv_on(coproc::event_loop* loop, int fd) {
    std::byte buffer[8];
    co_await loop->recv(fd, buffer);
}

task<void> send_on(coproc::event_loop* loop, int fd) { co_await loop->send(fd, bytes_of("data")); }

task<void> close_on(coproc::event_loop* loop, int fd) { co_await loop->close(fd); }

} // namespace

TEST_CASE("send and recv move bytes across a socket pair in both directions") {
    coproc::event_loop loop;
    socket_pair sockets;
    CHECK(run_bounded(loop, send_then_receive(&loop, sockets.first(), sockets.second(), "ping")) == "ping");
    CHECK(run_bounded(loop, send_then_receive(&loop, sockets.second(), sockets.first(), "pong")) == "pong");
    const std::string large(200'000, 'x');
    CHECK(run_bounded(loop, send_then_receive(&loop, sockets.first(), sockets.second(), large)) == large);
}

TEST_CASE("read and write honour explicit file offsets") {
    coproc::event_loop loop;
    const int fd = make_memfd("coproc-test-rw");
    CHECK(run_bounded(loop, write_then_read_at(&loop, fd)) == "0123abc789|789");
    ::close(fd);
}

TEST_CASE("sendmsg and recvmsg pass a file descriptor with SCM_RIGHTS") {
    coproc::event_loop loop;
    socket_pair sockets;
    const int original = make_memfd("coproc-test-passed");
    REQUIRE(::write(original, "shared", 6) == 6);
    const int received = run_bounded(loop, pass_fd(&loop, sockets.first(), sockets.second(), original));
    REQUIRE(received >= 0);
    CHECK(received != original);
    CHECK((::fcntl(received, F_GETFD) & FD_CLOEXEC) != 0);
    // Both descriptors name the same open file: what one wrote, the other reads.
    char text[7]{};
    CHECK(::pread(received, text, 6, 0) == 6);
    CHECK(std::string(text) == "shared");
    ::close(received);
    ::close(original);
}

TEST_CASE("poll reports readiness: POLLOUT at once, POLLIN once the peer writes") {
    coproc::event_loop loop;
    socket_pair sockets;
    CHECK((run_bounded(loop, poll_for(&loop, sockets.first(), POLLOUT)) & POLLOUT) != 0);
    const unsigned events = run_bounded(loop, poll_after_peer_writes(&loop, sockets.first(), sockets.second()));
    CHECK((events & POLLIN) != 0);
}

TEST_CASE("poll reports POLLHUP when the peer closes") {
    coproc::event_loop loop;
    socket_pair sockets;
    ::close(sockets.release_first());
    CHECK((run_bounded(loop, poll_for(&loop, sockets.second(), POLLIN)) & (POLLHUP | POLLRDHUP | POLLIN)) != 0);
}

TEST_CASE("accept and connect establish a loopback TCP connection") {
    coproc::event_loop loop;
    CHECK(run_bounded(loop, accept_and_connect(&loop)) == "over tcp");
}

TEST_CASE("close through the ring closes the descriptor") {
    coproc::event_loop loop;
    const int fd = make_memfd("coproc-test-close");
    run_bounded(loop, close_on(&loop, fd));
    CHECK(::fcntl(fd, F_GETFD) == -1);
    CHECK(errno == EBADF);
}

TEST_CASE("a failing operation throws std::system_error naming the operation and errno") {
    coproc::event_loop loop;
    SUBCASE("recv on a descriptor that is not open") {
        try {
            run_bounded(loop, recv_on(&loop, 1'000'000));
            FAIL("recv on a bad descriptor did not throw");
        } catch (const std::system_error& error) {
            CHECK(error.code().value() == EBADF);
            CHECK(std::string(error.what()).find("recv") != std::string::npos);
        }
    }
    SUBCASE("send to a closed peer is EPIPE, not SIGPIPE") {
        socket_pair sockets;
        ::close(sockets.release_first());
        try {
            run_bounded(loop, send_on(&loop, sockets.second()));
            FAIL("send to a closed peer did not throw");
        } catch (const std::system_error& error) {
            CHECK(error.code().value() == EPIPE);
            CHECK(std::string(error.what()).find("send") != std::string::npos);
        }
    }
}

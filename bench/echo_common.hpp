// Shared by the TCP echo benchmark servers: a listening socket on
// 127.0.0.1 at a free port (the kernel picks it), announced on stdout as
// "port N", and a lifetime bound so that no server outlives its run.
#pragma once

#include <arpa/inet.h>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

namespace echo_bench {

[[noreturn]] inline void die(const char* what) {
    std::fprintf(stderr, "%s: %s\n", what, std::strerror(errno));
    std::exit(1);
}

// Binds 127.0.0.1:0, listens, prints "port N" and flushes.
inline int listen_loopback(bool nonblocking) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) die("socket");
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    address.sin_port = 0;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) die("bind");
    if (::listen(fd, 1024) != 0) die("listen");
    socklen_t length = sizeof address;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) die("getsockname");
    std::printf("port %d\n", ntohs(address.sin_port));
    std::fflush(stdout);
    return fd;
}

inline void set_nodelay(int fd) {
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// The server dies by SIGALRM (default action) after `seconds`, whatever
// happens to the script that started it.
inline void bound_lifetime(int argc, char** argv, int index) {
    const unsigned seconds = argc > index ? static_cast<unsigned>(std::atoi(argv[index])) : 120;
    ::alarm(seconds > 0 ? seconds : 120);
}

} // namespace echo_bench

// TCP echo server as a plain liburing program (no coproc), for the runtime
// echo benchmark: the lower bound for what an io_uring runtime can do here.
//
// Usage: echo_server_liburing [lifetime_seconds]
// One thread, one ring (SINGLE_ISSUER and DEFER_TASKRUN when the kernel
// accepts them, as coproc asks for), one accept re-armed after each
// connection, and per connection a recv followed by send until all is
// echoed. Listens on 127.0.0.1 at a free port, prints "port N". Exits after
// the lifetime (default 120 s) by SIGALRM.
#include "echo_common.hpp"

#include <liburing.h>

#include <cstdint>

namespace {

struct connection {
    int fd = -1;
    bool sending = false;
    unsigned length = 0; // bytes received, being echoed
    unsigned sent = 0;
    char buffer[4096];
};

io_uring ring;
connection accept_marker; // user_data of the accept

io_uring_sqe* next_sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    if (sqe == nullptr) {
        io_uring_submit(&ring);
        sqe = io_uring_get_sqe(&ring);
    }
    return sqe;
}

void arm_accept(int listener) {
    io_uring_sqe* sqe = next_sqe();
    io_uring_prep_accept(sqe, listener, nullptr, nullptr, SOCK_CLOEXEC);
    io_uring_sqe_set_data(sqe, &accept_marker);
}

void arm_recv(connection* c) {
    c->sending = false;
    io_uring_sqe* sqe = next_sqe();
    io_uring_prep_recv(sqe, c->fd, c->buffer, sizeof c->buffer, 0);
    io_uring_sqe_set_data(sqe, c);
}

void arm_send(connection* c) {
    c->sending = true;
    io_uring_sqe* sqe = next_sqe();
    io_uring_prep_send(sqe, c->fd, c->buffer + c->sent, c->length - c->sent, MSG_NOSIGNAL);
    io_uring_sqe_set_data(sqe, c);
}

} // namespace

int main(int argc, char** argv) {
    const unsigned flags[] = {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_COOP_TASKRUN, 0};
    int status = -1;
    for (unsigned f : flags) {
        io_uring_params params{};
        params.flags = f;
        status = io_uring_queue_init_params(256, &ring, &params);
        if (status == 0) {
            std::fprintf(stderr, "liburing setup flags: 0x%x\n", f);
            break;
        }
    }
    if (status != 0) {
        errno = -status;
        echo_bench::die("io_uring_queue_init_params");
    }
    const int listener = echo_bench::listen_loopback(false);
    echo_bench::bound_lifetime(argc, argv, 1);
    arm_accept(listener);
    for (;;) {
        if (io_uring_submit_and_wait(&ring, 1) < 0 && errno != EINTR) {
            // liburing returns -errno; EINTR/ETIME just loop again
        }
        io_uring_cqe* cqe;
        unsigned head;
        unsigned seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            ++seen;
            auto* c = static_cast<connection*>(io_uring_cqe_get_data(cqe));
            const int result = cqe->res;
            if (c == &accept_marker) {
                if (result >= 0) {
                    auto* fresh = new connection;
                    fresh->fd = result;
                    echo_bench::set_nodelay(result);
                    arm_recv(fresh);
                }
                arm_accept(listener);
            } else if (result <= 0) {
                ::close(c->fd); // end of stream or error: the session ends
                delete c;
            } else if (!c->sending) {
                c->length = static_cast<unsigned>(result);
                c->sent = 0;
                arm_send(c);
            } else {
                c->sent += static_cast<unsigned>(result);
                if (c->sent < c->length) {
                    arm_send(c);
                } else {
                    arm_recv(c);
                }
            }
        }
        io_uring_cq_advance(&ring, seen);
    }
}

// See worker_channel.hpp.
#include "worker_channel.hpp"

#include "descriptor_passing.hpp"

#include <liburing.h>
#include <poll.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <chrono>
#include <cstring>

namespace coproc::detail {

void worker_channel::send(const byte_buffer& frame) {
    auto lock = hold_writes();
    write_all(frame);
}

void worker_channel::write_all(const byte_buffer& frame) {
    std::size_t sent = 0;
    while (sent < frame.size()) {
        const ssize_t n = ::send(fd_, frame.data() + sent, frame.size() - sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) worker_quit(0); // the parent is gone
        sent += static_cast<std::size_t>(n);
    }
}

void worker_channel::send(const outgoing& frames) {
    if (!frames.descriptors.empty()) {
        std::vector<::iovec> parts = wire_parts(frames.bytes, frames.attached);
        if (!frames.start.empty()) {
            parts.insert(parts.begin(), ::iovec{const_cast<std::byte*>(frames.start.data()), frames.start.size()});
        }
        auto lock = hold_writes();
        write_parts(parts.data(), parts.size(), &frames.descriptors);
        return;
    }
    if (frames.attached.empty() && frames.start.empty()) {
        send(frames.bytes);
        return;
    }
    if (frames.attached.empty()) { // a late START and its RESULT: the usual short task
        ::iovec parts[2] = {{const_cast<std::byte*>(frames.start.data()), frames.start.size()},
                            {const_cast<std::byte*>(frames.bytes.data()), frames.bytes.size()}};
        auto lock = hold_writes();
        write_parts(parts, 2);
        return;
    }
    std::vector<::iovec> parts = wire_parts(frames.bytes, frames.attached);
    if (!frames.start.empty()) {
        parts.insert(parts.begin(), ::iovec{const_cast<std::byte*>(frames.start.data()), frames.start.size()});
    }
    auto lock = hold_writes();
    write_parts(parts.data(), parts.size());
}

// With write_mutex_ held: sends parts[0, count) whole (empty ones skipped),
// advancing them as they go; `descriptors` go with the first byte.
void worker_channel::write_parts(::iovec* parts, std::size_t count, const shared_descriptors* descriptors) {
    std::size_t next = 0;
    while (next < count && parts[next].iov_len == 0) ++next;
    descriptor_control control;
    std::vector<int> fds;
    if (descriptors != nullptr) {
        for (const auto& owner : *descriptors) fds.push_back(owner->fd());
    }
    while (next < count) {
        ::msghdr message{};
        message.msg_iov = parts + next;
        message.msg_iovlen = std::min<std::size_t>(count - next, IOV_MAX);
        attach_descriptors(message, control, fds);
        const ssize_t n = ::sendmsg(fd_, &message, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) worker_quit(0); // the parent is gone
        fds.clear(); // they went with these bytes
        auto sent = static_cast<std::size_t>(n);
        while (next < count && (sent > 0 || parts[next].iov_len == 0)) {
            const std::size_t taken = std::min(sent, parts[next].iov_len);
            parts[next].iov_base = static_cast<std::byte*>(parts[next].iov_base) + taken;
            parts[next].iov_len -= taken;
            sent -= taken;
            if (parts[next].iov_len == 0) ++next;
        }
    }
}

// First what the inbox holds, then from the socket. Small reads refill the
// inbox with whatever has arrived, so that a burst of CALLs costs one recv,
// not two per frame; a large payload is received straight into `into`.
bool worker_channel::read_exact(void* into, std::size_t size) {
    auto* bytes = static_cast<std::byte*>(into);
    std::size_t got = std::min(size, inbox_end_ - inbox_begin_);
    if (got > 0) std::memcpy(bytes, inbox_.data() + inbox_begin_, got);
    inbox_begin_ += got;
    while (got < size) {
        const bool direct = size - got >= inbox_capacity;
        ssize_t n;
        if (direct) {
            n = receive(bytes + got, size - got, 0);
        } else {
            n = wait_and_receive(inbox_.data(), inbox_capacity);
        }
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) return false;
        if (direct) {
            got += static_cast<std::size_t>(n);
            continue;
        }
        const std::size_t taken = std::min(size - got, static_cast<std::size_t>(n));
        std::memcpy(bytes + got, inbox_.data(), taken);
        got += taken;
        inbox_begin_ = taken;
        inbox_end_ = static_cast<std::size_t>(n);
    }
    return true;
}

// One recvmsg's message: the bytes into `into`, and room for the
// descriptors that come with them.
struct worker_channel::incoming {
    descriptor_control control;
    ::iovec part;
    ::msghdr message{};
    incoming(void* into, std::size_t size) : part{into, size} {
        message.msg_iov = &part;
        message.msg_iovlen = 1;
        prepare_receive(message, control);
    }
    incoming(const incoming&) = delete;
    incoming& operator=(const incoming&) = delete;
};

// The descriptors that came with a message (a CALL's shared buffers),
// queued for their frame. Too many to receive is a protocol fault.
void worker_channel::keep_descriptors(::msghdr& message) {
    if (!collect_descriptors(message, descriptors_)) {
        std::fprintf(stderr, "coproc worker %d: more descriptors in one message than it can receive\n",
                     static_cast<int>(::getpid()));
        worker_quit(3);
    }
}

// recv, with the descriptors that come with the bytes.
ssize_t worker_channel::receive(void* into, std::size_t size, int flags) {
    incoming in{into, size};
    const ssize_t n = ::recvmsg(fd_, &in.message, flags | MSG_CMSG_CLOEXEC);
    if (n > 0) keep_descriptors(in.message);
    return n;
}

struct worker_channel::receive_ring {
    ::io_uring ring{};
};

void worker_channel::ring_deleter::operator()(receive_ring* ring) const noexcept {
    ::io_uring_queue_exit(&ring->ring);
    delete ring;
}

// Waits for bytes and takes them, in one system call where io_uring can be
// used: a RECVMSG submitted and waited for in one io_uring_enter, where poll
// then recv cost two (bench/README.md, "One system call to wait and
// receive"). io_uring waits as poll does, woken only by bytes to read; a
// recv asleep on the socket would also be woken each time the parent reads
// what this worker sent (the socket's write space), and on one core each
// such wake-up costs two context switches. Without io_uring (denied by a
// sandbox, or a kernel without RECVMSG there): poll, then recv.
ssize_t worker_channel::wait_and_receive(void* into, std::size_t size) {
    if (!ring_tried_) {
        ring_tried_ = true;
        auto ring = std::unique_ptr<receive_ring, ring_deleter>(new receive_ring);
        if (::io_uring_queue_init(2, &ring->ring, 0) == 0) {
            ring_ = std::move(ring);
        } else {
            delete ring.release(); // not initialized: nothing to exit
        }
    }
    // First a short spin (process_pool_options::worker_spin): a CALL that
    // comes within it is taken without sleeping, and so without the wake-up
    // that would follow (bench/README.md, "A short spin before sleeping").
    // Each turn yields the CPU to whatever else is ready to run on it.
    if (spin_.count() > 0) {
        const auto until = std::chrono::steady_clock::now() + spin_;
        do {
            const ssize_t n = receive(into, size, MSG_DONTWAIT);
            if (n >= 0 || (errno != EAGAIN && errno != EINTR)) return n;
            ::sched_yield();
        } while (std::chrono::steady_clock::now() < until);
    }
    if (ring_) {
        incoming in{into, size};
        ::io_uring_sqe* sqe = ::io_uring_get_sqe(&ring_->ring);
        ::io_uring_prep_recvmsg(sqe, fd_, &in.message, MSG_CMSG_CLOEXEC);
        int submitted;
        do {
            submitted = ::io_uring_submit_and_wait(&ring_->ring, 1);
        } while (submitted == -EINTR);
        if (submitted > 0) {
            // In the kernel now: wait for it, whatever it takes (it points
            // into this frame).
            ::io_uring_cqe* cqe = nullptr;
            int waited;
            do {
                waited = ::io_uring_wait_cqe(&ring_->ring, &cqe);
            } while (waited == -EINTR);
            if (waited < 0) {
                std::fprintf(stderr, "coproc worker %d: io_uring_wait_cqe failed (%s)\n", static_cast<int>(::getpid()),
                             std::strerror(-waited));
                worker_quit(3);
            }
            const int result = cqe->res;
            ::io_uring_cqe_seen(&ring_->ring, cqe);
            const bool unsupported = result == -EINVAL || result == -EOPNOTSUPP || result == -ENOSYS ||
                                     result == -EPERM || result == -EACCES;
            if (!unsupported) {
                if (result < 0) {
                    errno = -result;
                    return -1;
                }
                if (result > 0) keep_descriptors(in.message);
                return result;
            }
        }
        // io_uring_enter refused (a sandbox that allows only the setup), or
        // RECVMSG not there: nothing is left in the kernel; poll from now on.
        ring_.reset();
    }
    ::pollfd readable{fd_, POLLIN, 0};
    if (::poll(&readable, 1, -1) < 0 && errno == EINTR) return -1;
    return receive(into, size, MSG_DONTWAIT);
}

bool worker_channel::take_descriptors(std::size_t count, std::vector<int>& into) {
    if (descriptors_.size() < count) return false;
    for (std::size_t i = 0; i < count; ++i) {
        into.push_back(descriptors_.front());
        descriptors_.pop_front();
    }
    return true;
}

bool worker_channel::bytes_waiting() const {
    int waiting = 0;
    return ::ioctl(fd_, FIONREAD, &waiting) == 0 && waiting > 0;
}

} // namespace coproc::detail

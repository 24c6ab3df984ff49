// Descriptors over a Unix socket (SCM_RIGHTS), as both ends of a worker's
// socket pass them: the shared buffers of a frame (coproc/shared_buffer.hpp).
// Private to src/.
//
//   sender:   attach_descriptors(message, control, fds) --sendmsg-->
//   receiver: prepare_receive(message, control) --recvmsg--> collect_descriptors(message, queue)
#pragma once

#include <coproc/shared_buffer.hpp>

#include <sys/socket.h>

#include <cstddef>
#include <cstring>
#include <deque>
#include <span>

namespace coproc::detail {

// Room for the descriptors of one message: the kernel passes at most
// SCM_MAX_FD (253) at a time.
struct descriptor_control {
    alignas(::cmsghdr) std::byte bytes[CMSG_SPACE(max_descriptors_per_frame * sizeof(int))];
};

// Makes `message` carry `fds` (at most max_descriptors_per_frame) in
// `control`, which must outlive the sendmsg.
inline void attach_descriptors(::msghdr& message, descriptor_control& control, std::span<const int> fds) noexcept {
    if (fds.empty()) return;
    message.msg_control = control.bytes;
    message.msg_controllen = CMSG_SPACE(fds.size() * sizeof(int));
    ::cmsghdr* header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
    std::memcpy(CMSG_DATA(header), fds.data(), fds.size() * sizeof(int));
}

// Lets a recvmsg into `message` receive descriptors into `control`.
inline void prepare_receive(::msghdr& message, descriptor_control& control) noexcept {
    message.msg_control = control.bytes;
    message.msg_controllen = sizeof control.bytes;
}

// Appends the descriptors a recvmsg received with `message` to `queue`, in
// order; false when some were dropped for lack of room (MSG_CTRUNC), which
// leaves the queue out of step with the frames.
inline bool collect_descriptors(const ::msghdr& message, std::deque<int>& queue) {
    if (message.msg_controllen > 0) {
        for (const ::cmsghdr* header = CMSG_FIRSTHDR(&message); header != nullptr;
             header = CMSG_NXTHDR(const_cast<::msghdr*>(&message), const_cast<::cmsghdr*>(header))) {
            if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
            const std::size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (std::size_t i = 0; i < count; ++i) {
                int fd = -1;
                std::memcpy(&fd, CMSG_DATA(header) + i * sizeof(int), sizeof fd);
                queue.push_back(fd);
            }
        }
    }
    return (message.msg_flags & MSG_CTRUNC) == 0;
}

} // namespace coproc::detail

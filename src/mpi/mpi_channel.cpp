// The MPI channel, socket queues and back-off shared by rank 0's relay and
// the host agents (mpi_channel.hpp).

#include "mpi_channel.hpp"

#include <coproc/error.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <system_error>

namespace coproc::mpi::detail {

channel::~channel() {
    // Only at exit, after flush(): nothing is left but requests MPI already
    // finished or will never finish (a lost peer).
    for (auto& send : pending_) {
        if (send.request != MPI_REQUEST_NULL) MPI_Request_free(&send.request);
    }
    // Sends to an abandoned rank may still name their buffers inside MPI:
    // those are never freed (the process is ending).
    if (!set_aside_.empty()) {
        static auto* kept = new std::list<pending_send>;
        kept->splice(kept->end(), set_aside_);
    }
}

void channel::abandon(int rank) {
    if (abandoned(rank)) return;
    abandoned_.push_back(rank);
    for (auto it = pending_.begin(); it != pending_.end();) {
        const auto next = std::next(it);
        if (it->destination == rank) {
            pending_bytes_ -= it->bytes.size();
            set_aside_.splice(set_aside_.end(), pending_, it);
        }
        it = next;
    }
}

bool channel::abandoned(int rank) const noexcept {
    return std::find(abandoned_.begin(), abandoned_.end(), rank) != abandoned_.end();
}

void channel::send(int destination, message kind, std::uint32_t slot, std::int64_t a, std::int64_t b,
                   std::span<const std::byte> payload) {
    if (abandoned(destination)) return;
    pending_send& send = pending_.emplace_back();
    send.destination = destination;
    send.quiet = kind == message::heartbeat;
    send.bytes.resize(sizeof(header) + payload.size());
    const header head{static_cast<std::uint32_t>(kind), slot, a, b};
    std::memcpy(send.bytes.data(), &head, sizeof head);
    if (!payload.empty()) std::memcpy(send.bytes.data() + sizeof head, payload.data(), payload.size());
    pending_bytes_ += send.bytes.size();
    const int result = MPI_Isend(send.bytes.data(), static_cast<int>(send.bytes.size()), MPI_BYTE, destination, tag,
                                 comm_, &send.request);
    if (result != MPI_SUCCESS) {
        pending_bytes_ -= send.bytes.size();
        pending_.pop_back();
        throw error("coproc: MPI_Isend to rank " + std::to_string(destination) + " failed (" +
                    std::to_string(result) + ")");
    }
}

std::optional<received> channel::receive() {
    int arrived = 0;
    MPI_Status status{};
    if (MPI_Iprobe(MPI_ANY_SOURCE, tag, comm_, &arrived, &status) != MPI_SUCCESS || arrived == 0) return std::nullopt;
    int count = 0;
    MPI_Get_count(&status, MPI_BYTE, &count);
    std::vector<std::byte> bytes(static_cast<std::size_t>(std::max(count, 0)));
    MPI_Recv(bytes.data(), count, MPI_BYTE, status.MPI_SOURCE, tag, comm_, MPI_STATUS_IGNORE);
    received message;
    message.source = status.MPI_SOURCE;
    if (bytes.size() < sizeof(header)) {
        message.head.kind = 0; // malformed: the caller ignores kind 0
        return message;
    }
    std::memcpy(&message.head, bytes.data(), sizeof(header));
    bytes.erase(bytes.begin(), bytes.begin() + sizeof(header));
    message.payload = std::move(bytes);
    return message;
}

bool channel::progress() {
    bool completed = false;
    for (auto it = pending_.begin(); it != pending_.end();) {
        int done = 0;
        MPI_Test(&it->request, &done, MPI_STATUS_IGNORE);
        if (done == 0) {
            ++it;
            continue;
        }
        pending_bytes_ -= it->bytes.size();
        completed = completed || !it->quiet;
        it = pending_.erase(it);
    }
    return completed;
}

void channel::flush() {
    for (auto& send : pending_) MPI_Wait(&send.request, MPI_STATUS_IGNORE);
    pending_.clear();
    pending_bytes_ = 0;
}

bool socket_queue::write_to(int fd) {
    while (!chunks_.empty()) {
        const auto& chunk = chunks_.front();
        // MSG_NOSIGNAL: a worker that died, or a pool that closed its end,
        // must cost an EPIPE here, not a SIGPIPE that ends the whole rank.
        const ssize_t wrote = ::send(fd, chunk.data() + offset_, chunk.size() - offset_, MSG_NOSIGNAL);
        if (wrote < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
            chunks_.clear();
            offset_ = 0;
            return false;
        }
        offset_ += static_cast<std::size_t>(wrote);
        if (offset_ == chunk.size()) {
            chunks_.pop_front();
            offset_ = 0;
        }
    }
    return true;
}

std::optional<std::span<const std::byte>> read_some(int fd) {
    // One buffer per thread (the MPI thread), reused: allocating and
    // zeroing 1 MiB per read would cost more than a small task's round trip.
    thread_local std::vector<std::byte> buffer(data_chunk);
    for (;;) {
        const ssize_t got = ::read(fd, buffer.data(), buffer.size());
        if (got < 0 && errno == EINTR) continue;
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return std::nullopt;
        return std::span<const std::byte>{buffer.data(), got < 0 ? 0 : static_cast<std::size_t>(got)}; // an error counts as EOF
    }
}

std::chrono::microseconds idle_backoff::timeout() const noexcept {
    using namespace std::chrono;
    const auto quiet = duration_cast<microseconds>(steady_clock::now() - last_);
    if (quiet < milliseconds{2}) return microseconds{0};
    return std::min<microseconds>(microseconds{1000}, quiet / 20);
}

namespace {

// Receives and drops messages until `done` says so or `patience` ran out;
// true if `done` did.
template <class Done>
bool take_until(channel& mpi, std::chrono::milliseconds patience, Done done) {
    const auto deadline = std::chrono::steady_clock::now() + patience;
    for (;;) {
        bool any = false;
        while (auto arrived = mpi.receive()) {
            any = true;
            if (done(*arrived)) return true;
        }
        any = mpi.progress() || any;
        if (std::chrono::steady_clock::now() > deadline) return false;
        if (!any) ::usleep(200);
    }
}

} // namespace

bool leave_job_as_rank_0(channel& mpi, int size, std::chrono::milliseconds patience) {
    // send() drops what is meant for an abandoned rank.
    for (int rank = 1; rank < size; ++rank) mpi.send(rank, message::shutdown, 0);
    std::vector<bool> left(static_cast<std::size_t>(size), false);
    int waiting = 0;
    bool lost = false;
    for (int rank = 1; rank < size; ++rank) {
        if (mpi.abandoned(rank)) {
            left[static_cast<std::size_t>(rank)] = true;
            lost = true;
        } else {
            ++waiting;
        }
    }
    const bool all = waiting == 0 || take_until(mpi, patience, [&](const received& arrived) {
        if (static_cast<message>(arrived.head.kind) == message::left && arrived.source > 0 && arrived.source < size &&
            !left[static_cast<std::size_t>(arrived.source)]) {
            left[static_cast<std::size_t>(arrived.source)] = true;
            --waiting;
        }
        return waiting == 0;
    });
    const bool finalize = all && !lost;
    for (int rank = 1; rank < size; ++rank) mpi.send(rank, message::finalize, 0, finalize ? 0 : 1);
    // Every agent that left takes what rank 0 sent until FINALIZE: these
    // complete. After a missing agent, do not wait on it.
    if (all) mpi.flush();
    return finalize;
}

bool leave_job_as_agent(channel& mpi, std::chrono::milliseconds patience) {
    mpi.send(0, message::left, 0);
    bool finalize = false;
    const bool finalized = take_until(mpi, patience, [&](const received& arrived) {
        if (arrived.source != 0 || static_cast<message>(arrived.head.kind) != message::finalize) return false;
        finalize = arrived.head.a == 0;
        return true;
    });
    // Rank 0 took everything up to LEFT before it said FINALIZE.
    if (finalized) mpi.flush();
    return finalized && finalize;
}

std::vector<std::byte> encode_spawn(const std::string& program, const std::vector<std::string>& environment) {
    std::vector<std::byte> bytes;
    const auto add = [&bytes](const std::string& text) {
        const auto* begin = reinterpret_cast<const std::byte*>(text.data());
        bytes.insert(bytes.end(), begin, begin + text.size());
        bytes.push_back(std::byte{0});
    };
    add(program);
    for (const auto& entry : environment) add(entry);
    return bytes;
}

void decode_spawn(std::span<const std::byte> payload, std::string& program, std::vector<std::string>& environment) {
    std::vector<std::string> parts;
    std::string current;
    for (const std::byte b : payload) {
        if (b == std::byte{0}) {
            parts.push_back(std::move(current));
            current.clear();
        } else {
            current.push_back(static_cast<char>(b));
        }
    }
    if (parts.empty()) return;
    program = std::move(parts.front());
    environment.assign(std::make_move_iterator(parts.begin() + 1), std::make_move_iterator(parts.end()));
}

std::string host_name() {
    char name[256] = {};
    if (::gethostname(name, sizeof name - 1) != 0) return "unknown host";
    return name;
}

} // namespace coproc::mpi::detail

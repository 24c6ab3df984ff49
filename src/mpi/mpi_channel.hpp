// What rank 0's relay (mpi_relay.cpp) and the host agents (mpi_agent.cpp)
// share: the messages between them, one MPI channel that never blocks, the
// bytes queued for a worker's socket, and the idle back-off of the MPI
// thread. Private to src/mpi/.
//
//   rank 0: pool --socket--> relay thread --MPI DATA--> agent --socket--> worker
//                pool <--socket-- relay thread <--MPI DATA-- agent <--socket-- worker
//
// The relay and the agents move the bytes of each worker's socket as they
// come, in order; they never parse frames (the pool and the worker do).
// Every message goes on one tag of one communicator, so that MPI keeps them
// in order between two ranks: an agent's EXITED comes after the last DATA of
// that worker.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <list>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace coproc::mpi::detail {

enum class message : std::uint32_t {
    hello = 1,    // agent -> 0, once: a = CPUs it offers; payload: its host name
    spawn = 2,    // 0 -> agent: start worker `slot`; payload: program, then "NAME=value" entries, each ending in '\0'
    data = 3,     // either way: bytes of worker `slot`'s socket
    signal = 4,   // 0 -> agent: a = signal for worker `slot`
    release = 5,  // 0 -> agent: the pool forgot worker `slot`: kill it if alive, then EXITED as usual
    exited = 6,   // agent -> 0: worker `slot` ended: a = pid (-errno: never started), b = status (below); payload: reason
    shutdown = 7, // 0 -> agent: kill every worker and leave the job
    left = 8,     // agent -> 0: its workers are gone; it sends nothing after this
    finalize = 9, // 0 -> agent: every agent left; rank 0 sends nothing after this; a = 1: do not call MPI_Finalize
    heartbeat = 10, // agent -> 0, every agent_timeout / 5 (at most 1 s); 0 -> agent, the answer: a = agent_timeout in ms (0: none)
};

// exited's b: a signal number, or an exit code with this bit set.
constexpr std::int64_t exit_code_bit = std::int64_t{1} << 32;

struct header {
    std::uint32_t kind = 0;
    std::uint32_t slot = 0;
    std::int64_t a = 0;
    std::int64_t b = 0;
};

struct received {
    int source = 0;
    header head;
    std::vector<std::byte> payload;
};

// The largest DATA message: a socket read of at most this much.
constexpr std::size_t data_chunk = std::size_t{1} << 20;

// Sends without blocking (MPI_Isend, buffers kept until done) and receives
// what has arrived (MPI_Iprobe), on the MPI thread only.
class channel {
public:
    explicit channel(MPI_Comm comm) : comm_(comm) {}
    channel(const channel&) = delete;
    channel& operator=(const channel&) = delete;
    ~channel();

    void send(int destination, message kind, std::uint32_t slot, std::int64_t a = 0, std::int64_t b = 0,
              std::span<const std::byte> payload = {});
    // A message that has arrived, if any.
    std::optional<received> receive();
    // Completes what MPI finished sending; true if anything but a
    // heartbeat completed (a heartbeat must not keep the thread spinning).
    bool progress();
    [[nodiscard]] std::size_t pending_bytes() const noexcept { return pending_bytes_; }
    [[nodiscard]] bool idle() const noexcept { return pending_.empty(); }
    // Waits until every send completed (at shutdown).
    void flush();
    // `rank` is gone: what is still on its way there is set aside (its
    // buffers kept, as MPI may still hold them; never waited for), and
    // later sends to it are dropped.
    void abandon(int rank);
    [[nodiscard]] bool abandoned(int rank) const noexcept;

private:
    struct pending_send {
        MPI_Request request = MPI_REQUEST_NULL;
        int destination = 0;
        bool quiet = false; // a heartbeat
        std::vector<std::byte> bytes;
    };
    MPI_Comm comm_;
    std::list<pending_send> pending_;
    std::list<pending_send> set_aside_; // to abandoned ranks
    std::vector<int> abandoned_;
    std::size_t pending_bytes_ = 0;
};

// Bytes for a non-blocking socket, written as it accepts them.
class socket_queue {
public:
    void push(std::vector<std::byte> bytes) {
        if (!bytes.empty()) chunks_.push_back(std::move(bytes));
    }
    [[nodiscard]] bool empty() const noexcept { return chunks_.empty(); }
    // Writes what the socket takes; false when the socket is gone (EPIPE,
    // never SIGPIPE), after which it holds nothing.
    bool write_to(int fd);

private:
    std::deque<std::vector<std::byte>> chunks_;
    std::size_t offset_ = 0;
};

// Reads what `fd` has, at most data_chunk: the bytes (empty at EOF; valid
// until the thread's next read_some), or nullopt when nothing is there now
// (EAGAIN).
std::optional<std::span<const std::byte>> read_some(int fd);

// How long the MPI thread may sleep in poll(2) before it next asks MPI:
// zero for 2 ms after anything happened (so that a busy pool is served at
// once), then growing to 1 ms (so that an idle one spins no core).
class idle_backoff {
public:
    void active() noexcept { last_ = std::chrono::steady_clock::now(); }
    [[nodiscard]] std::chrono::microseconds timeout() const noexcept;

private:
    std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

// The end of the job, so that no send is left unmatched when MPI_Finalize
// runs (a large DATA in flight would otherwise block its sender forever):
// rank 0 sends SHUTDOWN to every agent and takes whatever arrives until each
// has said LEFT (its last message), then sends FINALIZE (its last); an agent,
// after LEFT, takes whatever arrives until FINALIZE. Each then completes its
// own sends. `patience` bounds the waits for a peer that never answers. A
// rank the channel abandoned is neither told nor waited for.
//
// Both return whether MPI_Finalize may be called. Not after a rank was lost
// or did not answer: Open MPI 4.1's MPI_Finalize waits for every rank of
// the job, a dead one included, for ever. FINALIZE's `a` tells the agents
// so (1: do not finalize); the processes then end without it.
[[nodiscard]] bool leave_job_as_rank_0(channel& mpi, int size, std::chrono::milliseconds patience);
[[nodiscard]] bool leave_job_as_agent(channel& mpi, std::chrono::milliseconds patience);

// The environment entries in a spawn payload, and the program before them.
std::vector<std::byte> encode_spawn(const std::string& program, const std::vector<std::string>& environment);
void decode_spawn(std::span<const std::byte> payload, std::string& program, std::vector<std::string>& environment);

// This host's name.
std::string host_name();

// The tag every message travels on.
constexpr int tag = 17;

} // namespace coproc::mpi::detail

// A host agent: what every rank but 0 of an MPI job becomes inside
// run_worker_if_requested (coproc/mpi.hpp). One thread does everything:
//
//   MPI from rank 0   SPAWN   posix_spawn a worker of the program, socket at fd 3
//                     DATA    bytes for a worker's socket, queued and written as it takes them
//                     SIGNAL  kill(2) the worker (through its pidfd)
//                     RELEASE the pool forgot the worker: SIGKILL it
//                     SHUTDOWN  kill every worker, reap them, leave the job
//                     HEARTBEAT the answer to ours: rank 0's agent_timeout
//   every agent_timeout / 5 (at most every second)   HEARTBEAT to rank 0
//   a worker's socket readable   its bytes to rank 0 as DATA
//   a worker's pidfd readable    reap it, send what is left in its socket,
//                                then EXITED with its pid and status
//
// It sleeps in poll(2) when nothing happens (idle_backoff). The workers die
// with the agent (they set PDEATHSIG); the agent dies with the job, or, if
// rank 0 falls silent for its agent_timeout (or cannot be reached), kills
// its workers and ends by itself.

#include "mpi_channel.hpp"
#include "../worker_limits.hpp"
#include "../worker_process.hpp"

#include <coproc/detail/wire.hpp>
#include <coproc/mpi.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

extern char** environ;

namespace coproc::mpi::detail {

namespace {

using std::chrono::milliseconds;
using namespace std::chrono_literals;

struct local_worker {
    ::pid_t pid = 0;
    int pidfd = -1;
    int socket = -1; // the agent's end, non-blocking
    socket_queue out;
    bool reading = true; // its socket has not reached EOF
};

std::size_t cpus_offered() {
    if (const char* set = std::getenv("COPROC_MPI_WORKERS_PER_RANK"); set != nullptr && std::atoi(set) > 0) {
        return static_cast<std::size_t>(std::atoi(set));
    }
    return static_cast<std::size_t>(coproc::detail::usable_cpus());
}

// The agent's own environment, minus what the pool sets and what only the
// pool's own workers may have, plus the pool's entries and the agent as the
// workers' parent.
std::vector<std::string> worker_environment(const std::vector<std::string>& given) {
    const auto name_of = [](std::string_view entry) { return entry.substr(0, entry.find('=')); };
    std::vector<std::string> result;
    for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
        const std::string_view text{*entry};
        const std::string_view name = name_of(text);
        if (name == "COPROC_PARENT_PID" || name == coproc::detail::wire::start_word_variable) continue;
        bool replaced = false;
        for (const auto& pool_entry : given) replaced = replaced || name_of(pool_entry) == name;
        if (!replaced) result.emplace_back(text);
    }
    result.insert(result.end(), given.begin(), given.end());
    result.push_back("COPROC_PARENT_PID=" + std::to_string(::getpid()));
    return result;
}

class agent {
public:
    agent(MPI_Comm comm) : channel_(comm) {}

    [[noreturn]] void serve() {
        const std::string host = host_name();
        tell(message::hello, 0, static_cast<std::int64_t>(cpus_offered()), 0,
             std::as_bytes(std::span{host.data(), host.size()}));
        while (!stopping_) {
            bool busy = false;
            while (auto arrived = channel_.receive()) {
                // A heartbeat is no reason to stay awake.
                busy = busy || static_cast<message>(arrived->head.kind) != message::heartbeat;
                handle(*arrived);
            }
            const auto now = std::chrono::steady_clock::now();
            if (rank_0_timeout_.value_or(0ms) > 0ms && now - heard_ > *rank_0_timeout_) {
                abandon("rank 0 sent nothing for " + std::to_string(rank_0_timeout_->count()) +
                        " ms (placement_options::agent_timeout)");
            }
            if (now >= next_heartbeat_) {
                tell(message::heartbeat, 0);
                milliseconds every = 100ms; // until rank 0's answer gives its timeout
                if (rank_0_timeout_) {
                    every = *rank_0_timeout_ > 0ms ? std::clamp<milliseconds>(*rank_0_timeout_ / 5, 10ms, 1000ms) : 1000ms;
                }
                next_heartbeat_ = now + every;
            }
            busy = channel_.progress() || busy;
            busy = poll_workers(busy || !channel_.idle()) || busy;
            if (busy) backoff_.active();
        }
        leave();
    }

private:
    // A message to rank 0; if MPI cannot reach it, the job is over for us.
    void tell(message kind, std::uint32_t slot, std::int64_t a = 0, std::int64_t b = 0,
              std::span<const std::byte> payload = {}) {
        try {
            channel_.send(0, kind, slot, a, b, payload);
        } catch (const std::exception& e) {
            abandon(std::string("MPI cannot reach rank 0: ") + e.what());
        }
    }

    void handle(received& arrived) {
        if (arrived.source != 0) return; // only rank 0 gives orders
        heard_ = std::chrono::steady_clock::now();
        const auto slot = arrived.head.slot;
        switch (static_cast<message>(arrived.head.kind)) {
        case message::heartbeat:
            rank_0_timeout_ = milliseconds{std::max<std::int64_t>(0, arrived.head.a)};
            break;
        case message::spawn: spawn(slot, arrived.payload); break;
        case message::data:
            if (auto found = workers_.find(slot); found != workers_.end()) {
                found->second.out.push(std::move(arrived.payload));
                found->second.out.write_to(found->second.socket);
            }
            break;
        case message::signal:
        case message::release:
            if (auto found = workers_.find(slot); found != workers_.end() && found->second.pid > 0) {
                const int number = static_cast<message>(arrived.head.kind) == message::release
                                       ? SIGKILL
                                       : static_cast<int>(arrived.head.a);
                ::kill(found->second.pid, number); // not reaped yet: the pid is still its
            }
            break;
        case message::shutdown: stopping_ = true; break;
        default: break; // a kind an agent does not take: ignored
        }
    }

    void spawn(std::uint32_t slot, std::span<const std::byte> payload) {
        std::string program;
        std::vector<std::string> given;
        decode_spawn(payload, program, given);
        if (program.empty()) program = "/proc/self/exe";
        auto environment = worker_environment(given);
        std::vector<char*> pointers;
        for (auto& entry : environment) pointers.push_back(entry.data());
        pointers.push_back(nullptr);
        int fds[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
            not_started(slot, errno);
            return;
        }
        const std::string shown = program == "/proc/self/exe" ? std::string(::program_invocation_short_name)
                                                              : program.substr(program.rfind('/') + 1);
        ::pid_t pid = -1;
        const int result = coproc::detail::spawn_worker_program(program, "coproc-worker:" + shown, pointers.data(),
                                                                fds[1], -1, pid);
        ::close(fds[1]);
        if (result != 0) {
            ::close(fds[0]);
            not_started(slot, result);
            return;
        }
        ::fcntl(fds[0], F_SETFL, ::fcntl(fds[0], F_GETFL) | O_NONBLOCK);
        local_worker& worker = workers_[slot];
        worker.pid = pid;
        worker.pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
        worker.socket = fds[0];
    }

    void not_started(std::uint32_t slot, int error) {
        const std::string reason = "could not be started on " + host_name() + ": " + std::strerror(error);
        // A negative pid: the errno of the failed start.
        tell(message::exited, slot, -error, exit_code_bit | 127, std::as_bytes(std::span{reason.data(), reason.size()}));
    }

    // Polls the workers' sockets and pidfds; true if anything happened.
    bool poll_workers(bool hurry) {
        std::vector<::pollfd> fds;
        std::vector<std::uint32_t> slots;
        // Stop reading workers while much is still on its way to rank 0.
        const bool room = channel_.pending_bytes() < (std::size_t{64} << 20);
        for (auto& [slot, worker] : workers_) {
            short events = 0;
            if (worker.reading && room) events |= POLLIN;
            if (!worker.out.empty()) events |= POLLOUT;
            fds.push_back({worker.socket, events, 0});
            fds.push_back({worker.pidfd, POLLIN, 0});
            slots.push_back(slot);
        }
        const auto wait = hurry ? std::chrono::microseconds{0} : backoff_.timeout();
        const ::timespec timeout{0, static_cast<long>(wait.count()) * 1000};
        if (::ppoll(fds.data(), fds.size(), &timeout, nullptr) <= 0) {
            return reap_without_pidfd();
        }
        bool busy = false;
        for (std::size_t i = 0; i < slots.size(); ++i) {
            local_worker& worker = workers_[slots[i]];
            const auto socket_events = fds[2 * i].revents;
            if ((socket_events & POLLOUT) != 0) {
                busy = true;
                worker.out.write_to(worker.socket);
            }
            if ((socket_events & (POLLIN | POLLHUP | POLLERR)) != 0 && worker.reading) {
                busy = true;
                forward(slots[i], worker);
            }
            if ((fds[2 * i + 1].revents & POLLIN) != 0) {
                busy = true;
                reap(slots[i]);
            }
        }
        return reap_without_pidfd() || busy;
    }

    // Sends what one read of the worker's socket gives.
    void forward(std::uint32_t slot, local_worker& worker) {
        auto bytes = read_some(worker.socket);
        if (!bytes) return;
        if (bytes->empty()) {
            worker.reading = false;
            return;
        }
        tell(message::data, slot, 0, 0, *bytes);
    }

    // Without a pidfd (a sandbox that hides pidfd_open): waitid each round.
    bool reap_without_pidfd() {
        bool any = false;
        for (auto it = workers_.begin(); it != workers_.end();) {
            const auto slot = it->first;
            ++it;
            if (workers_[slot].pidfd >= 0) continue;
            ::siginfo_t info{};
            if (::waitid(P_PID, static_cast<::id_t>(workers_[slot].pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 &&
                info.si_pid != 0) {
                reap(slot);
                any = true;
            }
        }
        return any;
    }

    // The worker exited: its status, after every byte it wrote.
    void reap(std::uint32_t slot) {
        local_worker& worker = workers_[slot];
        ::siginfo_t info{};
        int result;
        do {
            result = worker.pidfd >= 0
                         ? ::waitid(static_cast<::idtype_t>(P_PIDFD), static_cast<::id_t>(worker.pidfd), &info, WEXITED | WNOHANG)
                         : ::waitid(P_PID, static_cast<::id_t>(worker.pid), &info, WEXITED | WNOHANG);
        } while (result < 0 && errno == EINTR);
        if (result == 0 && info.si_pid == 0) return; // not yet
        const int lost = result < 0 ? errno : 0;     // ECHILD: reaped elsewhere (SIGCHLD ignored)
        // Dead: everything it wrote is in the socket now.
        while (worker.reading) {
            auto bytes = read_some(worker.socket);
            if (!bytes || bytes->empty()) break;
            tell(message::data, slot, 0, 0, *bytes);
        }
        const std::int64_t status = info.si_code == CLD_EXITED ? (exit_code_bit | info.si_status) : info.si_status;
        std::string reason;
        if (lost != 0) reason = "ended on " + host_name() + " with an exit status its agent could not read (" + std::strerror(lost) + ")";
        tell(message::exited, slot, worker.pid, lost != 0 ? SIGKILL : status,
             std::as_bytes(std::span{reason.data(), reason.size()}));
        if (worker.pidfd >= 0) ::close(worker.pidfd);
        ::close(worker.socket);
        workers_.erase(slot);
    }

    void end_workers() {
        for (auto& [slot, worker] : workers_) ::kill(worker.pid, SIGKILL);
        for (auto& [slot, worker] : workers_) {
            ::siginfo_t info{};
            while (::waitid(P_PID, static_cast<::id_t>(worker.pid), &info, WEXITED) < 0 && errno == EINTR) {
            }
            if (worker.pidfd >= 0) ::close(worker.pidfd);
            ::close(worker.socket);
        }
        workers_.clear();
    }

    [[noreturn]] void leave() {
        end_workers();
        if (leave_job_as_agent(channel_, std::chrono::seconds{30})) MPI_Finalize();
        std::exit(0);
    }

    // Rank 0 is gone or unreachable: no handshake is possible, and waiting
    // would keep the workers and the job alive for nothing.
    [[noreturn]] void abandon(const std::string& why) {
        end_workers();
        const std::string line = "coproc: MPI agent on " + host_name() + " (rank " + std::to_string(rank()) +
                                 ") ends with its workers: " + why + "\n";
        [[maybe_unused]] const auto wrote = ::write(STDERR_FILENO, line.data(), line.size());
        std::_Exit(1);
    }

    channel channel_;
    std::map<std::uint32_t, local_worker> workers_;
    idle_backoff backoff_;
    bool stopping_ = false;
    // From rank 0's answers to our heartbeats (none yet: unknown); 0: never
    // give up on rank 0.
    std::optional<milliseconds> rank_0_timeout_;
    std::chrono::steady_clock::time_point heard_ = std::chrono::steady_clock::now();
    std::chrono::steady_clock::time_point next_heartbeat_{};
};

} // namespace

[[noreturn]] void run_agent() {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
    MPI_Comm comm = MPI_COMM_NULL;
    MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN); // a failed send reaches tell(), not MPI's abort
    agent{comm}.serve();
}

} // namespace coproc::mpi::detail

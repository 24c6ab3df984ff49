// Rank 0's relay thread (mpi_relay.hpp). Per remote worker it holds the
// relay's end of the pool's socket pair and the exit event the pool polls:
//
//   pool's socket readable   its bytes to the worker's agent as DATA
//   DATA from the agent      queued for the pool's socket, written as it takes them
//   EXITED from the agent    once the bytes before it are written: the socket
//                            closed (the pool reads EOF), the status kept for
//                            exit(), the exit event signalled
//   a request (start, signal, release) from a pool's loop thread
//   HEARTBEAT from an agent  answered with agent_timeout; an agent silent for
//                            longer is lost: its workers end (the pool's
//                            futures fail), it is sent nothing more and not
//                            waited for at the end of the job

#include "mpi_relay.hpp"
#include "mpi_channel.hpp"

#include <coproc/error.hpp>

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <system_error>
#include <utility>

namespace coproc::mpi::detail {

struct relay::state {
    // Shared with the callers, under `mutex`.
    std::mutex mutex;
    std::condition_variable changed;
    bool started = false;     // the agents reported, or the wait for them failed
    std::string failure;      // why the relay could not start
    bool stopping = false;
    std::vector<std::function<void()>> requests;
    std::map<std::uint32_t, worker_placement::exit_status> exits;
    std::map<int, std::string> lost; // rank -> why
    int wake = -1; // eventfd: requests are waiting
    std::atomic<std::uint32_t> next_slot{0};
    std::atomic<std::int64_t> agent_timeout_ms{placement_options{}.agent_timeout.count()};

    // The relay thread's own.
    struct remote {
        int rank = 0;
        int socket = -1;     // the relay's end, non-blocking; closed once the exit is announced
        int exit_event = -1; // the pool polls it; closed when released after the exit
        socket_queue out;
        bool reading = true;
        bool exited = false;    // EXITED came
        bool announced = false; // ... and was passed on
        bool released = false;
        worker_placement::exit_status status;
    };
    std::map<std::uint32_t, remote> remotes;
    MPI_Comm comm = MPI_COMM_NULL;
    std::unique_ptr<channel> mpi;
    idle_backoff backoff;
    std::map<int, std::chrono::steady_clock::time_point> heard; // each agent's last message
    std::chrono::steady_clock::time_point next_check{};
    bool tell_timeout = false; // agent_timeout changed: tell every agent now

    void send(int rank, message kind, std::uint32_t slot, std::int64_t a = 0, std::int64_t b = 0,
              std::span<const std::byte> payload = {});
    void lose_rank(int rank, const std::string& why);
    [[nodiscard]] worker_placement::exit_status lost_status(int rank, const std::string& why) const;
    void keep_watch(const std::vector<rank_info>& agents);
    void handle(received& arrived);
    void announce_exits();
    bool poll_sockets(bool hurry);
    void forget(std::uint32_t slot);
};

namespace {

std::mutex instance_mutex;
// Never freed: placements and pools that outlive exit's handlers (and
// static destructors in any order) may still call it; its thread is joined
// by stop_at_exit.
relay* instance = nullptr;
bool stopped = false;

std::string as_text(std::span<const std::byte> bytes) {
    return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

void init_mpi(MPI_Comm& comm) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
    MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
}

} // namespace

void relay::state::send(int rank, message kind, std::uint32_t slot, std::int64_t a, std::int64_t b,
                        std::span<const std::byte> payload) {
    try {
        mpi->send(rank, kind, slot, a, b, payload);
    } catch (const std::exception& e) {
        lose_rank(rank, e.what());
    }
}

// The agent of `rank` is gone (MPI refused to reach it, or it fell
// silent): every worker there is gone for the pool, and the rank is sent
// nothing more.
void relay::state::lose_rank(int rank, const std::string& why) {
    if (mpi->abandoned(rank)) return;
    mpi->abandon(rank);
    {
        std::lock_guard lock{mutex};
        lost.emplace(rank, why);
    }
    for (auto& [slot, worker] : remotes) {
        if (worker.rank != rank || worker.exited) continue;
        worker.exited = true;
        worker.status = lost_status(rank, why);
        worker.out = {};
    }
}

worker_placement::exit_status relay::state::lost_status(int rank, const std::string& why) const {
    worker_placement::exit_status status{0, false, SIGKILL, "was lost with its host agent (rank " + std::to_string(rank) + "): " + why};
    status.host_lost = true;
    return status;
}

// Each agent sends a heartbeat every agent_timeout / 5 (at most every
// second), which rank 0 answers with the timeout; an agent silent for
// longer than agent_timeout is lost. Rank 0 sends nothing to an agent that
// has gone quiet: with Open MPI 4.1 a send to a dead rank makes it try to
// connect again and report a failure that can bring down mpiexec itself.
// Checked after the arrivals are taken, so a stall of this thread costs no
// agent.
void relay::state::keep_watch(const std::vector<rank_info>& agents) {
    using namespace std::chrono;
    const auto now = steady_clock::now();
    if (now < next_check) return;
    next_check = now + milliseconds{10};
    const milliseconds timeout{agent_timeout_ms.load(std::memory_order_relaxed)};
    for (const auto& agent : agents) {
        if (mpi->abandoned(agent.rank)) continue;
        const auto last = heard.try_emplace(agent.rank, now).first->second;
        if (timeout.count() > 0 && now - last > timeout) {
            lose_rank(agent.rank, "its agent sent no heartbeat for " + std::to_string(duration_cast<milliseconds>(now - last).count()) +
                                      " ms (placement_options::agent_timeout is " + std::to_string(timeout.count()) +
                                      " ms): its process or its host ended, or it hangs");
        } else if (tell_timeout) {
            send(agent.rank, message::heartbeat, 0, timeout.count());
        }
    }
    tell_timeout = false;
}

void relay::state::handle(received& arrived) {
    if (mpi->abandoned(arrived.source)) return; // lost: what it still says comes too late
    heard[arrived.source] = std::chrono::steady_clock::now();
    const auto found = remotes.find(arrived.head.slot);
    switch (static_cast<message>(arrived.head.kind)) {
    case message::data:
        // Dropped once the pool closed its end (`reading` ended): nobody reads.
        if (found == remotes.end() || found->second.rank != arrived.source || found->second.exited ||
            !found->second.reading) {
            return;
        }
        found->second.out.push(std::move(arrived.payload));
        found->second.out.write_to(found->second.socket);
        return;
    case message::heartbeat: // answered with the timeout, which the agent applies to rank 0
        send(arrived.source, message::heartbeat, 0, agent_timeout_ms.load(std::memory_order_relaxed));
        return;
    case message::exited: {
        if (found == remotes.end() || found->second.rank != arrived.source || found->second.exited) return;
        auto& worker = found->second;
        worker.exited = true;
        const std::int64_t status = arrived.head.b;
        worker.status.pid = arrived.head.a > 0 ? static_cast<int>(arrived.head.a) : 0;
        worker.status.start_error = arrived.head.a < 0 ? static_cast<int>(-arrived.head.a) : 0;
        worker.status.exited = (status & exit_code_bit) != 0;
        worker.status.status = static_cast<int>(status & 0xffff);
        worker.status.reason = as_text(arrived.payload);
        return;
    }
    default: return; // a late HELLO or a kind rank 0 does not take
    }
}

void relay::state::announce_exits() {
    for (auto it = remotes.begin(); it != remotes.end();) {
        auto& worker = it->second;
        const auto slot = it->first;
        ++it;
        if (!worker.exited || worker.announced || !worker.out.empty()) continue;
        worker.announced = true;
        if (worker.socket >= 0) ::close(std::exchange(worker.socket, -1)); // the pool reads EOF
        {
            std::lock_guard lock{mutex};
            exits[slot] = worker.status;
        }
        const std::uint64_t one = 1;
        [[maybe_unused]] const auto wrote = ::write(worker.exit_event, &one, sizeof one);
        if (worker.released) forget(slot);
    }
}

void relay::state::forget(std::uint32_t slot) {
    const auto found = remotes.find(slot);
    if (found == remotes.end()) return;
    if (found->second.socket >= 0) ::close(found->second.socket);
    if (found->second.exit_event >= 0) ::close(found->second.exit_event);
    remotes.erase(found);
    std::lock_guard lock{mutex};
    exits.erase(slot);
}

bool relay::state::poll_sockets(bool hurry) {
    std::vector<::pollfd> fds{{wake, POLLIN, 0}};
    std::vector<std::uint32_t> slots;
    const bool room = mpi->pending_bytes() < (std::size_t{64} << 20);
    for (auto& [slot, worker] : remotes) {
        if (worker.socket < 0) continue;
        short events = 0;
        if (worker.reading && room) events |= POLLIN;
        if (!worker.out.empty()) events |= POLLOUT;
        fds.push_back({worker.socket, events, 0});
        slots.push_back(slot);
    }
    const auto wait = hurry ? std::chrono::microseconds{0} : backoff.timeout();
    const ::timespec timeout{0, static_cast<long>(wait.count()) * 1000};
    if (::ppoll(fds.data(), fds.size(), &timeout, nullptr) <= 0) return false;
    bool busy = false;
    if ((fds[0].revents & POLLIN) != 0) {
        std::uint64_t count = 0;
        [[maybe_unused]] const auto got = ::read(wake, &count, sizeof count);
        busy = true;
    }
    for (std::size_t i = 0; i < slots.size(); ++i) {
        auto& worker = remotes[slots[i]];
        const auto events = fds[i + 1].revents;
        if ((events & POLLOUT) != 0) {
            busy = true;
            if (!worker.out.write_to(worker.socket)) worker.out = {};
        }
        if ((events & (POLLIN | POLLHUP | POLLERR)) != 0 && worker.reading) {
            busy = true;
            auto bytes = read_some(worker.socket);
            if (!bytes) continue;
            if (bytes->empty()) {
                worker.reading = false; // the pool closed its end
            } else if (!worker.exited) {
                send(worker.rank, message::data, slots[i], 0, 0, *bytes);
            }
        }
    }
    return busy;
}

relay& relay::get(std::chrono::milliseconds start_timeout) {
    std::unique_lock lock{instance_mutex};
    if (stopped) throw error("coproc: coproc::mpi::placement() after MPI was finalized at exit");
    if (!instance) {
        instance = new relay();
        instance->state_ = std::make_unique<state>();
        instance->state_->wake = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        relay* self = instance;
        instance->thread_ = std::thread([self, start_timeout] { self->run(start_timeout); });
    }
    relay& self = *instance;
    lock.unlock();
    std::unique_lock wait{self.state_->mutex};
    self.state_->changed.wait(wait, [&] { return self.state_->started; });
    if (!self.state_->failure.empty()) throw error(self.state_->failure);
    return self;
}

void relay::run(std::chrono::milliseconds start_timeout) {
    state& s = *state_;
    init_mpi(s.comm);
    s.mpi = std::make_unique<channel>(s.comm);
    int size = 1;
    MPI_Comm_size(s.comm, &size);
    // Every agent says HELLO once it has started MPI.
    const auto deadline = std::chrono::steady_clock::now() + start_timeout;
    std::vector<rank_info> agents;
    while (static_cast<int>(agents.size()) < size - 1) {
        if (auto arrived = s.mpi->receive()) {
            if (static_cast<message>(arrived->head.kind) == message::hello && arrived->source > 0) {
                agents.push_back({arrived->source, as_text(arrived->payload), static_cast<std::size_t>(arrived->head.a)});
            }
            continue;
        }
        if (std::chrono::steady_clock::now() > deadline) break;
        ::usleep(1000);
    }
    std::sort(agents.begin(), agents.end(), [](const auto& a, const auto& b) { return a.rank < b.rank; });
    {
        std::lock_guard lock{s.mutex};
        agents_ = std::move(agents);
        if (static_cast<int>(agents_.size()) < size - 1) {
            s.failure = "coproc: only " + std::to_string(agents_.size()) + " of the " + std::to_string(size - 1) +
                        " MPI agents reported within " + std::to_string(start_timeout.count()) +
                        " ms; do all ranks run a program that calls coproc::run_worker_if_requested and links coproc_mpi?";
        }
        s.started = true;
    }
    s.changed.notify_all();

    for (;;) {
        std::vector<std::function<void()>> requests;
        bool stopping = false;
        {
            std::lock_guard lock{s.mutex};
            requests.swap(s.requests);
            stopping = s.stopping;
        }
        bool busy = !requests.empty();
        for (auto& request : requests) request();
        if (stopping) break;
        while (auto arrived = s.mpi->receive()) {
            // A heartbeat's answer is no reason to stay awake.
            busy = busy || static_cast<message>(arrived->head.kind) != message::heartbeat;
            s.handle(*arrived);
        }
        s.keep_watch(agents_);
        busy = s.mpi->progress() || busy;
        s.announce_exits();
        busy = s.poll_sockets(busy || !s.mpi->idle()) || busy;
        s.announce_exits();
        held_.store(s.remotes.size(), std::memory_order_relaxed);
        if (busy) s.backoff.active();
    }
    // A pool still alive now (one destroyed after exit began) sees its
    // remote workers end: EOF on their sockets, then their exit events. The
    // events stay open (such a pool may still poll them); the process ends.
    for (auto& [slot, worker] : s.remotes) {
        if (worker.socket >= 0) ::close(std::exchange(worker.socket, -1));
        if (worker.announced) continue;
        {
            std::lock_guard lock{s.mutex};
            s.exits[slot] = {worker.status.pid, false, SIGKILL, "was stopped with the MPI job at the program's exit"};
        }
        const std::uint64_t one = 1;
        [[maybe_unused]] const auto wrote = ::write(worker.exit_event, &one, sizeof one);
    }
    const bool finalize = leave_job_as_rank_0(*s.mpi, size, std::chrono::seconds{30});
    s.mpi.reset();
    if (!finalize) return; // a rank was lost: MPI_Finalize would wait for it for ever
    MPI_Comm_free(&s.comm);
    MPI_Finalize();
}

bool relay::post(std::function<void()> request) {
    {
        std::lock_guard lock{state_->mutex};
        if (state_->stopping) return false;
        state_->requests.push_back(std::move(request));
    }
    const std::uint64_t one = 1;
    [[maybe_unused]] const auto wrote = ::write(state_->wake, &one, sizeof one);
    return true;
}

worker_placement::started relay::start(int rank, const std::string& host, const std::string& program,
                                       const std::vector<std::string>& environment) {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
        throw std::system_error(errno, std::system_category(), "coproc: socketpair for a remote worker");
    }
    const int exit_event = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (exit_event < 0) {
        const int failure = errno;
        ::close(fds[0]);
        ::close(fds[1]);
        throw std::system_error(failure, std::system_category(), "coproc: eventfd for a remote worker");
    }
    ::fcntl(fds[1], F_SETFL, ::fcntl(fds[1], F_GETFL) | O_NONBLOCK);
    const std::uint32_t slot = ++state_->next_slot;
    const bool posted = post([s = state_.get(), slot, rank, socket = fds[1], exit_event,
                              payload = encode_spawn(program, environment)] {
        auto& worker = s->remotes[slot];
        worker.rank = rank;
        worker.socket = socket;
        worker.exit_event = exit_event;
        if (s->mpi->abandoned(rank)) { // lost since the placement chose it
            std::string why;
            {
                std::lock_guard lock{s->mutex};
                why = s->lost[rank];
            }
            worker.exited = true;
            worker.status = s->lost_status(rank, why);
            return;
        }
        s->send(rank, message::spawn, slot, 0, 0, payload);
    });
    if (!posted) {
        ::close(fds[0]);
        ::close(fds[1]);
        ::close(exit_event);
        throw error("coproc: no remote worker can be started: the MPI job is ending (the program is exiting)");
    }
    return {fds[0], exit_event, slot, host};
}

worker_placement::exit_status relay::exit(std::uint32_t slot) {
    std::lock_guard lock{state_->mutex};
    const auto found = state_->exits.find(slot);
    if (found == state_->exits.end()) return {0, false, SIGKILL, "ended in a way its host agent did not report"};
    return found->second;
}

void relay::signal(std::uint32_t slot, int number) {
    post([s = state_.get(), slot, number] {
        const auto found = s->remotes.find(slot);
        if (found == s->remotes.end() || found->second.exited) return;
        s->send(found->second.rank, message::signal, slot, number);
    });
}

void relay::release(std::uint32_t slot) {
    post([s = state_.get(), slot] {
        const auto found = s->remotes.find(slot);
        if (found == s->remotes.end()) return;
        found->second.released = true;
        if (found->second.announced) {
            s->forget(slot);
        } else if (!found->second.exited) {
            s->send(found->second.rank, message::release, slot);
        }
    });
}

std::size_t relay::held() const { return held_.load(std::memory_order_relaxed); }

std::vector<rank_info> relay::agents() const {
    std::lock_guard lock{state_->mutex};
    auto result = agents_;
    for (auto& agent : result) agent.lost = state_->lost.count(agent.rank) != 0;
    return result;
}

bool relay::lost(int rank) const {
    std::lock_guard lock{state_->mutex};
    return state_->lost.count(rank) != 0;
}

void relay::set_agent_timeout(std::chrono::milliseconds timeout) {
    const auto ms = std::max<std::int64_t>(0, timeout.count());
    if (state_->agent_timeout_ms.exchange(ms) == ms) return;
    post([s = state_.get()] { s->tell_timeout = true; }); // the agents learn it now
}

void relay::stop() {
    {
        std::lock_guard lock{state_->mutex};
        state_->stopping = true;
    }
    const std::uint64_t one = 1;
    [[maybe_unused]] const auto wrote = ::write(state_->wake, &one, sizeof one);
    if (thread_.joinable()) thread_.join();
}

relay::~relay() {
    if (state_ && state_->wake >= 0) ::close(state_->wake);
}

void relay::stop_at_exit() {
    std::lock_guard lock{instance_mutex};
    if (stopped) return;
    stopped = true;
    if (instance) {
        instance->stop();
        return; // the relay is never freed: a pool destroyed later may still call it (start throws, the rest is dropped)
    }
    // No pool asked for the agents: they wait in MPI for rank 0. Start MPI
    // only to let them go.
    MPI_Comm comm = MPI_COMM_NULL;
    init_mpi(comm);
    int size = 1;
    MPI_Comm_size(comm, &size);
    bool finalize = false;
    {
        channel mpi{comm};
        finalize = leave_job_as_rank_0(mpi, size, std::chrono::seconds{30});
    }
    if (!finalize) return; // an agent did not answer
    MPI_Comm_free(&comm);
    MPI_Finalize();
}

} // namespace coproc::mpi::detail

// One worker's life: start, watch, kill, reap. This step of DESIGN.md's
// data flow:
//
//  event loop                                                                workers
//  ----------                                                                -------
//  worker life: spawn, HELLO, pidfd watch, reap, replace
//
//   spawn_worker  socketpair and posix_spawn; then read_worker (in
//                 worker_connection.cpp), watch_worker and hello_timer
//   watch_worker  poll the worker's pidfd; on exit reap it (waitid) and fail
//                 or retry the tasks it held
//   timers        hello (start_timeout), idle (idle_timeout), cancel grace
//
// Worker phases:
//
//   starting --HELLO--> [initializing --RESULT 0-->] ready --(max_tasks_per_child,
//       |                    |                          |    max_worker_memory,
//       |                    |                          |    idle_timeout, shutdown)--> retiring
//       +--------------------+--------------------------+------(process exits)------------+--> exited
//
// An exit is handled once on_reaped (here) and the reader's EOF
// (on_reader_done) have both been seen: on_worker_exit (pool_scheduler.cpp)
// says what it means for the pool and for the tasks the worker held.

#include "worker_process.hpp"
#include "pool_core.hpp"

#include <coproc/cancellation.hpp>
#include <coproc/detail/wire.hpp>

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <string_view>
#include <cerrno>
#include <cstdio>
#include <csignal>
#include <cstring>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

namespace coproc::detail {

namespace {

namespace wire = detail::wire;

constexpr int worker_socket_in_child = 3;

// A start word (wire.hpp) for a new worker: the memfd, at a descriptor above
// the ones the child's are dup2'd to (so that no dup2 in the spawn reads a
// descriptor another one just replaced), and its mapping; {-1, nullptr} when
// it cannot be made: the worker then sends START before each task, as
// protocol 2 did, and works all the same.
std::pair<int, std::uint64_t*> make_start_word() noexcept {
    int fd = static_cast<int>(::memfd_create("coproc-start-word", MFD_CLOEXEC));
    if (fd < 0) return {-1, nullptr};
    if (fd <= wire::start_word_descriptor) {
        const int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, wire::start_word_descriptor + 1);
        ::close(fd);
        if (moved < 0) return {-1, nullptr};
        fd = moved;
    }
    void* mapped = MAP_FAILED;
    if (::ftruncate(fd, sizeof(std::uint64_t)) == 0) {
        mapped = ::mmap(nullptr, sizeof(std::uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    if (mapped == MAP_FAILED) {
        ::close(fd);
        return {-1, nullptr};
    }
    return {fd, static_cast<std::uint64_t*>(mapped)};
}

// Errors of socketpair and posix_spawn that a later attempt may not meet:
// a resource limit or a shortage, not a fault of the worker program.
bool passing_shortage(int error) noexcept {
    return error == EAGAIN || error == ENOMEM || error == EMFILE || error == ENFILE || error == ENOBUFS;
}

task<void> poll_readable(event_loop* loop, int fd) { co_await loop->poll(fd, POLLIN); }

task<void> watch_worker(std::shared_ptr<pool_core> core, worker_handle* worker) {
    if (worker->remote) {
        // The placement's exit event polls readable once the worker exited
        // on its host; destroy() stops the wait through lifetime_stop.
        try {
            co_await with_stop_token(poll_readable(&core->loop, worker->exit_event), worker->lifetime_stop.get_token());
            if (!core->destroyed) core->on_remote_exit(*worker);
        } catch (...) {
            // Stopped: the pool is gone.
        }
        core->release_coroutine(*worker);
        co_return;
    }
    if (worker->pidfd < 0) {
        // No pidfd: poll for the exit every 2 ms (never blocking the loop).
        while (!core->destroyed) {
            ::siginfo_t info{};
            const int result = ::waitid(P_PID, static_cast<::id_t>(worker->pid), &info, WEXITED | WNOHANG);
            if (result == 0 && info.si_pid != 0) {
                core->on_reaped(*worker, info);
                break;
            }
            if (result < 0 && errno != EINTR) break;
            try {
                co_await core->loop.sleep_for(std::chrono::milliseconds{2});
            } catch (...) {
                break;
            }
        }
        core->release_coroutine(*worker);
        co_return;
    }
    // A pidfd polls readable once its process has exited; waitid with
    // WNOHANG then reaps it without ever blocking the loop thread.
    while (!core->destroyed && worker->pidfd >= 0) {
        try {
            co_await core->loop.poll(worker->pidfd, POLLIN);
        } catch (...) {
            break; // only when the loop itself goes away
        }
        if (core->destroyed || worker->pidfd < 0) break;
        ::siginfo_t info{};
        int result;
        do {
            result = ::waitid(static_cast<::idtype_t>(P_PIDFD), static_cast<::id_t>(worker->pidfd), &info, WEXITED | WNOHANG);
        } while (result < 0 && errno == EINTR);
        if (result == 0 && info.si_pid != 0) {
            core->on_reaped(*worker, info);
            break;
        }
        if (result < 0) break; // ECHILD: nothing left to reap
    }
    core->release_coroutine(*worker);
}

// Retires a worker that stays idle for idle_timeout.
task<void> idle_timer(std::shared_ptr<pool_core> core, worker_handle* worker, std::uint64_t generation) {
    try {
        co_await with_stop_token(sleep_idle(&core->loop, core->idle_timeout()), worker->lifetime_stop.get_token());
        if (!core->destroyed) core->idle_timer_fired(*worker, generation);
    } catch (...) {
        // Stopped: the worker exited or the pool is gone.
        worker->idle_timer = false;
    }
    core->release_coroutine(*worker);
}

// Kills a worker that has not said HELLO within start_timeout (counts as a
// startup failure): a program that runs but does not speak the protocol.
task<void> hello_timer(std::shared_ptr<pool_core> core, worker_handle* worker) {
    try {
        co_await with_stop_token(sleep_idle(&core->loop, core->start_timeout()), worker->lifetime_stop.get_token());
        if (!core->destroyed && worker->state == worker_handle::phase::starting) {
            core->kill_worker(*worker, "nothing: it did not say HELLO within " +
                                           std::to_string(core->start_timeout().count()) +
                                           " ms (is it a coproc worker program?)");
        }
    } catch (...) {
        // Stopped: the worker exited or the pool is gone.
    }
    core->release_coroutine(*worker);
}

// Kills the worker if the cancelled task `id` is still there after the
// grace period.
task<void> cancel_grace_timer(std::shared_ptr<pool_core> core, worker_handle* worker, std::uint64_t id) {
    try {
        co_await with_stop_token(sleep_idle(&core->loop, core->cancel_grace()), worker->lifetime_stop.get_token());
        if (!core->destroyed) core->grace_expired(*worker, id);
    } catch (...) {
        // Stopped: the worker exited or the pool is gone.
    }
    core->release_coroutine(*worker);
}

} // namespace

// Adds glibc.malloc.hugetlb=1 to GLIBC_TUNABLES in `environment`, unless
// that tunable is set there already.
void add_huge_page_tunable(std::vector<std::string>& environment) {
    constexpr std::string_view variable = "GLIBC_TUNABLES=";
    constexpr std::string_view tunable = "glibc.malloc.hugetlb";
    for (auto& entry : environment) {
        if (!entry.starts_with(variable)) continue;
        const std::string_view list = std::string_view{entry}.substr(variable.size());
        for (std::size_t at = 0; at <= list.size();) {
            const std::size_t end = std::min(list.find(':', at), list.size());
            if (list.substr(at, end - at).starts_with(std::string(tunable) + "=")) return;
            at = end + 1;
        }
        entry += list.empty() ? "" : ":";
        entry += std::string(tunable) + "=1";
        return;
    }
    environment.push_back(std::string(variable) + std::string(tunable) + "=1");
}

// True when a process ended by itself: an exit code, or a signal of its own
// making (a crash, abort()). SIGKILL, SIGTERM and the like come from outside.
bool failed_by_itself(const ::siginfo_t& info) {
    if (info.si_code == CLD_EXITED) return true;
    switch (info.si_status) {
    case SIGSEGV:
    case SIGBUS:
    case SIGILL:
    case SIGFPE:
    case SIGABRT:
    case SIGSYS:
    case SIGTRAP:
        return true;
    default:
        return false;
    }
}

// Which limit an error of socketpair or posix_spawn ran into.
std::string describe_shortage(int error) {
    ::rlimit limit{};
    switch (error) {
    case EMFILE:
        ::getrlimit(RLIMIT_NOFILE, &limit);
        return "this process reached its limit on open files, RLIMIT_NOFILE (ulimit -n), now " +
               std::to_string(limit.rlim_cur);
    case ENFILE: return "the system reached its limit on open files (fs.file-max)";
    case EAGAIN:
        ::getrlimit(RLIMIT_NPROC, &limit);
        return "a limit on processes was reached: RLIMIT_NPROC (ulimit -u), now " +
               (limit.rlim_cur == RLIM_INFINITY ? std::string("unlimited") : std::to_string(limit.rlim_cur)) +
               ", kernel.threads-max, kernel.pid_max or a cgroup's pids.max";
    default: return "the system is short of memory";
    }
}

worker_process::~worker_process() {
    if (start_word != nullptr) ::munmap(start_word, sizeof(std::uint64_t));
}

std::string describe_exit(const ::siginfo_t& info) {
    if (info.si_code == CLD_EXITED) return "exited with code " + std::to_string(info.si_status);
    std::string text = "was killed by signal " + std::to_string(info.si_status);
    if (const char* name = ::sigdescr_np(info.si_status)) text += std::string(" (") + name + ")";
    return text;
}

task<void> sleep_idle(event_loop* loop, std::chrono::milliseconds duration) { co_await loop->sleep_for(duration); }

std::size_t resident_bytes(int pid) {
    // "size resident shared text lib data dt", in pages. One read of a
    // small file: about as costly as a few system calls.
    const std::string path = "/proc/" + std::to_string(pid) + "/statm";
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    char text[128];
    const ssize_t got = ::read(fd, text, sizeof text - 1);
    ::close(fd);
    if (got <= 0) return 0;
    text[got] = '\0';
    unsigned long long size = 0;
    unsigned long long resident = 0;
    if (std::sscanf(text, "%llu %llu", &size, &resident) != 2) return 0;
    return static_cast<std::size_t>(resident) * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

// --- start (loop thread)

std::vector<char*> pool_core::worker_environment() {
    std::vector<char*> pointers;
    pointers.reserve(environment_storage_.size() + 1);
    for (auto& entry : environment_storage_) pointers.push_back(entry.data());
    pointers.push_back(nullptr);
    return pointers;
}

std::string pool_core::worker_program_name() const {
    if (options_.worker_executable.empty()) return ::program_invocation_short_name; // this program, re-executed
    const std::string_view path = options_.worker_executable;
    return std::string(path.substr(path.rfind('/') + 1));
}

int spawn_worker_program(const std::string& executable, const std::string& title, char* const* environment,
                         int child_end, int start_word_fd, ::pid_t& pid) noexcept {
    static_assert(wire::start_word_descriptor == worker_socket_in_child + 1);
    int moved = -1;
    if (child_end == worker_socket_in_child) {
        // dup2 onto itself would keep FD_CLOEXEC set; move it out of the way.
        moved = ::fcntl(child_end, F_DUPFD_CLOEXEC, worker_socket_in_child + 1);
        if (moved < 0) return errno;
        child_end = moved;
    }
    ::posix_spawn_file_actions_t actions;
    ::posix_spawn_file_actions_init(&actions);
    ::posix_spawn_file_actions_adddup2(&actions, child_end, worker_socket_in_child);
    if (start_word_fd >= 0) ::posix_spawn_file_actions_adddup2(&actions, start_word_fd, wire::start_word_descriptor);
    // Without a start word, descriptor 4 is closed too: an MPI agent's own
    // descriptors (not all close-on-exec) must not reach its workers.
    ::posix_spawn_file_actions_addclosefrom_np(
        &actions, start_word_fd >= 0 ? wire::start_word_descriptor + 1 : wire::start_word_descriptor);
    ::posix_spawnattr_t attributes;
    ::posix_spawnattr_init(&attributes);
    ::sigset_t signals;
    ::sigemptyset(&signals);
    ::posix_spawnattr_setsigmask(&attributes, &signals);
    ::sigfillset(&signals);
    ::posix_spawnattr_setsigdefault(&attributes, &signals);
    ::posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

    std::string flag = "--coproc-worker";
    std::string name = title;
    char* argv[] = {name.data(), flag.data(), nullptr};
    const int result = ::posix_spawn(&pid, executable.c_str(), &actions, &attributes, argv, environment);
    ::posix_spawn_file_actions_destroy(&actions);
    ::posix_spawnattr_destroy(&attributes);
    if (moved >= 0) ::close(moved);
    return result;
}

void pool_core::spawn_worker() {
    if (options_.placement) {
        if (local_workers_live() >= static_cast<std::size_t>(local_workers_)) {
            spawn_remote_worker();
            return;
        }
    }
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
        throw std::system_error(errno, std::system_category(), "coproc: socketpair for a worker");
    }
    const auto [word_fd, word] = make_start_word();
    // What `ps` shows: the program's name behind a prefix that says it is a
    // coproc worker (the worker also names its thread for `top`).
    auto envp = worker_environment();
    ::pid_t pid = -1;
    const int result = spawn_worker_program(executable_, "coproc-worker:" + worker_program_name(), envp.data(), fds[1],
                                            word_fd, pid);
    ::close(fds[1]);
    if (word_fd >= 0) ::close(word_fd); // the mapping stays
    if (result != 0) {
        if (word != nullptr) ::munmap(word, sizeof(std::uint64_t));
        ::close(fds[0]);
        if (passing_shortage(result)) {
            throw std::system_error(result, std::system_category(), "coproc: posix_spawn of a worker");
        }
        // The program itself cannot be started (missing, not executable,
        // not a program): no later attempt would do better.
        throw broken_process_pool("coproc: cannot start the worker program '" + executable_ + "': " + std::strerror(result));
    }
    // Without pidfd_open (a tool or sandbox that hides it, such as
    // valgrind 3.19), watch_worker falls back to polling waitid.
    const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    auto& worker = *workers_.emplace_back(std::make_unique<worker_handle>());
    worker.pid = pid;
    worker.socket = fds[0];
    worker.pidfd = pidfd;
    worker.start_word = word;
    start_worker_coroutines(worker);
}

std::size_t pool_core::local_workers_live() const {
    std::size_t local = 0;
    for (const auto& worker : workers_) {
        if (!worker->remote && worker->state != worker_handle::phase::exited && !worker->reaped) ++local;
    }
    return local;
}

void pool_core::spawn_remote_worker() {
    auto started = options_.placement->start(options_.worker_executable, remote_environment_);
    auto& worker = *workers_.emplace_back(std::make_unique<worker_handle>());
    worker.remote = true;
    worker.pid = 0; // its HELLO says
    worker.socket = started.socket;
    worker.exit_event = started.exit_event;
    worker.remote_handle = started.handle;
    worker.host = std::move(started.host);
    start_worker_coroutines(worker);
}

void pool_core::start_worker_coroutines(worker_handle& worker) {
    worker.serial = next_serial_++;
    worker.coroutines = 3;
    workers_started_.fetch_add(1, std::memory_order_relaxed);
    workers_alive_.fetch_add(1, std::memory_order_relaxed);
    loop.spawn(shielded(read_worker(shared_from_this(), &worker)));
    loop.spawn(shielded(watch_worker(shared_from_this(), &worker)));
    loop.spawn(shielded(hello_timer(shared_from_this(), &worker)));
}

void pool_core::on_remote_exit(worker_handle& worker) {
    const auto status = options_.placement->exit(worker.remote_handle);
    ::siginfo_t info{};
    info.si_pid = status.pid;
    info.si_code = status.exited ? CLD_EXITED : CLD_KILLED;
    info.si_status = status.status;
    if (worker.pid <= 0) worker.pid = status.pid;
    worker.exit_reason = status.reason;
    worker.host_lost = status.host_lost;
    if (status.start_error != 0 && passing_shortage(status.start_error)) {
        worker.start_shortage = true;
        std::size_t live = 0;
        for (const auto& other : workers_) {
            if (other.get() != &worker && other->state != worker_handle::phase::exited && !other->reaped) ++live;
        }
        spawn_failed(std::system_error(status.start_error, std::system_category(),
                                       "coproc: a worker could not be started on " + worker.host),
                     live, status.reason);
    }
    on_reaped(worker, info);
}

void pool_core::release_remote(worker_handle& worker) noexcept {
    if (!worker.remote || worker.remote_handle == 0) return;
    options_.placement->release(std::exchange(worker.remote_handle, 0));
    worker.exit_event = -1;
}

void pool_core::initializer_failed(worker_handle& worker, std::exception_ptr cause) {
    std::string what = "unknown error";
    try {
        std::rethrow_exception(cause);
    } catch (const std::exception& e) {
        what = e.what();
    } catch (...) {
    }
    // No worker of this pool can serve any more: break_pool kills them all.
    break_pool("coproc: the pool's initializer " + std::string(options_.initializer.function_name) + " failed in worker " +
                   std::to_string(worker.pid) + ": " + what + "; the pool is broken",
               std::move(cause));
}

// --- exit: kill, reap, free (loop thread)

void pool_core::kill_worker(worker_handle& worker, const std::string& reason, bool violation, int signal) noexcept {
    if (worker.state == worker_handle::phase::exited || worker.reaped) return;
    if (worker.kill_reason.empty()) worker.kill_reason = reason;
    worker.condemned = true;
    worker.violated = worker.violated || violation;
    if (worker.remote) {
        options_.placement->signal(worker.remote_handle, signal);
    } else {
        ::kill(worker.pid, signal);
    }
}

void pool_core::on_reaped(worker_handle& worker, const ::siginfo_t& info) {
    worker.reaped = true;
    worker.exit_info = info;
    // The reader may still be waiting: after the frames already in the
    // socket, make it see EOF even if some other process holds the peer end.
    if (worker.socket >= 0) ::shutdown(worker.socket, SHUT_RD);
    if (worker.reader_done) on_worker_exit(worker);
}

void pool_core::release_coroutine(worker_handle& worker) noexcept {
    if (--worker.coroutines > 0 || worker.state != worker_handle::phase::exited) return;
    release_remote(worker);
    worker.close_descriptors();
    if (destroyed) return; // destroy() and ~pool_core own the list now
    workers_.remove_if([&](const std::unique_ptr<worker_handle>& entry) { return entry.get() == &worker; });
    wake_waiters();
}

// --- timers: idle timeout, cancel grace (loop thread)

void pool_core::start_idle_timer(worker_handle& worker) {
    worker.idle_timer = true;
    ++worker.coroutines;
    loop.spawn(shielded(idle_timer(shared_from_this(), &worker, worker.generation)));
}

void pool_core::idle_timer_fired(worker_handle& worker, std::uint64_t generation) {
    worker.idle_timer = false;
    if (worker.state != worker_handle::phase::ready || worker.reaped || !worker.assigned.empty()) return;
    if (worker.generation != generation) {
        start_idle_timer(worker); // it worked meanwhile: a new idle period began
        return;
    }
    send_bye(worker);
    if (!worker.writing) start_writer(worker);
}

// --- max_worker_memory (loop thread)

void pool_core::retire_if_over_memory(worker_handle& worker) {
    // Only a ready worker: one retiring already finishes what it holds, and
    // one condemned or reaped is gone. The pid is still this worker's: it
    // has not been reaped.
    if (options_.max_worker_memory == 0 || worker.state != worker_handle::phase::ready || worker.condemned ||
        worker.reaped || worker.remote) {
        return;
    }
    if (resident_bytes(worker.pid) <= options_.max_worker_memory) return;
    worker.state = worker_handle::phase::retiring; // dispatch sends nothing more, and BYE once it holds nothing
    retired_for_memory_.fetch_add(1, std::memory_order_relaxed);
    // What it holds and has not started runs elsewhere: RECALL, as for a
    // moved task. One it has started meanwhile runs here; no RECALLED comes.
    bool recalled = false;
    for (work_item* item : worker.assigned) {
        if (item->state() != work_state::dispatched || item->recalling) continue;
        item->recalling = true;
        worker.queued.add_frame(wire::frame_kind::recall, item->id);
        recalled = true;
    }
    if (recalled && !worker.writing) start_writer(worker);
}

void pool_core::cancel_in_worker(std::uint64_t id, std::uint64_t serial, bool kill_now, bool kill_after_grace) {
    for (auto& entry : workers_) {
        worker_handle& worker = *entry;
        if (worker.serial != serial || worker.state == worker_handle::phase::exited || worker.reaped) continue;
        const bool held = std::any_of(worker.assigned.begin(), worker.assigned.end(),
                                      [id](const work_item* item) { return item->id == id; });
        if (!held) return; // its answer already came
        if (kill_now) {
            killed_for_cancel_.fetch_add(1, std::memory_order_relaxed);
            kill_worker(worker, "nothing more: its task was cancelled with force");
            return;
        }
        worker.queued.add_frame(wire::frame_kind::cancel, id);
        if (!worker.writing) start_writer(worker);
        if (!kill_after_grace) return; // future::request_stop: the task may run on
        ++worker.coroutines;
        loop.spawn(shielded(cancel_grace_timer(shared_from_this(), &worker, id)));
        return;
    }
}

void pool_core::grace_expired(worker_handle& worker, std::uint64_t id) {
    if (worker.state == worker_handle::phase::exited || worker.reaped) return;
    const bool held = std::any_of(worker.assigned.begin(), worker.assigned.end(),
                                  [id](const work_item* item) { return item->id == id; });
    if (!held) return; // it stopped in time
    killed_for_cancel_.fetch_add(1, std::memory_order_relaxed);
    kill_worker(worker, "nothing more: its cancelled task had not returned after cancel_grace (" +
                            std::to_string(options_.cancel_grace.count()) + " ms)");
}

} // namespace coproc::detail

// Worker mode: the process a process_pool starts. Two threads:
//
//   main     runs the tasks, one at a time, and reads the parent's frames
//            whenever no task runs: a CALL that reaches an idle worker runs
//            on the thread that read it, with no hand-off between threads,
//            and its START and RESULT leave in one send.
//   watcher  sleeps while no task runs. A timer wakes it once a task has run
//            for start_delay: it sends that task's START if it is still
//            owed, then reads the frames that arrive while the task runs
//            (CANCEL stops its token, RECALL gives back a queued task, a
//            CALL is queued, CREDIT lets a stream send more, BYE noted),
//            woken by epoll when one arrives. A stream task that waits for
//            credit has it start at once, not at start_delay.
//
// Frames are read by one thread at a time (reading_): main reads only while
// no task runs, the watcher only while one does; a frame the watcher began
// when the task ended is finished by the watcher, main waiting for it.
//
// START. Before running a task the worker stores its work id in the start
// word (wire.hpp), shared memory the parent reads after the worker's death,
// so the parent knows which task was running even without its START. START
// itself is then owed: sent with the RESULT when the task ends within
// start_delay (one send per task), or by the watcher at start_delay with
// the microseconds run so far, so that running() and the parent's run-time
// average stay right. Without a start word START goes out before the task.
// A RESULT is held back while another call is queued and goes out with that
// call's START: one send per task when the parent keeps the queue full.
//
// The parts around the session, each in its own file: the socket
// (worker_channel: whole frames out from any thread, an inbox in), running
// one call and framing its answer (worker_task), the memory of large
// results kept for the next task (worker_spare, with its janitor thread),
// and what a worker says when it cannot start a thread (worker_limits).
//
// A thread that cannot be created (std::thread throws std::system_error:
// EAGAIN under RLIMIT_NPROC, kernel.threads-max or a cgroup's pids.max,
// ENOMEM for its stack) is reported on stderr with the limit that likely
// applies. Without the watcher a running task could not be cancelled nor
// seen to run: the worker exits with thread_start_failed_exit, which the
// pool reports as the worker's exit code. Without the janitor the worker
// serves on, keeping no spares.
//
// Writes from both threads go through the channel's one mutex, so frames
// never interleave; a result is encoded completely before any of it is
// written, so a failure while encoding never leaves half a frame behind.
#include "worker_channel.hpp"
#include "worker_limits.hpp"
#include "received_mappings.hpp"
#include "worker_spare.hpp"
#include "worker_task.hpp"

#include <coproc/detail/remote_function.hpp>
#include <coproc/detail/wire.hpp>
#include <coproc/error.hpp>
#include <coproc/worker.hpp>

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <stop_token>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>

namespace coproc {

namespace {

namespace wire = detail::wire;

constexpr const char* worker_flag = "--coproc-worker";
constexpr int parent_socket = 3;
constexpr std::size_t max_call_frame = wire::max_payload;
using clock_type = std::chrono::steady_clock; // CLOCK_MONOTONIC, as the watcher's timerfd
using detail::call;
using detail::outgoing;

// How long a task runs before the watcher sends its START and starts
// reading frames. Shorter tasks answer START and RESULT in one send and
// read the frames that came meanwhile (a CANCEL for them included) after
// they return. Longer ones are seen running, and can be cancelled, this
// much after they began: far below any cancel_grace.
constexpr std::chrono::microseconds start_delay{1000};

// The exit code of a worker that could not start its watcher thread:
// EX_OSERR of <sysexits.h> ("can't fork"), distinct from the 3 of a
// protocol fault and from the exit codes tasks commonly use.
constexpr int thread_start_failed_exit = 71;

class worker_session {
public:
    worker_session(int fd, std::chrono::milliseconds keep_result_memory, std::chrono::microseconds spin)
        : channel_(fd, spin), spares_(keep_result_memory) {}

    [[noreturn]] void serve() {
        map_start_word();
        send_hello();
        start_watcher();
        // After the watcher's stack is mapped, before any task.
        detail::set_address_space_limit(detail::apply_address_space_limit());
        serve_calls();
        // BYE, and every call that came before it answered. The watcher is
        // stopped and joined first: a process that ends with threads still
        // running is held back a second by ThreadSanitizer (atexit_sleep_ms),
        // and the tests retire hundreds of workers.
        {
            std::lock_guard lock{mutex_};
            stopping_ = true;
            set_watch_timer(std::chrono::nanoseconds{1});
        }
        watcher_.join();
        detail::worker_quit(0);
    }

private:
    // The start word, when the parent passed one (wire.hpp).
    void map_start_word() {
        const char* variable = std::getenv(wire::start_word_variable);
        if (variable == nullptr) return;
        const int fd = std::atoi(variable);
        void* mapped = ::mmap(nullptr, sizeof(std::uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (mapped == MAP_FAILED) return; // none was passed: START goes out before each task
        ::close(fd);
        start_word_ = static_cast<std::uint64_t*>(mapped);
    }

    void send_hello() {
        detail::byte_buffer frame;
        const auto offset = wire::begin_frame(frame, wire::frame_kind::hello, 0);
        detail::encode_into(frame, wire::protocol_version, static_cast<std::int32_t>(::getpid()));
        wire::finish_frame(frame, offset);
        send(frame);
    }

    static void send_frame(void* session, const detail::byte_buffer& frame) {
        static_cast<worker_session*>(session)->send(frame);
    }
    static void take_credit(void* session) { static_cast<worker_session*>(session)->wait_for_credit(); }

    void send(const detail::byte_buffer& frame) { channel_.send(frame); }
    void send(const outgoing& frames) { channel_.send(frames); }
    bool read_exact(void* into, std::size_t size) { return channel_.read_exact(into, size); }

    // Reads one frame from the parent and acts on it: a CALL is queued, a
    // CANCEL or RECALL answered, BYE noted. Only the thread holding the
    // reading role (reading_) calls it. EOF: the parent closed or died, and
    // the worker leaves, whatever runs.
    void read_frame() {
        std::byte raw[wire::header_size];
        if (!read_exact(raw, sizeof raw)) detail::worker_quit(0);
        const wire::frame_header header = wire::read_header(raw);
        if (header.length > max_call_frame) {
            std::fprintf(stderr, "coproc worker %d: frame of %u bytes from the parent exceeds the limit\n",
                         static_cast<int>(::getpid()), header.length);
            detail::worker_quit(3);
        }
        call received{header.work_id, header.flags, {}, {}, 0, {}};
        if (const std::size_t count = wire::descriptor_count(header.flags); count > 0) {
            // A CALL's shared buffers, received with its bytes or before.
            if (static_cast<wire::frame_kind>(header.kind) != wire::frame_kind::call ||
                !channel_.take_descriptors(count, received.descriptors.fds)) {
                std::fprintf(stderr, "coproc worker %d: a frame from the parent claims %zu descriptors it did not send\n",
                             static_cast<int>(::getpid()), count);
                detail::worker_quit(3);
            }
        }
        if (static_cast<wire::frame_kind>(header.kind) == wire::frame_kind::call) {
            read_call(header, received);
            std::lock_guard lock{mutex_};
            queue_.push_back(std::move(received));
            return;
        }
        received.payload.resize(header.length);
        if (!read_exact(received.payload.data(), received.payload.size())) detail::worker_quit(0);
        switch (static_cast<wire::frame_kind>(header.kind)) {
        case wire::frame_kind::cancel:
            cancel(header.work_id);
            break;
        case wire::frame_kind::recall:
            recall(header.work_id);
            break;
        case wire::frame_kind::credit: {
            std::uint32_t items = 0;
            if (received.payload.size() != sizeof items) {
                std::fprintf(stderr, "coproc worker %d: CREDIT frame of %zu bytes\n", static_cast<int>(::getpid()),
                             received.payload.size());
                detail::worker_quit(3);
            }
            std::memcpy(&items, received.payload.data(), sizeof items);
            grant(header.work_id, items);
            break;
        }
        case wire::frame_kind::bye: {
            std::lock_guard lock{mutex_};
            bye_ = true;
            break;
        }
        default:
            std::fprintf(stderr, "coproc worker %d: unexpected frame kind %u from the parent\n",
                         static_cast<int>(::getpid()), header.kind);
            detail::worker_quit(3);
        }
    }

    // Reads a CALL frame's payload. A large one for a function whose
    // arguments are one block container is received straight into those
    // arguments: no frame-sized buffer, no copy when decoding.
    void read_call(const wire::frame_header& header, call& into) {
        constexpr std::size_t head = sizeof(std::uint64_t) + sizeof(detail::wire_count); // function id, count
        const bool plain = (header.flags & (wire::frame_flag::chunk | wire::frame_flag::initializer)) != 0;
        if (plain || header.length < head + detail::attach_from) {
            into.payload.resize(header.length);
            if (!read_exact(into.payload.data(), into.payload.size())) detail::worker_quit(0);
            return;
        }
        into.payload.resize(head);
        if (!read_exact(into.payload.data(), head)) detail::worker_quit(0);
        std::uint64_t function_id = 0;
        detail::wire_count count = 0;
        std::memcpy(&function_id, into.payload.data(), sizeof function_id);
        std::memcpy(&count, into.payload.data() + sizeof function_id, sizeof count);
        const detail::remote_function_entry* function = detail::find_remote_function(function_id);
        if (function != nullptr && !function->ambiguous && function->prepare != nullptr) {
            into.prepared = spares_.prepare(*function, count, header.length - head);
        }
        if (into.prepared.values) {
            into.payload.resize(sizeof function_id); // run() reads the function id from it
            if (!read_exact(into.prepared.block.data(), into.prepared.block.size())) detail::worker_quit(0);
            return;
        }
        into.payload.resize(header.length); // as usual, after the bytes read already
        if (!read_exact(into.payload.data() + head, header.length - head)) detail::worker_quit(0);
    }

    // CREDIT: the stream task `work_id` may send `items` more ITEMs. One
    // queued keeps them for when it runs; an id not held here (the task
    // ended) is ignored.
    void grant(std::uint64_t work_id, std::uint32_t items) {
        std::lock_guard lock{mutex_};
        const auto add = [items](std::uint32_t& credit) {
            credit = static_cast<std::uint32_t>(std::min<std::uint64_t>(UINT32_MAX, std::uint64_t{credit} + items));
        };
        if (running_ && running_id_ == work_id) {
            add(running_credit_);
            credit_changed_.notify_all();
            return;
        }
        for (auto& queued : queue_) {
            if (queued.work_id == work_id) add(queued.credit);
        }
    }

    // A stream task's push: takes one ITEM's worth of credit, waiting for
    // the parent to grant more when there is none (its consumer is behind).
    // The watcher reads the CREDIT frames while a task runs: it is told to
    // start now rather than at start_delay. A CANCEL meanwhile ends the wait
    // with cancelled_error, which ends the task.
    void wait_for_credit() {
        std::unique_lock lock{mutex_};
        while (running_credit_ == 0) {
            if (running_stop_.stop_requested()) {
                throw cancelled_error("coproc: the stream was cancelled while its task waited for the consumer");
            }
            if (!watch_now_) {
                watch_now_ = true;
                timer_armed_ = true;
                set_watch_timer(std::chrono::nanoseconds{1});
            }
            credit_changed_.wait(lock);
        }
        --running_credit_;
    }

    // CANCEL: a task still queued is dropped without running and answered
    // with a cancelled_error; the running one has its stop token stopped and
    // answers when its function returns. An id not held here (its answer is
    // already on the way) is ignored.
    void cancel(std::uint64_t work_id) {
        bool dropped = false;
        {
            std::lock_guard lock{mutex_};
            if (running_ && running_id_ == work_id) {
                running_stop_.request_stop();
                credit_changed_.notify_all(); // a push waiting for credit gives up
                return;
            }
            for (auto it = queue_.begin(); it != queue_.end(); ++it) {
                if (it->work_id == work_id) {
                    queue_.erase(it);
                    dropped = true;
                    break;
                }
            }
        }
        if (!dropped) return;
        detail::byte_buffer reply;
        const auto offset = wire::begin_frame(reply, wire::frame_kind::error, work_id);
        detail::encode_exception(std::make_exception_ptr(cancelled_error("coproc: cancelled before it started")), reply);
        wire::finish_frame(reply, offset);
        send(reply);
    }

    // RECALL: a task still queued is dropped without running and the parent
    // told so (RECALLED), to run it on another worker. One that started (or
    // is done) is not given back, and nothing is said: its START went first.
    // mutex_ orders this against main taking the task.
    void recall(std::uint64_t work_id) {
        {
            std::lock_guard lock{mutex_};
            const auto found = std::find_if(queue_.begin(), queue_.end(),
                                            [work_id](const call& queued) { return queued.work_id == work_id; });
            if (found == queue_.end()) return;
            queue_.erase(found);
        }
        detail::byte_buffer reply;
        wire::finish_frame(reply, wire::begin_frame(reply, wire::frame_kind::recalled, work_id));
        send(reply);
    }

    // The main thread's loop: runs queued calls one at a time and, when none
    // is queued, reads the next frame itself. Ends after BYE once every
    // call that came before it has been answered.
    void serve_calls() {
        outgoing held; // the last RESULT/ERROR, held while another call is queued
        std::unique_lock lock{mutex_};
        for (;;) {
            if (queue_.empty() && !held.empty()) {
                lock.unlock();
                send(held); // nothing to pair it with: send it now
                spares_.keep(held);
                lock.lock();
                continue;
            }
            if (!reading_ && channel_.inbox_holds_bytes()) {
                // Left in the inbox by the watcher, which stopped reading
                // when the last task ended: read before the next task runs,
                // as no epoll wake-up will come for them.
                read_inbox(lock);
                continue;
            }
            if (!queue_.empty()) {
                call next = std::move(queue_.front());
                queue_.pop_front();
                held = run_next(lock, next, std::move(held));
                continue;
            }
            if (bye_) break;
            if (reading_) {
                // The watcher is finishing a frame it began while the last
                // task ran.
                reader_free_.wait(lock);
                continue;
            }
            read_inbox(lock);
        }
    }

    // Reads a frame, and every frame that came with it (a full queue holds
    // RESULTs back), taking the reading role; mutex_ held on entry and on
    // return, not while reading.
    void read_inbox(std::unique_lock<std::mutex>& lock) {
        reading_ = true;
        lock.unlock();
        do {
            read_frame();
        } while (channel_.inbox_holds_bytes());
        lock.lock();
        reading_ = false;
    }

    // Runs `task` (mutex_ held on entry and on return, not while it runs):
    // sends `held` first, with the task's START unless START can wait;
    // returns the task's answer, preceded by its START if still owed.
    outgoing run_next(std::unique_lock<std::mutex>& lock, call& task, outgoing held) {
        const bool initializer = (task.flags & wire::frame_flag::initializer) != 0;
        // START waits only when nothing else goes out now and the start word
        // tells the parent, should the worker die, that the task began.
        const bool late = !initializer && held.empty() && start_word_ != nullptr;
        running_ = true;
        running_id_ = task.work_id;
        running_since_ = clock_type::now();
        running_stop_ = std::stop_source{};
        running_credit_ = task.credit;
        start_owed_ = late;
        if (!timer_armed_) {
            // Set once, not per task: set per task, it took the one-core
            // round trip from about 17 to 26 us on the project's VM (the
            // timer is programmed anew each time, likely a hypervisor exit).
            // When it fires during a later task, the watcher sets it again
            // for that task's start.
            timer_armed_ = true;
            set_watch_timer(start_delay);
        }
        std::stop_token token = running_stop_.get_token();
        lock.unlock();

        if (!initializer && !late) {
            wire::finish_frame(held.bytes, wire::begin_frame(held.bytes, wire::frame_kind::start, task.work_id));
        }
        if (!held.empty()) send(held);
        spares_.keep(held); // a large result sent from where it was
        if (!initializer && start_word_ != nullptr) {
            // Release: a parent reading the word after the worker's death
            // reads it through the kernel's reaping, which orders it anyway;
            // release keeps the compiler from moving the store past the call.
            std::atomic_ref<std::uint64_t>{*start_word_}.store(task.work_id, std::memory_order_release);
        }
        outgoing reply = detail::run_call(task, std::move(token), {this, &send_frame, &take_credit});

        lock.lock();
        running_ = false;
        running_id_ = 0;
        running_credit_ = 0;
        watch_now_ = false;
        if (socket_watched_) {
            ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, channel_.fd(), nullptr);
            socket_watched_ = false;
        }
        if (std::exchange(start_owed_, false)) reply.start = detail::start_frame(task.work_id, clock_type::now() - running_since_);
        return reply;
    }

    // --- the watcher

    // Creates the watcher's timer and epoll set and starts it; exits with
    // thread_start_failed_exit when it cannot. After HELLO, so the pool sees
    // a worker that started and then exited with this code: tasks sent to
    // it never started and go to other workers.
    void start_watcher() {
        timer_fd_ = ::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
        epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
        ::epoll_event timer{};
        timer.events = EPOLLIN;
        timer.data.fd = timer_fd_;
        if (timer_fd_ < 0 || epoll_fd_ < 0 || ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, timer_fd_, &timer) != 0) {
            std::fprintf(stderr, "coproc: worker %d cannot create its watcher's timerfd and epoll set (%s): the worker exits with code %d\n",
                         static_cast<int>(::getpid()), std::strerror(errno), thread_start_failed_exit);
            detail::worker_quit(thread_start_failed_exit);
        }
        try {
            watcher_ = std::thread{[this] { run_watcher(); }};
        } catch (const std::system_error& e) {
            std::fputs(detail::describe_thread_failure("watcher", e,
                                               "the worker exits with code " + std::to_string(thread_start_failed_exit))
                           .c_str(),
                       stderr);
            detail::worker_quit(thread_start_failed_exit);
        }
    }

    // Sets the watcher's timer to fire `after` from now (a new task, or one
    // the timer fired too early for). With mutex_ held (timer_armed_).
    void set_watch_timer(clock_type::duration after) const {
        ::itimerspec when{};
        const auto nanos = std::max<std::int64_t>(1, std::chrono::duration_cast<std::chrono::nanoseconds>(after).count());
        when.it_value.tv_sec = static_cast<time_t>(nanos / 1'000'000'000);
        when.it_value.tv_nsec = static_cast<long>(nanos % 1'000'000'000);
        ::timerfd_settime(timer_fd_, 0, &when, nullptr);
    }

    // Until the session ends (stopping_); a worker that ends otherwise ends
    // with _exit, watcher and all.
    void run_watcher() {
        for (;;) {
            ::epoll_event events[2];
            const int count = ::epoll_wait(epoll_fd_, events, 2, -1);
            bool timer_fired = false;
            bool readable = false;
            for (int i = 0; i < count; ++i) {
                if (events[i].data.fd == timer_fd_) {
                    std::uint64_t expirations = 0;
                    [[maybe_unused]] const auto ignored = ::read(timer_fd_, &expirations, sizeof expirations);
                    timer_fired = true;
                } else {
                    readable = true;
                }
            }
            if (!watch(timer_fired, readable)) return;
        }
    }

    // One wake-up of the watcher: the timer fired, or a frame arrived while
    // a task runs (`readable`), or both; false when the session ends. Main
    // reads no frame while a task runs, so the reading role is free here
    // whenever a task runs.
    bool watch(bool timer_fired, bool readable) {
        std::unique_lock lock{mutex_};
        if (stopping_) return false;
        if (timer_fired) timer_armed_ = false;
        if (!running_ || bye_) return true; // the timer of a task that ended, or nothing more will come
        const auto ran = clock_type::now() - running_since_;
        if (ran < start_delay && !watch_now_) {
            // Set for an earlier task, which ended before it fired; or a
            // frame for a task that began while the watcher was reading for
            // the one before (it watched on): read it all the same.
            if (!timer_armed_) {
                timer_armed_ = true;
                set_watch_timer(start_delay - ran);
            }
            if (!readable) return true;
        } else {
            if (std::exchange(start_owed_, false)) {
                const detail::byte_buffer frame = detail::start_frame(running_id_, ran);
                // Taken before mutex_ is released: main, once the task ends,
                // sends its RESULT after this START, never before.
                auto write_lock = channel_.hold_writes();
                lock.unlock();
                channel_.write_all(frame);
                write_lock.unlock();
                lock.lock();
                if (!running_) return true;
            }
            if (!socket_watched_) {
                // From now on a frame wakes the watcher; one already waiting
                // does at once.
                watch_socket();
                return true;
            }
            if (!readable) return true;
        }
        reading_ = true;
        do {
            lock.unlock();
            read_frame();
            lock.lock();
        } while (running_ && !bye_ && (channel_.inbox_holds_bytes() || channel_.bytes_waiting()));
        reading_ = false;
        // Still running (the same task, or the next one, which main started
        // meanwhile and which dropped the socket from the set): watch on.
        if (running_ && !bye_) watch_socket();
        lock.unlock();
        reader_free_.notify_one(); // main may wait for the frame just read
        return true;
    }

    // Puts the socket in the watcher's epoll set, or re-arms it there:
    // one-shot, so each frame (or burst) wakes the watcher once; main drops
    // it when the task ends. With mutex_ held (socket_watched_).
    void watch_socket() {
        ::epoll_event socket{};
        socket.events = EPOLLIN | EPOLLONESHOT;
        socket.data.fd = channel_.fd();
        if (socket_watched_) {
            socket_watched_ = ::epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, channel_.fd(), &socket) == 0;
        } else {
            socket_watched_ = ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, channel_.fd(), &socket) == 0;
        }
    }

    detail::worker_channel channel_;
    detail::spare_memory spares_;
    std::uint64_t* start_word_ = nullptr;
    int timer_fd_ = -1;
    int epoll_fd_ = -1;
    // Under mutex_: the queue, who reads, the running task.
    std::mutex mutex_;
    std::condition_variable reader_free_; // reading_ turned false
    std::deque<call> queue_;
    bool bye_ = false;
    bool reading_ = false;        // a thread is reading frames from the socket
    bool socket_watched_ = false; // the socket is in the watcher's epoll set
    bool running_ = false;
    bool start_owed_ = false;     // the running task's START is not sent yet
    bool timer_armed_ = false;    // the watcher's timer is set and has not fired
    bool stopping_ = false;       // the session ends: the watcher returns
    bool watch_now_ = false;      // a stream waits for credit: read frames before start_delay
    std::condition_variable credit_changed_; // running_credit_ grew, or the task was cancelled
    std::uint32_t running_credit_ = 0;       // ITEMs the running stream may still send
    std::thread watcher_;
    std::uint64_t running_id_ = 0;
    clock_type::time_point running_since_{};
    std::stop_source running_stop_;
};

} // namespace

namespace {
std::atomic<detail::launch_hook> launch_hook_{nullptr};
} // namespace

void detail::set_launch_hook(launch_hook hook) noexcept { launch_hook_.store(hook); }

void run_worker_if_requested(int argc, char** argv) {
    if (argc < 2 || argv == nullptr || argv[1] == nullptr || std::strcmp(argv[1], worker_flag) != 0) {
        if (const auto hook = launch_hook_.load()) hook(argc, argv);
        return;
    }
    // Die with the parent. The check after it closes the race with a parent
    // that died before the call.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (const char* parent = std::getenv("COPROC_PARENT_PID"); parent != nullptr && ::getppid() != std::atoi(parent)) {
        detail::worker_quit(0);
    }
    // Programs a task execs must not hold the pool's socket open.
    ::fcntl(parent_socket, F_SETFD, FD_CLOEXEC);
    // The pool starts workers as "coproc-worker:<program>": name the thread
    // (what top shows, 15 characters at most) "coproc:<program>" too,
    // rather than "exe" for a program re-executed through /proc/self/exe.
    if (const std::string_view title = argv[0] != nullptr ? argv[0] : ""; title.starts_with("coproc-worker:")) {
        const std::string name = "coproc:" + std::string(title.substr(std::string_view{"coproc-worker:"}.size()));
        ::prctl(PR_SET_NAME, name.substr(0, 15).c_str());
    }
    // process_pool_options::keep_result_memory in ms, set by the pool (its
    // default lives there); not set: nothing is kept.
    const char* keep = std::getenv("COPROC_KEEP_RESULT_MS");
    // Shared buffers it receives stay mapped as long (received_mappings.hpp).
    detail::received_mappings::enable(std::chrono::milliseconds{keep != nullptr ? std::atoll(keep) : 0});
    // process_pool_options::worker_spin in us, likewise; not set: no spin.
    // Only on two CPUs or more: on one, the spin would hold up the very
    // process that sends the next CALL.
    const char* spin = std::getenv("COPROC_WORKER_SPIN_US");
    const bool several_cpus = detail::usable_cpus() >= 2;
    worker_session session{parent_socket, std::chrono::milliseconds{keep != nullptr ? std::atoll(keep) : 0},
                           std::chrono::microseconds{spin != nullptr && several_cpus ? std::max(0LL, std::atoll(spin)) : 0}};
    session.serve();
}

} // namespace coproc

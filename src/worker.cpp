// Worker mode: the process a process_pool starts. Two threads:
//
//   reader (main thread)  reads frames from the parent: CALL frames are
//                         queued, CANCEL stops a task, BYE ends the session
//                         once the queue is done, EOF ends the process.
//   runner                runs queued calls one at a time: START, then
//                         RESULT or ERROR.
//
// A large block result, once sent, is kept as the spare (one at a time): the
// next large block argument of its type is received into its memory instead
// of new pages. A third thread, the janitor (started with the first spare),
// frees a spare not taken within process_pool_options::keep_result_memory,
// busy or not.
//
// A thread that cannot be created (std::thread throws std::system_error:
// EAGAIN under RLIMIT_NPROC, kernel.threads-max or a cgroup's pids.max,
// ENOMEM for its stack) is reported on stderr with the limit that likely
// applies. Without the runner no task can run: the worker exits with
// thread_start_failed_exit, which the pool reports as the worker's exit
// code. Without the janitor the worker serves on, keeping no spares.
//
// Plain blocking I/O: a worker serves one parent over one socket and has
// nothing else to wait for. Writes from both threads go through one mutex, so
// frames never interleave; a result is encoded completely before any of it is
// written, so a failure while encoding never leaves half a frame behind.
#include "task_progress.hpp"

#include <coproc/detail/remote_function.hpp>
#include <coproc/detail/wire.hpp>
#include <coproc/error.hpp>
#include <coproc/worker.hpp>

#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstddef>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <stop_token>
#include <system_error>
#include <thread>
#include <vector>

namespace coproc {

namespace {

namespace wire = detail::wire;

constexpr const char* worker_flag = "--coproc-worker";
constexpr int parent_socket = 3;
constexpr std::size_t max_call_frame = wire::max_payload;
using clock_type = std::chrono::steady_clock;

std::atomic<std::size_t> blocks_reused{0};
std::atomic<std::size_t> spare_bytes{0};

[[noreturn]] void quit(int status) {
    std::fflush(nullptr);
    ::_exit(status);
}

// The exit code of a worker that could not start its runner thread:
// EX_OSERR of <sysexits.h> ("can't fork"), distinct from the 3 of a
// protocol fault and from the exit codes tasks commonly use.
constexpr int thread_start_failed_exit = 71;

// The first line of `path`, or empty when it cannot be read.
std::string first_line(const std::string& path) {
    std::ifstream file{path};
    std::string line;
    std::getline(file, line);
    return line;
}

// ", now <limit>" for a resource limit, "unlimited" included.
std::string current_limit(int resource) {
    ::rlimit limit{};
    if (::getrlimit(resource, &limit) != 0) return {};
    return limit.rlim_cur == RLIM_INFINITY ? ", now unlimited" : ", now " + std::to_string(limit.rlim_cur);
}

// The path of `file` of `controller` ("pids", "memory") in this process's
// cgroup, under cgroup v1 (/sys/fs/cgroup/<controller>/<path>) or v2
// (/sys/fs/cgroup/<path>), or empty when it has none.
std::string cgroup_file(std::string_view controller, std::string_view file) {
    std::ifstream membership{"/proc/self/cgroup"}; // lines "id:controllers:path"; "0::path" under v2
    std::string line;
    std::string unified;
    while (std::getline(membership, line)) {
        const auto first = line.find(':');
        const auto second = line.find(':', first + 1);
        if (first == std::string::npos || second == std::string::npos) continue;
        const std::string controllers = "," + line.substr(first + 1, second - first - 1) + ",";
        std::string path = line.substr(second + 1);
        if (path == "/") path.clear();
        if (controllers == ",,") {
            unified = "/sys/fs/cgroup" + path + "/" + std::string(file);
            continue;
        }
        if (controllers.find("," + std::string(controller) + ",") == std::string::npos) continue;
        const std::string candidate = "/sys/fs/cgroup/" + std::string(controller) + path + "/" + std::string(file);
        if (!first_line(candidate).empty()) return candidate;
    }
    return !unified.empty() && !first_line(unified).empty() ? unified : std::string{};
}

// What a worker prints when std::thread could not start its `thread`:
// the error, the limit that likely applies, and `consequence`.
std::string describe_thread_failure(std::string_view thread, const std::system_error& error, std::string_view consequence) {
    std::string text = "coproc: worker " + std::to_string(::getpid()) + " cannot start its " + std::string(thread) + " thread (" +
                       error.what() + "): ";
    if (error.code() == std::errc::resource_unavailable_try_again) {
        text += "a limit on threads was reached: RLIMIT_NPROC (ulimit -u" + current_limit(RLIMIT_NPROC) +
                "; it counts the threads of all the user's processes" +
                (::geteuid() == 0 ? std::string(", and does not apply to root, as this worker is") : std::string()) +
                "), kernel.threads-max "
                "(" + first_line("/proc/sys/kernel/threads-max") + ") or a cgroup's pids.max";
        if (const std::string pids = cgroup_file("pids", "pids.max"); !pids.empty()) {
            text += " (" + pids + " is " + first_line(pids) + ", pids.current " +
                    first_line(cgroup_file("pids", "pids.current")) + ")";
        }
    } else if (error.code() == std::errc::not_enough_memory) {
        text += "there is no memory for the thread's stack: RLIMIT_AS (ulimit -v" + current_limit(RLIMIT_AS) +
                "), the cgroup's memory.max or vm.max_map_count";
        std::string memory = cgroup_file("memory", "memory.max"); // v2
        if (memory.empty()) memory = cgroup_file("memory", "memory.limit_in_bytes"); // v1
        if (!memory.empty()) text += " (" + memory + " is " + first_line(memory) + ")";
    } else {
        text += "the system refused a new thread";
    }
    text += "; " + std::string(consequence) + "\n";
    return text;
}

class worker_session {
public:
    worker_session(int fd, std::chrono::milliseconds keep_result_memory) : fd_(fd), keep_for_(keep_result_memory) {}

    [[noreturn]] void serve() {
        send_hello();
        std::thread runner;
        try {
            runner = std::thread([this] { run_calls(); });
        } catch (const std::system_error& e) {
            // Without it no task can run. After HELLO, so the pool sees a
            // worker that started and then exited with this code: tasks sent
            // to it never started and go to other workers.
            std::fputs(describe_thread_failure("task runner", e,
                                               "the worker exits with code " + std::to_string(thread_start_failed_exit))
                           .c_str(),
                       stderr);
            quit(thread_start_failed_exit);
        }
        read_frames();
        // BYE: finish what was queued, then leave.
        runner.join();
        quit(0);
    }

private:
    struct call {
        std::uint64_t work_id;
        std::uint16_t flags;
        detail::byte_buffer payload; // the function id, then its encoded arguments...
        detail::prepared_arguments prepared{}; // ... or, when set, those arguments received in place
    };

    // Frames to send: `bytes`, with the `attached` parts (a large result,
    // sent from where the function left it) spliced in at their offsets.
    struct outgoing {
        detail::byte_buffer bytes;
        std::vector<detail::attached_bytes> attached;
        [[nodiscard]] bool empty() const noexcept { return bytes.empty() && attached.empty(); }
        void clear() noexcept {
            bytes.clear();
            attached.clear();
        }
    };

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

    void send(const detail::byte_buffer& frame) {
        std::lock_guard lock{write_mutex_};
        std::size_t sent = 0;
        while (sent < frame.size()) {
            const ssize_t n = ::send(fd_, frame.data() + sent, frame.size() - sent, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) quit(0); // the parent is gone
            sent += static_cast<std::size_t>(n);
        }
    }

    void send(const outgoing& frames) {
        if (frames.attached.empty()) {
            send(frames.bytes);
            return;
        }
        std::vector<::iovec> parts = detail::wire_parts(frames.bytes, frames.attached);
        std::lock_guard lock{write_mutex_};
        for (std::size_t next = 0; next < parts.size();) {
            ::msghdr message{};
            message.msg_iov = parts.data() + next;
            message.msg_iovlen = std::min<std::size_t>(parts.size() - next, IOV_MAX);
            const ssize_t n = ::sendmsg(fd_, &message, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) quit(0); // the parent is gone
            next = detail::consume_parts(parts, next, static_cast<std::size_t>(n));
        }
    }

    bool read_exact(void* into, std::size_t size) {
        auto* bytes = static_cast<char*>(into);
        std::size_t got = 0;
        while (got < size) {
            const ssize_t n = ::recv(fd_, bytes + got, size - got, 0);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return false;
            got += static_cast<std::size_t>(n);
        }
        return true;
    }

    void read_frames() {
        for (;;) {
            std::byte raw[wire::header_size];
            if (!read_exact(raw, sizeof raw)) quit(0); // EOF: the parent closed or died
            const wire::frame_header header = wire::read_header(raw);
            if (header.length > max_call_frame) {
                std::fprintf(stderr, "coproc worker %d: frame of %u bytes from the parent exceeds the limit\n",
                             static_cast<int>(::getpid()), header.length);
                quit(3);
            }
            call received{header.work_id, header.flags, {}};
            if (static_cast<wire::frame_kind>(header.kind) == wire::frame_kind::call) {
                read_call(header, received);
            } else {
                received.payload.resize(header.length);
                if (!read_exact(received.payload.data(), received.payload.size())) quit(0);
            }
            switch (static_cast<wire::frame_kind>(header.kind)) {
            case wire::frame_kind::call: {
                std::lock_guard lock{queue_mutex_};
                queue_.push_back(std::move(received));
                queue_changed_.notify_one();
                break;
            }
            case wire::frame_kind::cancel:
                cancel(header.work_id);
                break;
            case wire::frame_kind::recall:
                recall(header.work_id);
                break;
            case wire::frame_kind::bye: {
                std::lock_guard lock{queue_mutex_};
                bye_ = true;
                queue_changed_.notify_one();
                return;
            }
            default:
                std::fprintf(stderr, "coproc worker %d: unexpected frame kind %u from the parent\n",
                             static_cast<int>(::getpid()), header.kind);
                quit(3);
            }
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
            if (!read_exact(into.payload.data(), into.payload.size())) quit(0);
            return;
        }
        into.payload.resize(head);
        if (!read_exact(into.payload.data(), head)) quit(0);
        std::uint64_t function_id = 0;
        detail::wire_count count = 0;
        std::memcpy(&function_id, into.payload.data(), sizeof function_id);
        std::memcpy(&count, into.payload.data() + sizeof function_id, sizeof count);
        const detail::remote_function_entry* function = detail::find_remote_function(function_id);
        if (function != nullptr && !function->ambiguous && function->prepare != nullptr) {
            kept_block spare = take_spare();
            const bool had_spare = spare.block.owner != nullptr;
            into.prepared = function->prepare(count, header.length - head, spare.block);
            if (had_spare && !spare.block.owner) blocks_reused.fetch_add(1, std::memory_order_relaxed);
            if (spare.block.owner) put_back_spare(std::move(spare));
        }
        if (into.prepared.values) {
            into.payload.resize(sizeof function_id); // run() reads the function id from it
            if (!read_exact(into.prepared.block.data(), into.prepared.block.size())) quit(0);
            return;
        }
        into.payload.resize(header.length); // as usual, after the bytes read already
        if (!read_exact(into.payload.data() + head, header.length - head)) quit(0);
    }

    // A block container kept for its memory, with how much it holds and
    // when it is to be freed.
    struct kept_block {
        detail::spare_block block;
        std::size_t bytes = 0;
        clock_type::time_point expiry{};
    };

    // After `sent` went out: keeps its largest block container (a result
    // sent from where the function left it) as the spare, in place of the
    // one kept before; frees the rest.
    void keep_spare(outgoing& sent) {
        kept_block kept;
        for (const auto& part : sent.attached) {
            if (part.container != nullptr && part.reserved > kept.bytes && part.owner.use_count() == 1) {
                kept = {{part.owner, part.container}, part.reserved, {}};
            }
        }
        sent.clear();
        if (!kept.block.owner || keep_for_ <= std::chrono::milliseconds::zero()) return;
        kept.expiry = clock_type::now() + keep_for_;
        kept_block old;
        {
            std::lock_guard lock{spare_mutex_};
            if (!janitor_started_) {
                janitor_started_ = true;
                janitor_running_ = start_janitor();
            }
            if (!janitor_running_) return; // nothing would free it: `kept` is freed now, not kept
            old = std::exchange(spare_, std::move(kept));
            spare_bytes.store(spare_.bytes, std::memory_order_relaxed);
        }
        spare_changed_.notify_one();
    } // `old` is freed here, outside the lock

    // Starts the janitor; false, said on stderr, when no thread can be
    // created. Only memory is lost then, not work: the worker serves on.
    bool start_janitor() {
        try {
            std::thread{[this] { run_janitor(); }}.detach(); // the process ends with _exit
            return true;
        } catch (const std::system_error& e) {
            std::fputs(describe_thread_failure("janitor", e,
                                               "the worker serves on, without keeping the memory of large results "
                                               "for the next task (process_pool_options::keep_result_memory)")
                           .c_str(),
                       stderr);
            return false;
        }
    }

    kept_block take_spare() {
        std::lock_guard lock{spare_mutex_};
        spare_bytes.store(0, std::memory_order_relaxed);
        return std::exchange(spare_, {});
    }

    // Not taken: back, unless it expired or another was kept meanwhile (then
    // it is freed, outside the lock).
    void put_back_spare(kept_block spare) {
        {
            std::lock_guard lock{spare_mutex_};
            if (spare_.block.owner || clock_type::now() >= spare.expiry) return;
            spare_ = std::move(spare);
            spare_bytes.store(spare_.bytes, std::memory_order_relaxed);
        }
        spare_changed_.notify_one();
    }

    // The janitor: frees each spare when it expires.
    void run_janitor() {
        std::unique_lock lock{spare_mutex_};
        for (;;) {
            if (!spare_.block.owner) {
                spare_changed_.wait(lock);
            } else if (clock_type::now() < spare_.expiry) {
                spare_changed_.wait_until(lock, spare_.expiry);
            } else {
                kept_block expired = std::exchange(spare_, {});
                spare_bytes.store(0, std::memory_order_relaxed);
                lock.unlock();
                expired = {}; // its memory goes back, outside the lock
                lock.lock();
            }
        }
    }

    // CANCEL: a task still queued is dropped without running and answered
    // with a cancelled_error; the running one has its stop token stopped and
    // answers when its function returns. An id not held here (its answer is
    // already on the way) is ignored.
    void cancel(std::uint64_t work_id) {
        bool dropped = false;
        {
            std::lock_guard lock{queue_mutex_};
            if (running_id_ == work_id) {
                running_stop_.request_stop();
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
    // The queue mutex orders this against the runner taking the task.
    void recall(std::uint64_t work_id) {
        {
            std::lock_guard lock{queue_mutex_};
            const auto found = std::find_if(queue_.begin(), queue_.end(),
                                            [work_id](const call& queued) { return queued.work_id == work_id; });
            if (found == queue_.end()) return;
            queue_.erase(found);
        }
        detail::byte_buffer reply;
        wire::finish_frame(reply, wire::begin_frame(reply, wire::frame_kind::recalled, work_id));
        send(reply);
    }

    // Runs queued calls one at a time. The RESULT (or ERROR) of a call is
    // held back while another call is already queued, and goes out in one
    // send with that call's START: one system call per task instead of two
    // when the parent keeps the queue full. START itself is never delayed
    // past the start of its task, so a worker that dies mid-task has always
    // told the parent the task started (no task is run twice).
    void run_calls() {
        outgoing held; // the last RESULT/ERROR, not yet sent
        for (;;) {
            call next;
            {
                std::unique_lock lock{queue_mutex_};
                if (queue_.empty() && !held.empty()) {
                    lock.unlock();
                    send(held); // nothing to pair it with: send it now
                    keep_spare(held);
                    lock.lock();
                }
                queue_changed_.wait(lock, [this] { return !queue_.empty() || bye_; });
                if (queue_.empty()) break;
                next = std::move(queue_.front());
                queue_.pop_front();
                running_id_ = next.work_id;
                running_stop_ = std::stop_source{};
            }
            held = run(next, std::move(held));
            std::lock_guard lock{queue_mutex_};
            running_id_ = 0;
        }
        if (!held.empty()) send(held);
    }

    // Sends `held` together with this task's START, runs the task, and
    // returns its RESULT or ERROR frame for the caller to send.
    outgoing run(const call& task, outgoing held) {
        if ((task.flags & wire::frame_flag::initializer) == 0) {
            wire::finish_frame(held.bytes, wire::begin_frame(held.bytes, wire::frame_kind::start, task.work_id));
        }
        if (!held.empty()) send(held);
        keep_spare(held); // a large result sent from where it was

        outgoing reply;
        std::uint64_t function_id = 0;
        if (task.payload.size() < sizeof function_id) {
            std::fprintf(stderr, "coproc worker %d: CALL frame too short\n", static_cast<int>(::getpid()));
            quit(3);
        }
        std::memcpy(&function_id, task.payload.data(), sizeof function_id);
        const auto arguments = std::span{task.payload}.subspan(sizeof function_id);
        const detail::remote_function_entry* function = detail::find_remote_function(function_id);
        if (function == nullptr || function->ambiguous) {
            const auto offset = wire::begin_frame(reply.bytes, wire::frame_kind::error, task.work_id);
            if (function == nullptr) {
                detail::encode_unknown_function(function_id, reply.bytes);
            } else {
                detail::encode_ambiguous_function(function->name, reply.bytes);
            }
            wire::finish_frame(reply.bytes, offset);
            return reply;
        }
        const detail::invoker invoke = (task.flags & wire::frame_flag::chunk) != 0 ? function->invoke_chunk : function->invoke;
        std::stop_token token;
        {
            std::lock_guard lock{queue_mutex_};
            token = running_stop_.get_token();
        }
        std::size_t offset = 0; // of the RESULT frame
        try {
            offset = wire::begin_frame(reply.bytes, wire::frame_kind::result, task.work_id);
            // report_progress in the task; a report it holds back goes out
            // when this ends, before the answer.
            std::optional<detail::task_progress> progress;
            if ((task.flags & wire::frame_flag::initializer) == 0) progress.emplace(task.work_id, &send_frame, this);
            if (task.prepared.values) {
                function->invoke_prepared(task.prepared.values.get(), reply.bytes, reply.attached, std::move(token));
            } else {
                invoke(arguments, reply.bytes, reply.attached, std::move(token));
            }
            progress.reset();
            if ((task.flags & wire::frame_flag::initializer) != 0) { // its value is not used
                reply.bytes.resize(offset + wire::header_size);
                reply.attached.clear();
            }
            // A result too large for a frame throws: an ERROR instead.
            wire::finish_frame(reply.bytes, offset, detail::attached_size(reply.attached));
        } catch (const detail::chunk_failure& failure) {
            // The results before the failing input, as a partial RESULT,
            // then the ERROR, in one send.
            try {
                const std::uint16_t flags = wire::frame_flag::partial;
                std::memcpy(reply.bytes.data() + offset + offsetof(wire::frame_header, flags), &flags, sizeof flags);
                wire::finish_frame(reply.bytes, offset, detail::attached_size(reply.attached));
            } catch (...) {
                reply.clear(); // the partial results cannot travel: the error alone does
            }
            const auto error_offset = wire::begin_frame(reply.bytes, wire::frame_kind::error, task.work_id);
            detail::encode_exception(failure.error, reply.bytes);
            wire::finish_frame(reply.bytes, error_offset);
        } catch (...) {
            reply.clear(); // drop whatever part of the result was encoded
            const auto error_offset = wire::begin_frame(reply.bytes, wire::frame_kind::error, task.work_id);
            detail::encode_exception(std::current_exception(), reply.bytes);
            wire::finish_frame(reply.bytes, error_offset);
        }
        return reply;
    }

    int fd_;
    std::mutex write_mutex_;
    std::mutex queue_mutex_;
    std::condition_variable queue_changed_;
    std::deque<call> queue_;
    bool bye_ = false;
    std::uint64_t running_id_ = 0;
    std::stop_source running_stop_;
    std::chrono::milliseconds keep_for_;
    std::mutex spare_mutex_;
    std::condition_variable spare_changed_;
    kept_block spare_;
    bool janitor_started_ = false; // these two under spare_mutex_
    bool janitor_running_ = false;
};

} // namespace

namespace detail {

std::size_t worker_blocks_reused() noexcept { return blocks_reused.load(std::memory_order_relaxed); }
std::size_t worker_spare_bytes() noexcept { return spare_bytes.load(std::memory_order_relaxed); }

} // namespace detail

void run_worker_if_requested(int argc, char** argv) {
    if (argc < 2 || argv == nullptr || argv[1] == nullptr || std::strcmp(argv[1], worker_flag) != 0) return;
    // Die with the parent. The check after it closes the race with a parent
    // that died before the call.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (const char* parent = std::getenv("COPROC_PARENT_PID"); parent != nullptr && ::getppid() != std::atoi(parent)) {
        quit(0);
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
    worker_session session{parent_socket, std::chrono::milliseconds{keep != nullptr ? std::atoll(keep) : 0}};
    session.serve();
}

} // namespace coproc

// coproc/error.hpp - the exception types coproc throws.
//
// Every error coproc raises derives from coproc::error, so one catch clause
// can tell coproc's failures apart from the user's own exceptions.
#pragma once

#include <exception>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace coproc {

// Base of every exception coproc throws.
class error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// The operation or task was cancelled: a stop was requested on its
// std::stop_token (directly, by event_loop::stop(), by losing a when_any, or
// by a sibling's failure in when_all) before it completed.
class cancelled_error : public error {
public:
    cancelled_error();
    explicit cancelled_error(const std::string& what);
};

// A deadline set with coproc::with_timeout expired before the awaited work
// completed. The work itself was cancelled and awaited before this is thrown.
class timeout_error : public error {
public:
    timeout_error();
    explicit timeout_error(const std::string& what);
};

// io_uring cannot be used in this process. Thrown by the event_loop
// constructor. what() names the cause (seccomp filter, the
// kernel.io_uring_disabled sysctl, a kernel without io_uring, the locked
// memory limit) and what the user can do about it; cause() is the errno that
// io_uring_setup(2) failed with.
class io_uring_unavailable : public error {
public:
    io_uring_unavailable(int cause, const std::string& what);
    [[nodiscard]] int cause() const noexcept { return cause_; }

private:
    int cause_;
};

// The pool cannot run tasks any more: its initializer failed in a worker, or
// a worker died under the compatibility policy (crash_policy::break_pool, as
// CPython's executor does). Every pending and later submit fails with it.
class broken_process_pool : public error {
public:
    using error::error;
    broken_process_pool(const std::string& what, std::exception_ptr cause) : error(what), cause_(std::move(cause)) {}
    // The error that broke the pool (the initializer's exception), if any.
    [[nodiscard]] std::exception_ptr cause() const noexcept { return cause_; }

private:
    std::exception_ptr cause_;
};

// The worker running a task died before the task finished. Only the tasks
// dispatched to that worker fail with this; the pool starts a replacement.
class worker_died : public error {
public:
    worker_died(int pid, int signal, int exit_code, std::string function, const std::string& what);
    // The worker's process id.
    [[nodiscard]] int pid() const noexcept { return pid_; }
    // The signal that killed it, or 0 when it exited.
    [[nodiscard]] int signal() const noexcept { return signal_; }
    // Its exit code when it exited, or -1 when a signal killed it.
    [[nodiscard]] int exit_code() const noexcept { return exit_code_; }
    // The function of the task that failed.
    [[nodiscard]] const std::string& function() const noexcept { return function_; }

private:
    int pid_;
    int signal_;
    int exit_code_;
    std::string function_;
};

// A task threw an exception that cannot travel as its own type: a type that
// is neither a standard exception, nor one of coproc's own (exactly: a
// subclass of coproc::error other than cancelled_error is not rebuilt as its
// base), nor registered with COPROC_REGISTER_EXCEPTION; or something not
// derived from std::exception at all (`throw 42`).
class remote_error : public error {
public:
    // `std_exception`: whether the original derives from std::exception
    // (when it does not, it has no what() and `message` is empty).
    remote_error(std::string type_name, std::string message, int pid, std::string function, bool std_exception = true);
    // The demangled type name of the original exception ("int" for `throw
    // 42`), or empty when even that is unknown.
    [[nodiscard]] const std::string& type_name() const noexcept { return type_name_; }
    // The original what() (empty when it had none).
    [[nodiscard]] const std::string& message() const noexcept { return message_; }
    // The worker that ran the task.
    [[nodiscard]] int pid() const noexcept { return pid_; }
    [[nodiscard]] const std::string& function() const noexcept { return function_; }
    // Whether the original derives from std::exception.
    [[nodiscard]] bool std_exception() const noexcept { return std_exception_; }

private:
    std::string type_name_;
    std::string message_;
    int pid_;
    std::string function_;
    bool std_exception_;
};

// No worker could be started to run the task, for a shortage that may pass
// (a resource limit: open files, processes, memory), while the pool had no
// worker alive. what() names the limit. The pool is not broken: it serves
// with the workers it has whenever it has some, and later submits try to
// start workers again. code() is the errno of the failed socketpair or
// posix_spawn.
class worker_start_failed : public error {
public:
    worker_start_failed(int code, const std::string& what) : error(what), code_(code) {}
    [[nodiscard]] int code() const noexcept { return code_; }

private:
    int code_;
};

// A task ran out of memory in a worker that has a hard limit
// (process_pool_options::worker_address_space_limit, RLIMIT_AS): an
// allocation the limit refused threw std::bad_alloc, and the task failed
// with this instead, naming the limit. Only that task fails; its worker
// serves on. limit() is the limit in bytes.
class memory_limit_exceeded : public error {
public:
    memory_limit_exceeded(std::uint64_t limit, const std::string& what) : error(what), limit_(limit) {}
    [[nodiscard]] std::uint64_t limit() const noexcept { return limit_; }

private:
    std::uint64_t limit_;
};

// submit() while the pool already holds process_pool_options::max_pending
// tasks waiting for a worker. try_submit returns nothing instead, and
// co_await submit_async waits for room.
class queue_full : public error {
public:
    queue_full();
    explicit queue_full(const std::string& what);
};

// submit() after shutdown() began.
class pool_closed : public error {
public:
    pool_closed();
    explicit pool_closed(const std::string& what);
};

} // namespace coproc

// coproc/error.hpp - the exception types coproc throws.
//
// Every error coproc raises derives from coproc::error, so one catch clause
// can tell coproc's failures apart from the user's own exceptions.
#pragma once

#include <stdexcept>
#include <string>

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

} // namespace coproc

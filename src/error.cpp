#include <coproc/error.hpp>

#include <string>
#include <utility>

namespace coproc {

cancelled_error::cancelled_error() : error("coproc: operation cancelled") {}
cancelled_error::cancelled_error(const std::string& what) : error(what) {}

timeout_error::timeout_error() : error("coproc: deadline expired") {}
timeout_error::timeout_error(const std::string& what) : error(what) {}

io_uring_unavailable::io_uring_unavailable(int cause, const std::string& what)
    : error(what), cause_(cause) {}

worker_died::worker_died(int pid, int signal, int exit_code, std::string function, const std::string& what)
    : error(what), pid_(pid), signal_(signal), exit_code_(exit_code), function_(std::move(function)) {}

namespace {
std::string describe_remote(const std::string& type_name, const std::string& message, int pid, const std::string& function) {
    return "coproc: " + function + " raised " + type_name + " in worker " + std::to_string(pid) + ": " + message;
}
} // namespace

remote_error::remote_error(std::string type_name, std::string message, int pid, std::string function)
    : error(describe_remote(type_name, message, pid, function)),
      type_name_(std::move(type_name)),
      message_(std::move(message)),
      pid_(pid),
      function_(std::move(function)) {}

queue_full::queue_full()
    : error("coproc: the process pool's queue is full (process_pool_options::max_pending); use try_submit or "
            "co_await submit_async to wait for room") {}

pool_closed::pool_closed() : error("coproc: submit after the process pool was shut down") {}

} // namespace coproc

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
// "coproc: f raised T in worker 12: message", and where there is no message
// to end with, a sentence that says why instead of a dangling ": ".
std::string describe_remote(const std::string& type_name, const std::string& message, int pid, const std::string& function,
                            bool std_exception) {
    const std::string where = " in worker " + std::to_string(pid);
    if (!std_exception) {
        const std::string type = type_name.empty() ? "an exception of unknown type" : "an exception of type " + type_name;
        return "coproc: " + function + " raised " + type + " (not derived from std::exception)" + where;
    }
    const std::string type = type_name.empty() ? "an exception of unknown type" : type_name;
    if (message.empty()) return "coproc: " + function + " raised " + type + where + " (its what() was empty)";
    return "coproc: " + function + " raised " + type + where + ": " + message;
}
} // namespace

remote_error::remote_error(std::string type_name, std::string message, int pid, std::string function, bool std_exception)
    : error(describe_remote(type_name, message, pid, function, std_exception)),
      type_name_(std::move(type_name)),
      message_(std::move(message)),
      pid_(pid),
      function_(std::move(function)),
      std_exception_(std_exception) {}

queue_full::queue_full()
    : error("coproc: the process pool's queue is full (process_pool_options::max_pending); use try_submit or "
            "co_await submit_async to wait for room") {}
queue_full::queue_full(const std::string& what) : error(what) {}

pool_closed::pool_closed() : error("coproc: submit after the process pool was shut down") {}
pool_closed::pool_closed(const std::string& what) : error(what) {}

} // namespace coproc

#include <coproc/error.hpp>

namespace coproc {

cancelled_error::cancelled_error() : error("coproc: operation cancelled") {}
cancelled_error::cancelled_error(const std::string& what) : error(what) {}

timeout_error::timeout_error() : error("coproc: deadline expired") {}
timeout_error::timeout_error(const std::string& what) : error(what) {}

io_uring_unavailable::io_uring_unavailable(int cause, const std::string& what)
    : error(what), cause_(cause) {}

} // namespace coproc

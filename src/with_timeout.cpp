#include <coproc/with_timeout.hpp>

namespace coproc::detail {

std::string describe_deadline(std::chrono::steady_clock::duration limit) {
    const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(limit).count();
    std::string text = "coproc: deadline of ";
    if (micros % 1000 == 0) {
        text += std::to_string(micros / 1000) + " ms";
    } else {
        text += std::to_string(micros) + " us";
    }
    return text + " expired";
}

} // namespace coproc::detail

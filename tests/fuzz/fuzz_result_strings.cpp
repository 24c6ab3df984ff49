// A RESULT payload decoded in the parent as std::vector<std::string>: the
// type whose claimed count used to cost gigabytes (a 24-byte frame, 2 GiB).
#include "fuzz_support.hpp"

#include <coproc/detail/work_item.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    using strings = std::vector<std::string>;
    coproc_fuzz::write_seeds_if_asked({
        coproc_fuzz::encoded("", strings{}),
        coproc_fuzz::encoded("", strings{"a", "", "worker"}),
        coproc_fuzz::encoded("", strings{std::string(40, 'x'), "y"}),
    });
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    coproc::detail::typed_work_item<std::vector<std::string>> item;
    try {
        item.store_result(std::as_bytes(std::span{data, size}));
    } catch (const cereal::Exception&) {
        // Refused: what the parent turns into a failed future.
    }
    return 0;
}

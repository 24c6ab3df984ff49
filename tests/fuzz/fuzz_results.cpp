// RESULT payloads decoded in the parent, as typed_work_item<T> does for the
// future of a function returning T. The first byte picks T; the rest is the
// payload. For the block containers (std::string, std::vector<double>) the
// parent's other path is taken too: a large result received straight into
// the value (prepare_block_result), then its elements copied in.
#include "fuzz_support.hpp"

#include <coproc/detail/work_item.hpp>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

namespace {

using string_series = std::map<std::string, std::vector<int>>;
using nested_strings = std::vector<std::vector<std::string>>;
using mixed = std::tuple<std::int32_t, std::optional<std::string>, std::variant<std::int32_t, std::string, std::vector<double>>>;
using counts = std::unordered_map<std::string, std::int32_t>;
using queued = std::deque<std::list<std::string>>;
using pointers = std::pair<std::shared_ptr<std::int64_t>, std::shared_ptr<double>>;
using shared_strings = std::pair<std::shared_ptr<std::string>, std::unique_ptr<std::vector<std::string>>>;
using odds = std::tuple<std::set<std::string>, std::array<std::string, 2>, std::chrono::milliseconds, std::vector<bool>>;

template <class T>
void store(std::span<const std::byte> payload) {
    coproc::detail::typed_work_item<T> item;
    try {
        item.store_result(payload);
    } catch (const cereal::Exception&) {
        // Refused: what the parent turns into a failed future.
    }
    if constexpr (coproc::detail::block_container<T>::value) {
        coproc::detail::typed_work_item<T> received;
        const std::span<std::byte> into = received.prepare_block_result(payload, payload.size(), {});
        if (!into.empty()) std::memcpy(into.data(), payload.data() + sizeof(coproc::detail::wire_count), into.size());
    }
}

} // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    using coproc_fuzz::encoded;
    auto pick = [](int type) { return std::string(1, static_cast<char>(type)); };
    auto shared = std::make_shared<std::int64_t>(7);
    coproc_fuzz::write_seeds_if_asked({
        encoded(pick(0), string_series{{"a", {1, 2}}, {"b", {}}}),
        encoded(pick(1), nested_strings{{"a"}, {}, {"b", "c"}}),
        encoded(pick(2), mixed{1, "two", std::vector<double>{3.0}}),
        encoded(pick(2), mixed{1, std::nullopt, std::string{"v"}}),
        encoded(pick(3), std::string{"text"}),
        encoded(pick(4), std::vector<double>{1.5, -2.0}),
        encoded(pick(5), counts{{"x", 1}, {"y", 2}}),
        encoded(pick(6), queued{{"p", "q"}, {}}),
        encoded(pick(7), pointers{shared, std::make_shared<double>(0.5)}),
        encoded(pick(8), shared_strings{std::make_shared<std::string>("s"),
                                       std::make_unique<std::vector<std::string>>(2, "u")}),
        encoded(pick(9), odds{{"m"}, {"x", "y"}, std::chrono::milliseconds{5}, {true, false}}),
    });
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const auto payload = std::as_bytes(std::span{data + 1, size - 1});
    switch (data[0] % 10) {
    case 0: store<string_series>(payload); break;
    case 1: store<nested_strings>(payload); break;
    case 2: store<mixed>(payload); break;
    case 3: store<std::string>(payload); break;
    case 4: store<std::vector<double>>(payload); break;
    case 5: store<counts>(payload); break;
    case 6: store<queued>(payload); break;
    case 7: store<pointers>(payload); break;
    case 8: store<shared_strings>(payload); break;
    default: store<odds>(payload); break;
    }
    return 0;
}

// CALL payloads decoded in the worker: the argument tuple of remote<F>
// (one call), a vector of argument tuples (a map chunk, frame flag `chunk`),
// a callable object's state before its arguments (remote_object<T>), and a
// single block-container argument received in place (prepare, then
// invoke_prepared), as src/worker.cpp runs them. The first byte picks the
// function and the path; the rest is the payload after the function id.
#include "fuzz_support.hpp"

#include <coproc/detail/remote_function.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

namespace fuzzed {

std::size_t count_words(std::vector<std::string> words, std::map<std::string, std::int32_t> weights) {
    return words.size() + weights.size();
}

double mean(std::vector<double> values) {
    double sum = 0;
    for (double value : values) sum += value;
    return values.empty() ? 0.0 : sum / static_cast<double>(values.size());
}

std::string describe(std::tuple<std::int32_t, std::string> head, std::optional<std::vector<std::int32_t>> extra,
                     std::variant<std::int32_t, std::string> choice) {
    return std::get<1>(head) + (extra ? "+" : "") + (choice.index() == 0 ? "n" : "s");
}

std::size_t text_length(std::string text, std::uint8_t times, std::stop_token) {
    return text.size() * times;
}

struct labelled_scale {
    double factor = 1;
    std::vector<std::string> labels;
    std::size_t operator()(std::vector<std::vector<double>> rows) const { return rows.size() + labels.size(); }
    template <class Archive>
    void serialize(Archive& archive) {
        archive(factor, labels);
    }
};

} // namespace fuzzed

namespace {

using coproc::detail::remote;
using coproc::detail::remote_object;

template <class Function>
void run(std::span<const std::byte> payload, bool chunk) {
    coproc::detail::byte_buffer out;
    std::vector<coproc::detail::attached_bytes> attached;
    try {
        if constexpr (requires { &Function::invoke_chunk; }) {
            if (chunk) {
                Function::invoke_chunk(payload, out, attached, {});
                return;
            }
        }
        Function::invoke(payload, out, attached, {});
    } catch (const cereal::Exception&) {
        // Refused: the worker answers with an ERROR frame and serves on.
    }
}

// The worker's reader for a large CALL whose one argument is a block
// container: the count, then the elements straight into the argument.
void run_prepared(std::span<const std::byte> payload) {
    using function = remote<&fuzzed::mean>;
    std::uint64_t count = 0;
    if (payload.size() < sizeof count) return;
    std::memcpy(&count, payload.data(), sizeof count);
    const auto rest = payload.subspan(sizeof count);
    coproc::detail::spare_block spare;
    const coproc::detail::prepared_arguments prepared = function::prepare(count, rest.size(), spare);
    if (!prepared.values) return; // then decoded as any payload
    if (!prepared.block.empty()) std::memcpy(prepared.block.data(), rest.data(), prepared.block.size());
    coproc::detail::byte_buffer out;
    std::vector<coproc::detail::attached_bytes> attached;
    function::invoke_prepared(prepared.values.get(), out, attached, {});
}

} // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    using coproc_fuzz::encoded;
    auto pick = [](int function, bool chunk) { return std::string(1, static_cast<char>(function | (chunk ? 8 : 0))); };
    using words_arguments = std::tuple<std::vector<std::string>, std::map<std::string, std::int32_t>>;
    coproc_fuzz::write_seeds_if_asked({
        encoded(pick(0, false), std::vector<std::string>{"a", "b"}, std::map<std::string, std::int32_t>{{"a", 2}}),
        encoded(pick(0, true), std::vector<words_arguments>{{{"x"}, {}}, {{}, {{"y", 1}}}}),
        encoded(pick(1, false), std::vector<double>{1.0, 2.0}),
        encoded(pick(1, true), std::vector<std::tuple<std::vector<double>>>{{{1.0}}, {{}}}),
        encoded(pick(2, false), std::tuple<std::int32_t, std::string>{1, "h"}, std::optional<std::vector<std::int32_t>>{{1}},
                std::variant<std::int32_t, std::string>{std::string{"s"}}),
        encoded(pick(3, false), std::string{"text"}, std::uint8_t{3}),
        encoded(pick(4, false), fuzzed::labelled_scale{2.0, {"l"}}, std::vector<std::vector<double>>{{1.0}, {}}),
        encoded(pick(5, false), std::vector<double>{0.5, 0.25}),
    });
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const auto payload = std::as_bytes(std::span{data + 1, size - 1});
    const bool chunk = (data[0] & 8) != 0;
    switch (data[0] & 7) {
    case 0: run<remote<&fuzzed::count_words>>(payload, chunk); break;
    case 1: run<remote<&fuzzed::mean>>(payload, chunk); break;
    case 2: run<remote<&fuzzed::describe>>(payload, chunk); break;
    case 3: run<remote<&fuzzed::text_length>>(payload, chunk); break;
    case 4: run<remote_object<fuzzed::labelled_scale>>(payload, false); break;
    default: run_prepared(payload); break;
    }
    return 0;
}

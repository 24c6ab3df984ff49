// Helpers for the tests of coproc's encoding: what cereal's own binary
// archive writes, what coproc writes, and decoding from bytes.
#pragma once

#include <coproc/detail/byte_buffer.hpp>
#include <coproc/detail/serialization.hpp>

#include <cereal/archives/binary.hpp>

#include <span>
#include <sstream>
#include <string>

namespace test_support {

// What cereal's own binary archive writes for `value`.
template <class T>
std::string cereal_bytes(const T& value) {
    std::ostringstream out;
    {
        cereal::BinaryOutputArchive archive{out};
        archive(value);
    }
    return out.str();
}

// What coproc's encoder writes for `value`.
template <class T>
std::string coproc_bytes(const T& value) {
    coproc::detail::byte_buffer out;
    coproc::detail::encode_into(out, value);
    return {reinterpret_cast<const char*>(out.data()), out.size()};
}

// A T decoded by coproc from `bytes`; throws what the decoder throws.
template <class T>
T decoded(const std::string& bytes) {
    T value{};
    coproc::detail::decode_from(std::as_bytes(std::span{bytes.data(), bytes.size()}), value);
    return value;
}

} // namespace test_support

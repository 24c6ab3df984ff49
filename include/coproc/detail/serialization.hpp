// coproc/detail/serialization.hpp - cereal binary archives over byte
// buffers, and the compile-time check that a type can travel.
#pragma once

#include <coproc/detail/byte_buffer.hpp>

#include <cereal/archives/binary.hpp>
#include <cereal/types/array.hpp>
#include <cereal/types/chrono.hpp>
#include <cereal/types/deque.hpp>
#include <cereal/types/list.hpp>
#include <cereal/types/map.hpp>
#include <cereal/types/memory.hpp>
#include <cereal/types/optional.hpp>
#include <cereal/types/set.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/tuple.hpp>
#include <cereal/types/unordered_map.hpp>
#include <cereal/types/unordered_set.hpp>
#include <cereal/types/utility.hpp>
#include <cereal/types/variant.hpp>
#include <cereal/types/vector.hpp>

#include <cstddef>
#include <cstring>
#include <istream>
#include <ostream>
#include <span>
#include <streambuf>
#include <vector>

namespace coproc::detail {

// A streambuf that appends to a byte vector: what cereal writes lands
// directly in the frame being built.
class vector_streambuf final : public std::streambuf {
public:
    explicit vector_streambuf(byte_buffer& out) noexcept : out_(&out) {}

protected:
    std::streamsize xsputn(const char* data, std::streamsize count) override {
        out_->append(data, static_cast<std::size_t>(count));
        return count;
    }
    int_type overflow(int_type ch) override {
        if (traits_type::eq_int_type(ch, traits_type::eof())) return traits_type::not_eof(ch);
        out_->push_back(static_cast<std::byte>(ch));
        return ch;
    }

private:
    byte_buffer* out_;
};

// A read-only streambuf over a byte span.
class span_streambuf final : public std::streambuf {
public:
    explicit span_streambuf(std::span<const std::byte> in) noexcept {
        char* begin = const_cast<char*>(reinterpret_cast<const char*>(in.data()));
        setg(begin, begin, begin + in.size());
    }
};

// True when cereal can write and read T with its binary archives.
template <class T>
concept serializable = cereal::traits::is_output_serializable<T, cereal::BinaryOutputArchive>::value &&
                       cereal::traits::is_input_serializable<T, cereal::BinaryInputArchive>::value;

// Appends the binary encoding of `values...` to `out`.
template <class... T>
void encode_into(byte_buffer& out, const T&... values) {
    vector_streambuf buffer{out};
    std::ostream stream{&buffer};
    cereal::BinaryOutputArchive archive{stream};
    archive(values...);
}

// Decodes `values...` from `in`; throws cereal::Exception when `in` is short
// or malformed.
template <class... T>
void decode_from(std::span<const std::byte> in, T&... values) {
    span_streambuf buffer{in};
    std::istream stream{&buffer};
    cereal::BinaryInputArchive archive{stream};
    archive(values...);
}

} // namespace coproc::detail

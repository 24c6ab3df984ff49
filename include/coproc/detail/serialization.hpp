// coproc/detail/serialization.hpp - cereal binary archives over byte
// buffers, and the compile-time check that a type can travel.
//
// Encoding uses cereal's BinaryOutputArchive; decoding uses
// bounded_input_archive, which reads the same bytes but checks every size
// they claim against the bytes left (see its header for what is checked).
#pragma once

#include <coproc/detail/bounded_input_archive.hpp>
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

#include <sys/mman.h>
#include <sys/uio.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <ostream>
#include <span>
#include <streambuf>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace coproc::detail {

// A streambuf that appends to a byte vector: what cereal writes lands
// directly in the frame being built.
class vector_streambuf final : public std::streambuf {
public:
    explicit vector_streambuf(byte_buffer& out) noexcept : out_(&out) {}
    void retarget(byte_buffer& out) noexcept { out_ = &out; }

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

// The streambuf and std::ostream cereal writes through, aimed at `out`.
// Constructing a std::ostream and its streambuf (a std::locale each, and the
// facet look-ups of basic_ios::init) costs about 700 instructions, more than
// the rest of encoding a small task's arguments or result (callgrind,
// bench/harness.py); so each thread keeps one pair and aims it at each frame
// in turn. A nested use (a cereal save function that encodes with coproc)
// gets a pair of its own.
class frame_stream {
public:
    explicit frame_stream(byte_buffer& out) {
        kept& mine = kept_pair();
        if (!mine.busy) {
            mine.busy = true;
            mine.buffer.retarget(out);
            mine.stream.clear();
            kept_ = &mine;
            buffer_ = &mine.buffer;
            stream_ = &mine.stream;
        } else {
            own_buffer_.emplace(out);
            own_stream_.emplace(&*own_buffer_);
            buffer_ = &*own_buffer_;
            stream_ = &*own_stream_;
        }
    }
    ~frame_stream() {
        if (kept_ != nullptr) kept_->busy = false;
    }
    frame_stream(const frame_stream&) = delete;
    frame_stream& operator=(const frame_stream&) = delete;

    [[nodiscard]] vector_streambuf& buffer() noexcept { return *buffer_; }
    [[nodiscard]] std::ostream& stream() noexcept { return *stream_; }

private:
    struct kept {
        byte_buffer none;
        vector_streambuf buffer{none};
        std::ostream stream{&buffer};
        bool busy = false;
    };
    static kept& kept_pair() {
        thread_local kept pair;
        return pair;
    }

    kept* kept_ = nullptr;
    std::optional<vector_streambuf> own_buffer_;
    std::optional<std::ostream> own_stream_;
    vector_streambuf* buffer_ = nullptr;
    std::ostream* stream_ = nullptr;
};

// Advises MADV_HUGEPAGE for the whole 2 MiB pages inside [data, data + size):
// memory about to be filled completely, so huge pages waste nothing, and
// first touching it takes a fault per 2 MiB instead of per 4 KiB. Advice
// only: where the kernel refuses, 4 KiB pages back it as before.
inline void advise_huge_pages(const void* data, std::size_t size) noexcept {
    constexpr std::uintptr_t huge = byte_buffer::huge_block;
    if (size < huge) return;
    const auto at = reinterpret_cast<std::uintptr_t>(data);
    const std::uintptr_t begin = (at + huge - 1) & ~(huge - 1);
    const std::uintptr_t end = (at + size) & ~(huge - 1);
    if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

// Contiguous containers of plain bytes or numbers: std::basic_string of a
// one-byte character type, std::vector of an arithmetic type (not bool) or
// of std::byte, with the standard allocator (a container from a user's
// memory resource is copied as before: that memory may go away while the
// pool still holds the container). At the top level of a call's arguments
// or result they are encoded and decoded as one block (the bytes cereal
// would write: its count, then the elements), without cereal's element-wise
// path for std::byte. Decoding reserves the block and advises it for huge
// pages before filling it; strings and byte vectors are then filled in one
// copy, other vectors are zero-filled first (std::vector has no other way).
template <class T>
struct block_container : std::false_type {};
template <class Char, class Traits>
struct block_container<std::basic_string<Char, Traits, std::allocator<Char>>> : std::bool_constant<sizeof(Char) == 1> {};
template <class T>
struct block_container<std::vector<T, std::allocator<T>>>
    : std::bool_constant<(std::is_arithmetic_v<T> && !std::is_same_v<T, bool>) || std::is_same_v<T, std::byte>> {};

template <class T>
struct is_tuple : std::false_type {};
template <class... T>
struct is_tuple<std::tuple<T...>> : std::true_type {};

// The count cereal's binary archives write before a container's elements.
using wire_count = cereal::size_type;

// True when `count` elements of the block container T take exactly
// `bytes` bytes.
template <class T>
constexpr bool block_fills(wire_count count, std::size_t bytes) noexcept {
    using element = typename T::value_type;
    return bytes % sizeof(element) == 0 && count == bytes / sizeof(element);
}

// Empties `block` and gives it new memory for `count` elements, advised for
// huge pages before it is first touched.
template <class T>
void reserve_block(T& block, std::size_t count) {
    block.clear();
    block.reserve(count);
    advise_huge_pages(block.data(), count * sizeof(typename T::value_type));
}

// Makes `block` `count` elements long and returns its bytes, to be
// overwritten (elements it held before may remain until then). Memory it
// already has is used as it is; otherwise reserve_block.
template <class T>
std::span<std::byte> size_block(T& block, std::size_t count) {
    if (block.capacity() < count) reserve_block(block, count);
    block.resize(count);
    return {reinterpret_cast<std::byte*>(block.data()), count * sizeof(typename T::value_type)};
}

template <class T>
void encode_value(vector_streambuf& out, cereal::BinaryOutputArchive& archive, const T& value) {
    if constexpr (is_tuple<T>::value) {
        std::apply([&](const auto&... element) { (encode_value(out, archive, element), ...); }, value);
    } else if constexpr (block_container<T>::value) {
        const wire_count count = value.size();
        out.sputn(reinterpret_cast<const char*>(&count), sizeof count);
        out.sputn(reinterpret_cast<const char*>(value.data()),
                  static_cast<std::streamsize>(value.size() * sizeof(typename T::value_type)));
    } else {
        archive(value);
    }
}

template <class T>
void decode_value(bounded_input_archive& archive, T& value) {
    if constexpr (is_tuple<T>::value) {
        std::apply([&](auto&... element) { (decode_value(archive, element), ...); }, value);
    } else if constexpr (block_container<T>::value) {
        using element = typename T::value_type;
        // The count is checked against the bytes left as for any container,
        // then once more against the elements' size.
        const wire_count count = archive.load_count();
        const std::span<const std::byte> rest = archive.rest();
        if (count > rest.size() / sizeof(element)) {
            throw cereal::Exception("coproc: a container claims " + std::to_string(count) + " elements of " +
                                    std::to_string(sizeof(element)) + " bytes, more than the " +
                                    std::to_string(rest.size()) + " bytes left in the encoding");
        }
        const std::size_t bytes = static_cast<std::size_t>(count) * sizeof(element);
        if constexpr (std::is_same_v<element, char> || std::is_same_v<element, unsigned char> ||
                      std::is_same_v<element, std::byte>) {
            // Copied in once, no zero-filling first (these may alias bytes).
            reserve_block(value, static_cast<std::size_t>(count));
            const auto* first = reinterpret_cast<const element*>(rest.data());
            value.insert(value.end(), first, first + count);
        } else {
            const std::span<std::byte> into = size_block(value, static_cast<std::size_t>(count));
            // An empty vector may have no memory at all: memcpy must not see
            // its null data() even for zero bytes.
            if (bytes > 0) std::memcpy(into.data(), rest.data(), bytes);
        }
        archive.skip(bytes);
    } else {
        archive(value);
    }
}

// True when cereal can write T with its binary archive and read it with
// coproc's.
template <class T>
concept serializable = cereal::traits::is_output_serializable<T, cereal::BinaryOutputArchive>::value &&
                       cereal::traits::is_input_serializable<T, bounded_input_archive>::value;

// Appends the binary encoding of `values...` to `out`.
template <class... T>
void encode_into(byte_buffer& out, const T&... values) {
    frame_stream stream{out};
    cereal::BinaryOutputArchive archive{stream.stream()};
    (encode_value(stream.buffer(), archive, values), ...);
}

// Bytes that go on the wire from where they are instead of being copied into
// a frame: right after byte `offset` of the frame's own bytes. `owner` keeps
// them alive until they are sent. When the owner is a block container of
// type T handed over as an rvalue (the bytes are its elements), `container`
// is type_tag<T>: once the worker has read them all, the container's memory
// may be reused (worker_connection.cpp, take_sent_blocks).
struct attached_bytes {
    std::size_t offset;
    const std::byte* data;
    std::size_t size;
    std::shared_ptr<const void> owner;
    const void* container = nullptr;
    std::size_t reserved = 0; // with `container`: the bytes of its capacity
};

// One object per type, whose address names the type without RTTI. Not
// const, so that no linker folds two of them into one.
template <class T>
inline char type_tag = 0;

// A block container no longer needed where it was (an argument the worker
// has read, a result already sent), kept for its memory: `owner` is a T made
// by encode_value_attaching, and `tag` is type_tag<T>.
struct spare_block {
    std::shared_ptr<const void> owner;
    const void* tag = nullptr;
};

// Moves the spare's container into `block` when it is of block's type and
// `count` elements fit in its memory and fill at least half of it (memory
// already touched: no new pages to fault in and zero; not much of it left
// unused). Returns whether it did; the spare is then empty.
template <class T>
bool reuse_block(T& block, spare_block& spare, std::size_t count) {
    if (spare.tag != &type_tag<T> || !spare.owner) return false;
    T& old = *static_cast<T*>(const_cast<void*>(spare.owner.get())); // made non-const
    if (old.capacity() < count || count < old.capacity() / 2) return false;
    block = std::move(old);
    spare = {};
    return true;
}

// Block containers at least this large are attached, not copied, when they
// are handed over as rvalues (a moved argument, a function's result).
inline constexpr std::size_t attach_from = 64 * 1024;

template <class T>
void encode_value_attaching(vector_streambuf& out, byte_buffer& bytes, std::vector<attached_bytes>& attached,
                            cereal::BinaryOutputArchive& archive, T&& value) {
    using plain = std::remove_cvref_t<T>;
    if constexpr (std::is_const_v<std::remove_reference_t<T>> || std::is_lvalue_reference_v<T>) {
        encode_value(out, archive, value);
    } else if constexpr (is_tuple<plain>::value) {
        std::apply([&](auto&... element) { (encode_value_attaching(out, bytes, attached, archive, std::move(element)), ...); },
                   value);
    } else if constexpr (block_container<plain>::value) {
        const std::size_t size = value.size() * sizeof(typename plain::value_type);
        if (size < attach_from) {
            encode_value(out, archive, value);
            return;
        }
        const wire_count count = value.size();
        out.sputn(reinterpret_cast<const char*>(&count), sizeof count);
        auto owner = std::make_shared<plain>(std::move(value)); // not const: it may be reused once sent
        attached.push_back({bytes.size(), reinterpret_cast<const std::byte*>(owner->data()), size, owner, &type_tag<plain>,
                            owner->capacity() * sizeof(typename plain::value_type)});
    } else {
        encode_value(out, archive, value);
    }
}

// encode_into, except that block containers of attach_from bytes or more
// among the rvalue `values` (and the elements of rvalue tuples) are moved
// into `attached` rather than copied into `out`.
template <class... T>
void encode_attaching(byte_buffer& out, std::vector<attached_bytes>& attached, T&&... values) {
    frame_stream stream{out};
    cereal::BinaryOutputArchive archive{stream.stream()};
    (encode_value_attaching(stream.buffer(), out, attached, archive, std::forward<T>(values)), ...);
}

// `bytes` with the `attached` parts spliced in at their offsets: the iovecs
// to send, in wire order (empty parts left out).
inline std::vector<::iovec> wire_parts(const byte_buffer& bytes, const std::vector<attached_bytes>& attached) {
    std::vector<::iovec> parts;
    parts.reserve(2 * attached.size() + 1);
    auto add = [&parts](const std::byte* data, std::size_t size) {
        if (size > 0) parts.push_back({const_cast<std::byte*>(data), size});
    };
    std::size_t done = 0;
    for (const auto& part : attached) {
        add(bytes.data() + done, part.offset - done);
        add(part.data, part.size);
        done = part.offset;
    }
    add(bytes.data() + done, bytes.size() - done);
    return parts;
}

// Takes `sent` bytes off parts[next...] after a partial send; returns the
// first part not completely sent.
inline std::size_t consume_parts(std::vector<::iovec>& parts, std::size_t next, std::size_t sent) noexcept {
    while (sent > 0) {
        ::iovec& part = parts[next];
        const std::size_t taken = std::min(sent, part.iov_len);
        part.iov_base = static_cast<std::byte*>(part.iov_base) + taken;
        part.iov_len -= taken;
        sent -= taken;
        if (part.iov_len == 0) ++next;
    }
    return next;
}

// The bytes `attached` adds to a frame.
inline std::size_t attached_size(const std::vector<attached_bytes>& attached) noexcept {
    std::size_t size = 0;
    for (const auto& part : attached) size += part.size;
    return size;
}

// Decodes `values...` from `in`; throws cereal::Exception when `in` is short
// or malformed, or claims more than it holds (bounded_input_archive). Never
// reads outside `in`.
template <class... T>
void decode_from(std::span<const std::byte> in, T&... values) {
    bounded_input_archive archive{in};
    (decode_value(archive, values), ...);
}

} // namespace coproc::detail

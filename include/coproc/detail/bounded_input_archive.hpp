// coproc/detail/bounded_input_archive.hpp - the cereal input archive every
// payload is decoded through, in the parent (results, errors, HELLO) and in
// the worker (arguments).
//
// It reads what cereal's BinaryOutputArchive writes, byte for byte, straight
// from the frame's bytes. Unlike cereal's BinaryInputArchive it trusts no
// size the bytes claim: a peer that is buggy or hostile must not be able to
// make the decoder allocate memory the frame cannot fill. cereal sizes a
// container from the count it reads first (std::vector::resize,
// std::unordered_map::reserve, std::string::resize) and only then reads the
// elements, so with BinaryInputArchive a frame of 24 bytes claiming 2^26
// strings cost 2 GiB before the first element failed to read.
//
// What is checked, each failure a cereal::Exception naming the claim and the
// bytes left:
//  - a container's count (cereal's SizeTag) against the bytes left: every
//    element of a container takes at least one byte in the encoding, so a
//    container of more elements than bytes left cannot be real. A container
//    whose elements encode to no bytes at all (an empty class, std::tuple<>,
//    std::array<T, 0>) is therefore refused once it holds more elements than
//    bytes are left after its count: such containers do not travel in
//    practice, and refusing them is what keeps the bound.
//  - a block of raw bytes (cereal's BinaryData: strings, vectors of numbers,
//    std::array of numbers) against the bytes left;
//  - every number against the bytes left, and every bool: a byte other than
//    0 or 1 is an error (loading it into a bool would be undefined);
//  - a std::shared_ptr that refers back to an object read earlier in the
//    same payload (cereal's pointer tracking) must refer to one of the same
//    type: cereal's own loader casts whatever it finds to the type it wants.
//
// The memory a container takes before its elements are read is thus at most
// (bytes left) x sizeof(element) per level of nesting. Checked elsewhere by
// cereal itself: a std::variant index out of range, a shared pointer id never
// seen, a polymorphic type name never registered.
//
// Polymorphic pointers (cereal/types/polymorphic.hpp) work with this archive
// like with cereal's own: it is registered with CEREAL_REGISTER_ARCHIVE, so
// CEREAL_REGISTER_TYPE instantiates loaders for it, provided this header is
// included before the CEREAL_REGISTER_TYPE lines (coproc.hpp includes it).
//
// Not bounded: the depth of a recursive user type (a tree node holding a
// std::vector of nodes) follows the data; each level takes 8 bytes of count,
// so a large frame can nest deeply. Payloads of such types should come from
// workers one trusts, or be flattened.
#pragma once

#include <cereal/archives/binary.hpp>
#include <cereal/cereal.hpp>
#include <cereal/details/helpers.hpp>
#include <cereal/types/memory.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <type_traits>

namespace coproc::detail {

class bounded_input_archive : public cereal::InputArchive<bounded_input_archive, cereal::AllowEmptyClassElision> {
public:
    explicit bounded_input_archive(std::span<const std::byte> in)
        : cereal::InputArchive<bounded_input_archive, cereal::AllowEmptyClassElision>(this), rest_(in) {}

    // The bytes not read yet.
    [[nodiscard]] std::span<const std::byte> rest() const noexcept { return rest_; }

    // Consumes `count` bytes of rest(); `count` must not exceed its size.
    void skip(std::size_t count) noexcept { rest_ = rest_.subspan(count); }

    // Reads `size` bytes into `data`. cereal's name: its own types call it.
    void loadBinary(void* data, std::size_t size) {
        if (size > rest_.size()) {
            throw cereal::Exception("coproc: the encoding claims " + std::to_string(size) + " more bytes, but only " +
                                    std::to_string(rest_.size()) + " bytes are left");
        }
        if (size > 0) std::memcpy(data, rest_.data(), size);
        skip(size);
    }

    // Reads a container's element count and checks it against the bytes
    // left after it (see the top of this file for why that bound holds).
    cereal::size_type load_count() {
        cereal::size_type count = 0;
        if (rest_.size() < sizeof count) {
            throw cereal::Exception("coproc: the encoding ends inside a container's element count (" +
                                    std::to_string(rest_.size()) + " bytes left, " + std::to_string(sizeof count) +
                                    " needed)");
        }
        loadBinary(&count, sizeof count);
        if (count > rest_.size()) {
            throw cereal::Exception("coproc: a container claims " + std::to_string(count) + " elements, more than the " +
                                    std::to_string(rest_.size()) + " bytes left in the encoding");
        }
        return count;
    }

    // Reads a block of raw bytes whose size the encoding claimed.
    void load_block(void* data, std::size_t size) {
        if (size > rest_.size()) {
            throw cereal::Exception("coproc: a block claims " + std::to_string(size) + " bytes, more than the " +
                                    std::to_string(rest_.size()) + " bytes left in the encoding");
        }
        loadBinary(data, size);
    }

    // Called before cereal loads the shared pointer whose id comes next:
    // remembers the type of a new object, and checks that a reference to an
    // object read before names one of type T.
    template <class T>
    void check_shared_pointer() {
        std::uint32_t id = 0;
        if (rest_.size() < sizeof id) {
            throw cereal::Exception("coproc: the encoding ends inside a shared pointer's id (" +
                                    std::to_string(rest_.size()) + " bytes left)");
        }
        std::memcpy(&id, rest_.data(), sizeof id); // left for cereal to read
        const std::uint32_t stripped = id & ~cereal::detail::msb_32bit;
        if (id & cereal::detail::msb_32bit) {
            pointee_types_[stripped] = &pointee_tag<T>;
            return;
        }
        if (id == 0) return; // null
        const auto known = pointee_types_.find(stripped);
        if (known != pointee_types_.end() && known->second != &pointee_tag<T>) {
            throw cereal::Exception("coproc: a shared pointer refers to object " + std::to_string(stripped) +
                                    ", which the encoding made with another type");
        }
        // An id never seen: cereal's getSharedPointer throws.
    }

private:
    // One object per type, whose address names the type without RTTI.
    template <class T>
    static inline char pointee_tag = 0;

    std::span<const std::byte> rest_;
    std::map<std::uint32_t, const char*> pointee_types_;
};

// The loads cereal finds for this archive by argument-dependent lookup.

template <class T>
    requires std::is_arithmetic_v<T>
void CEREAL_LOAD_FUNCTION_NAME(bounded_input_archive& archive, T& value) {
    if constexpr (std::is_same_v<T, bool>) {
        static_assert(sizeof(bool) == 1, "cereal writes a bool as its one byte");
        unsigned char byte = 0;
        archive.loadBinary(&byte, 1);
        if (byte > 1) throw cereal::Exception("coproc: a bool is encoded as " + std::to_string(byte) + ", not 0 or 1");
        value = byte == 1;
    } else {
        archive.loadBinary(std::addressof(value), sizeof value);
    }
}

template <class T>
void CEREAL_LOAD_FUNCTION_NAME(bounded_input_archive& archive, cereal::NameValuePair<T>& pair) {
    archive(pair.value);
}

template <class T>
void CEREAL_LOAD_FUNCTION_NAME(bounded_input_archive& archive, cereal::SizeTag<T>& tag) {
    const cereal::size_type count = archive.load_count();
    using stored = std::remove_cvref_t<T>;
    if constexpr (sizeof(stored) < sizeof count) {
        if (count > static_cast<cereal::size_type>(static_cast<stored>(-1))) {
            throw cereal::Exception("coproc: a container claims " + std::to_string(count) + " elements, more than " +
                                    "its size type can hold");
        }
    }
    tag.size = static_cast<stored>(count);
}

template <class T>
void CEREAL_LOAD_FUNCTION_NAME(bounded_input_archive& archive, cereal::BinaryData<T>& block) {
    archive.load_block(const_cast<void*>(static_cast<const void*>(block.data)), static_cast<std::size_t>(block.size));
}

// Chosen over cereal's own shared_ptr loaders (more specialized in the
// archive), which it then calls by qualified name after the type check.
template <class T>
void CEREAL_LOAD_FUNCTION_NAME(bounded_input_archive& archive,
                               cereal::memory_detail::PtrWrapper<std::shared_ptr<T>&>& wrapper) {
    archive.check_shared_pointer<std::remove_const_t<T>>();
    cereal::CEREAL_LOAD_FUNCTION_NAME<bounded_input_archive, T>(archive, wrapper);
}

} // namespace coproc::detail

CEREAL_REGISTER_ARCHIVE(coproc::detail::bounded_input_archive)

// Pairs the archive with the output archive whose bytes it reads (cereal
// checks load_minimal against the matching save_minimal). Only this half of
// CEREAL_SETUP_ARCHIVE_TRAITS: its other half would map BinaryOutputArchive
// back to an input archive, which cereal/archives/binary.hpp already does.
namespace cereal::traits::detail {
template <>
struct get_output_from_input<coproc::detail::bounded_input_archive> {
    using type = cereal::BinaryOutputArchive;
};
} // namespace cereal::traits::detail

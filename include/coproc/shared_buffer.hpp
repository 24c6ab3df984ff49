// coproc/shared_buffer.hpp - coproc::shared_buffer, bytes in shared memory
// that a task takes as an argument or returns as its result without either
// side copying them.
//
//     // In a worker: reads `in`, writes a transformed copy into `out`.
//     void invert(coproc::shared_buffer in, coproc::shared_buffer out) {
//         auto from = in.bytes();
//         auto to = out.bytes();
//         for (std::size_t i = 0; i < from.size(); ++i) to[i] = ~from[i];
//     }
//
//     coproc::shared_buffer in{64 << 20}, out{64 << 20};   // in the parent
//     fill(in.bytes());
//     co_await pool.submit<invert>(in, out);              // no byte copied
//     use(out.bytes());
//
// A shared_buffer is a handle to a memfd (memfd_create) of a fixed size,
// mapped read-write in each process that holds it. It travels as its
// descriptor (SCM_RIGHTS over the worker's socket) and its size: the
// receiver maps the same pages. Copies of the handle share the memory, as
// std::shared_ptr copies share an object; the mapping and the descriptor go
// when the last handle in that process goes. So:
//  - a buffer passed as an argument is shared by the parent and the
//    worker: what the task writes into it, the parent sees once the task
//    ended (the task's answer orders the writes before the parent's reads);
//  - a buffer the task creates and returns reaches the parent the same way
//    (the worker's handle goes once the result is sent);
//  - a buffer reused across tasks has its pages allocated and touched once.
// Nothing is leaked when a worker dies: the kernel closes the descriptors
// in flight and in the dead process; the pages go with the last handle.
//
// It may appear anywhere in arguments and results (in a tuple, a vector, a
// struct's serialize), at most 253 per frame (the kernel's SCM_MAX_FD).
// It travels only in a task's arguments and result (not in stream items or
// exceptions): anywhere else its serialization throws std::logic_error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace coproc {

class shared_buffer;

namespace detail {

// One memfd mapped in this process: unmapped and closed when destroyed.
class shared_mapping {
public:
    // Maps `fd` (taken over, closed on failure too) of `size` bytes; with
    // `populate`, every page at once (a buffer received: its pages exist).
    // Throws std::system_error when it cannot.
    shared_mapping(int fd, std::size_t size, bool populate = false);
    ~shared_mapping();
    shared_mapping(const shared_mapping&) = delete;
    shared_mapping& operator=(const shared_mapping&) = delete;

    [[nodiscard]] int fd() const noexcept { return fd_; }
    [[nodiscard]] std::byte* data() const noexcept { return data_; }
    [[nodiscard]] std::size_t size() const noexcept { return size_; }

private:
    int fd_;
    std::byte* data_ = nullptr;
    std::size_t size_;
};

// The descriptors of shared buffers encoded for one frame, in slot order,
// with the mappings that keep them open until the frame is sent.
using shared_descriptors = std::vector<std::shared_ptr<const shared_mapping>>;

// The kernel passes at most this many descriptors with one message.
inline constexpr std::size_t max_descriptors_per_frame = 253;

// While it exists, shared buffers encoded on this thread add their
// mappings to `into` (and encode their slot in it).
class descriptor_encoding {
public:
    explicit descriptor_encoding(shared_descriptors& into) noexcept;
    // ... or refuse them (a stream item: it has no descriptors of its own).
    explicit descriptor_encoding(std::nullptr_t) noexcept;
    ~descriptor_encoding();
    descriptor_encoding(const descriptor_encoding&) = delete;
    descriptor_encoding& operator=(const descriptor_encoding&) = delete;

private:
    shared_descriptors* outer_;
};

// While it exists, shared buffers decoded on this thread map the
// descriptors of `from` (received with the frame, taken over: a slot taken
// is set to -1; the caller closes what is left). A slot that appears twice
// yields the same mapping twice.
class descriptor_decoding {
public:
    explicit descriptor_decoding(std::vector<int>& from);
    ~descriptor_decoding();
    descriptor_decoding(const descriptor_decoding&) = delete;
    descriptor_decoding& operator=(const descriptor_decoding&) = delete;

    std::shared_ptr<const shared_mapping> take(std::uint32_t slot, std::uint64_t size);

private:
    std::vector<int>& fds_;
    std::vector<std::shared_ptr<const shared_mapping>> mapped_;
    descriptor_decoding* outer_;
};

// The slot of `mapping` in the frame being encoded (added to it); throws
// std::logic_error when no frame is being encoded on this thread, and
// std::length_error beyond max_descriptors_per_frame.
std::uint32_t encode_descriptor(const std::shared_ptr<const shared_mapping>& mapping);
// The mapping of slot `slot` of the frame being decoded, `size` bytes;
// throws cereal::Exception-like std::runtime_error when the slot is absent,
// already taken, or not a memfd of at least `size` bytes.
std::shared_ptr<const shared_mapping> decode_descriptor(std::uint32_t slot, std::uint64_t size);

} // namespace detail

class shared_buffer {
public:
    // An empty buffer: size() 0, no memory.
    shared_buffer() noexcept = default;
    // A new buffer of `size` bytes, zero-filled, mapped read-write. Throws
    // std::system_error when the memfd cannot be created, sized or mapped
    // (EMFILE, ENOMEM, a RLIMIT_AS or memory cgroup limit).
    explicit shared_buffer(std::size_t size);

    [[nodiscard]] std::byte* data() const noexcept { return mapping_ ? mapping_->data() : nullptr; }
    [[nodiscard]] std::size_t size() const noexcept { return mapping_ ? mapping_->size() : 0; }
    [[nodiscard]] bool empty() const noexcept { return size() == 0; }
    [[nodiscard]] std::span<std::byte> bytes() const noexcept { return {data(), size()}; }

    // The memory as an array of T (a trivially copyable type). Throws
    // std::invalid_argument when the size is not a multiple of sizeof(T).
    template <class T>
    [[nodiscard]] std::span<T> as() const {
        static_assert(std::is_trivially_copyable_v<T>, "coproc::shared_buffer::as<T>: T must be trivially copyable");
        if (size() % sizeof(T) != 0) {
            throw std::invalid_argument("coproc::shared_buffer::as: " + std::to_string(size()) +
                                        " bytes are not a whole number of elements of " + std::to_string(sizeof(T)) +
                                        " bytes");
        }
        return {reinterpret_cast<T*>(data()), size() / sizeof(T)};
    }

    // Two handles to the same memory compare equal.
    friend bool operator==(const shared_buffer& a, const shared_buffer& b) noexcept { return a.mapping_ == b.mapping_; }

    template <class Archive>
    void save(Archive& archive) const {
        const std::uint64_t bytes = size();
        const std::uint32_t slot = mapping_ ? detail::encode_descriptor(mapping_) : no_slot;
        archive(bytes, slot);
    }
    template <class Archive>
    void load(Archive& archive) {
        std::uint64_t bytes = 0;
        std::uint32_t slot = no_slot;
        archive(bytes, slot);
        if (slot == no_slot) {
            mapping_.reset();
            return;
        }
        mapping_ = detail::decode_descriptor(slot, bytes);
    }

private:
    static constexpr std::uint32_t no_slot = 0xffffffff;
    std::shared_ptr<const detail::shared_mapping> mapping_;
};

} // namespace coproc

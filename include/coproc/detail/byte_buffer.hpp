// coproc/detail/byte_buffer.hpp - the growable byte array that frames are
// built in and read into.
//
// Like std::vector<std::byte>, with three differences that matter for
// large payloads (bench/README.md, "64 MiB echo", has the measurements):
//
//  - Growing never zero-fills: resize() leaves new bytes uninitialized, as
//    they are about to be overwritten by recv() or the encoder.
//  - A block of at least huge_block bytes is its own anonymous mapping,
//    advised MADV_HUGEPAGE: where the kernel's transparent huge pages are in
//    "madvise" mode (the usual default), 2 MiB pages back it, and first
//    touching 64 MiB takes 32 page faults instead of 16,384.
//  - Such a block grows with mremap, which moves page tables, not bytes.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <new>
#include <utility>

namespace coproc::detail {

class byte_buffer {
public:
    using value_type = std::byte;
    using size_type = std::size_t;
    using iterator = std::byte*;
    using const_iterator = const std::byte*;

    // Blocks this large are mappings of their own (2 MiB: one huge page).
    static constexpr std::size_t huge_block = std::size_t{2} << 20;

    byte_buffer() noexcept = default;
    explicit byte_buffer(std::size_t size) { resize(size); }
    byte_buffer(const byte_buffer& other) : byte_buffer() { append(other.data_, other.size_); }
    byte_buffer(byte_buffer&& other) noexcept
        : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)),
          capacity_(std::exchange(other.capacity_, 0)) {}
    byte_buffer& operator=(const byte_buffer& other) {
        if (this != &other) {
            clear();
            append(other.data_, other.size_);
        }
        return *this;
    }
    byte_buffer& operator=(byte_buffer&& other) noexcept {
        byte_buffer moved{std::move(other)};
        swap(moved);
        return *this;
    }
    ~byte_buffer() { release(data_, capacity_); }

    [[nodiscard]] std::byte* data() noexcept { return data_; }
    [[nodiscard]] const std::byte* data() const noexcept { return data_; }
    [[nodiscard]] std::size_t size() const noexcept { return size_; }
    [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
    [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
    [[nodiscard]] std::byte* begin() noexcept { return data_; }
    [[nodiscard]] std::byte* end() noexcept { return data_ + size_; }
    [[nodiscard]] const std::byte* begin() const noexcept { return data_; }
    [[nodiscard]] const std::byte* end() const noexcept { return data_ + size_; }
    std::byte& operator[](std::size_t index) noexcept { return data_[index]; }
    const std::byte& operator[](std::size_t index) const noexcept { return data_[index]; }

    // Keeps the capacity.
    void clear() noexcept { size_ = 0; }

    void reserve(std::size_t capacity) {
        if (capacity > capacity_) reallocate(capacity);
    }

    // New bytes are uninitialized.
    void resize(std::size_t size) {
        if (size > capacity_) reallocate(std::max(size, capacity_ + capacity_ / 2));
        size_ = size;
    }

    void append(const void* bytes, std::size_t count) {
        if (count == 0) return;
        const std::size_t at = size_;
        resize(size_ + count);
        std::memcpy(data_ + at, bytes, count);
    }
    void push_back(std::byte value) {
        resize(size_ + 1);
        data_[size_ - 1] = value;
    }

    void swap(byte_buffer& other) noexcept {
        std::swap(data_, other.data_);
        std::swap(size_, other.size_);
        std::swap(capacity_, other.capacity_);
    }

    // Gives back memory beyond `capacity` (at least size()) when it holds
    // more than that.
    void shrink_to(std::size_t capacity) {
        capacity = std::max(capacity, size_);
        if (capacity_ <= capacity) return;
        byte_buffer smaller;
        smaller.reserve(capacity);
        smaller.append(data_, size_);
        swap(smaller);
    }

private:
    static bool is_mapping(std::size_t capacity) noexcept { return capacity >= huge_block; }

    static std::byte* allocate(std::size_t capacity) {
        if (!is_mapping(capacity)) return static_cast<std::byte*>(::operator new(capacity));
        void* block = ::mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (block == MAP_FAILED) throw std::bad_alloc();
        ::madvise(block, capacity, MADV_HUGEPAGE); // advice: failing leaves 4 KiB pages
        return static_cast<std::byte*>(block);
    }

    static void release(std::byte* block, std::size_t capacity) noexcept {
        if (block == nullptr) return;
        if (is_mapping(capacity)) {
            ::munmap(block, capacity);
        } else {
            ::operator delete(block);
        }
    }

    void reallocate(std::size_t capacity) {
        // Mappings are whole pages; round up so that mremap never needs to.
        if (is_mapping(capacity)) capacity = (capacity + huge_block - 1) / huge_block * huge_block;
        if (is_mapping(capacity_) && is_mapping(capacity)) {
            void* moved = ::mremap(data_, capacity_, capacity, MREMAP_MAYMOVE);
            if (moved == MAP_FAILED) throw std::bad_alloc();
            // The advice covers the old range only; the new tail needs its own.
            ::madvise(moved, capacity, MADV_HUGEPAGE);
            data_ = static_cast<std::byte*>(moved);
            capacity_ = capacity;
            return;
        }
        std::byte* grown = allocate(capacity);
        if (size_ > 0) std::memcpy(grown, data_, size_);
        release(data_, capacity_);
        data_ = grown;
        capacity_ = capacity;
    }

    std::byte* data_ = nullptr;
    std::size_t size_ = 0;
    std::size_t capacity_ = 0;
};

} // namespace coproc::detail

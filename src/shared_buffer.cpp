// coproc::shared_buffer (coproc/shared_buffer.hpp): memfds mapped shared,
// and the per-thread descriptor lists that encoding and decoding a frame
// use. Which descriptors go with which frame, on the wire: the frame
// header's flags carry their count (wire::descriptor_count), and the
// descriptors travel by SCM_RIGHTS with the bytes of that frame or of one
// before it, so that each end takes them from the queue of descriptors it
// received, in order (worker_connection.cpp, worker_channel.cpp).
#include <coproc/shared_buffer.hpp>

#include "received_mappings.hpp"

#include <cereal/details/helpers.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <system_error>
#include <utility>

namespace coproc {

namespace detail {

namespace {

thread_local shared_descriptors* encoding = nullptr;
thread_local descriptor_decoding* decoding = nullptr;

// F_SEAL_SHRINK: no process holding the descriptor can make the memory
// shorter than a mapping of it (touching a page past the end of a memfd
// raises SIGBUS). Growing stays allowed; nobody maps beyond the size.
constexpr int seals = F_SEAL_SHRINK | F_SEAL_SEAL;

} // namespace

shared_mapping::shared_mapping(int fd, std::size_t size, bool populate) : fd_(fd), size_(size) {
    if (size_ == 0) return;
    // MAP_POPULATE: one pass over the page tables instead of a fault per
    // 4 KiB page on first touch, which on this project's VM took a 64 MiB
    // buffer from about 30 ms of faults to a few ms (bench/README.md,
    // "Shared buffers").
    void* mapped = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED | (populate ? MAP_POPULATE : 0), fd_, 0);
    if (mapped == MAP_FAILED) {
        const int error = errno;
        ::close(fd_);
        throw std::system_error(error, std::generic_category(),
                                "coproc::shared_buffer: cannot map " + std::to_string(size_) + " bytes");
    }
    data_ = static_cast<std::byte*>(mapped);
}

shared_mapping::~shared_mapping() {
    if (data_ != nullptr) ::munmap(data_, size_);
    ::close(fd_);
}

descriptor_encoding::descriptor_encoding(shared_descriptors& into) noexcept : outer_(std::exchange(encoding, &into)) {}
descriptor_encoding::descriptor_encoding(std::nullptr_t) noexcept : outer_(std::exchange(encoding, nullptr)) {}
descriptor_encoding::~descriptor_encoding() { encoding = outer_; }

descriptor_decoding::descriptor_decoding(std::vector<int>& from)
    : fds_(from), mapped_(from.size()), outer_(std::exchange(decoding, this)) {}
descriptor_decoding::~descriptor_decoding() { decoding = outer_; }

std::uint32_t encode_descriptor(const std::shared_ptr<const shared_mapping>& mapping) {
    if (encoding == nullptr) {
        throw std::logic_error("coproc::shared_buffer travels only in a pool task's arguments and result");
    }
    for (std::size_t slot = 0; slot < encoding->size(); ++slot) {
        if ((*encoding)[slot] == mapping) return static_cast<std::uint32_t>(slot); // the same buffer twice: one descriptor
    }
    if (encoding->size() == max_descriptors_per_frame) {
        throw std::length_error("coproc: more than " + std::to_string(max_descriptors_per_frame) +
                                " shared buffers in one task's arguments or result");
    }
    encoding->push_back(mapping);
    return static_cast<std::uint32_t>(encoding->size() - 1);
}

std::shared_ptr<const shared_mapping> descriptor_decoding::take(std::uint32_t slot, std::uint64_t size) {
    if (slot >= fds_.size()) {
        throw cereal::Exception("a shared buffer refers to descriptor " + std::to_string(slot) + ", which its frame lacks");
    }
    if (mapped_[slot]) { // the same buffer again in this frame
        if (mapped_[slot]->size() != size) throw cereal::Exception("a shared buffer appears twice with two sizes");
        return mapped_[slot];
    }
    const int fd = std::exchange(fds_[slot], -1);
    struct ::stat status {};
    const int file_seals = fd < 0 ? -1 : ::fcntl(fd, F_GET_SEALS);
    if (file_seals < 0 || (file_seals & F_SEAL_SHRINK) == 0 || ::fstat(fd, &status) != 0 || !S_ISREG(status.st_mode) ||
        static_cast<std::uint64_t>(status.st_size) < size) {
        if (fd >= 0) ::close(fd);
        throw cereal::Exception("a shared buffer of " + std::to_string(size) +
                                " bytes came with a descriptor that is not a sealed memfd that large");
    }
    // In a worker, a buffer received before may still be mapped: reused,
    // and this descriptor of the same file closed.
    received_mappings* kept = received_mappings::current();
    if (kept != nullptr) {
        if (auto mapping = kept->find(status.st_dev, status.st_ino, static_cast<std::size_t>(size))) {
            ::close(fd);
            mapped_[slot] = std::move(mapping);
            return mapped_[slot];
        }
    }
    mapped_[slot] = std::make_shared<const shared_mapping>(fd, static_cast<std::size_t>(size), true);
    if (kept != nullptr) kept->keep(status.st_dev, status.st_ino, mapped_[slot]);
    return mapped_[slot];
}

std::shared_ptr<const shared_mapping> decode_descriptor(std::uint32_t slot, std::uint64_t size) {
    if (decoding == nullptr) {
        throw cereal::Exception("a shared buffer arrived outside a task's arguments or result");
    }
    return decoding->take(slot, size);
}

} // namespace detail

shared_buffer::shared_buffer(std::size_t size) {
    if (size == 0) return;
    const int fd = ::memfd_create("coproc-shared-buffer", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) throw std::system_error(errno, std::generic_category(), "coproc::shared_buffer: memfd_create");
    if (::ftruncate(fd, static_cast<off_t>(size)) != 0 || ::fcntl(fd, F_ADD_SEALS, detail::seals) != 0) {
        const int error = errno;
        ::close(fd);
        throw std::system_error(error, std::generic_category(),
                                "coproc::shared_buffer: cannot size a memfd of " + std::to_string(size) + " bytes");
    }
    mapping_ = std::make_shared<const detail::shared_mapping>(fd, size);
}

} // namespace coproc

// Frames as the parent reads them from a worker's socket: headers
// (wire::read_header), then each payload decoded as the parent decodes its
// kind (src/worker_connection.cpp, handle_frames and handle_answer): HELLO's
// version and pid, ERROR's transported exception (decode_exception), a
// RESULT of a function returning std::vector<std::string>, PROGRESS's
// double, a stream's ITEM as its consumer decodes it (stream<T>::next),
// and the count
// that starts a large RESULT received in place (prepare_block_result).
// handle_frames is a member of the pool and reads from its worker's buffer,
// so the harness repeats its steps over the input instead of calling it.
#include "fuzz_support.hpp"

#include <coproc/detail/remote_function.hpp>
#include <coproc/detail/wire.hpp>
#include <coproc/detail/work_item.hpp>
#include <coproc/error.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace wire = coproc::detail::wire;

namespace {

std::string frame(wire::frame_kind kind, std::uint64_t work_id, const std::string& payload) {
    coproc::detail::byte_buffer out;
    const std::size_t offset = wire::begin_frame(out, kind, work_id);
    out.append(payload.data(), payload.size());
    wire::finish_frame(out, offset);
    return {reinterpret_cast<const char*>(out.data()), out.size()};
}

std::string error_payload(std::exception_ptr error) {
    coproc::detail::byte_buffer out;
    coproc::detail::encode_exception(std::move(error), out);
    return {reinterpret_cast<const char*>(out.data()), out.size()};
}

void handle(const wire::frame_header& header, std::span<const std::byte> payload) {
    try {
        switch (static_cast<wire::frame_kind>(header.kind)) {
        case wire::frame_kind::hello: {
            std::uint16_t version = 0;
            std::int32_t pid = 0;
            coproc::detail::decode_from(payload, version, pid);
            break;
        }
        case wire::frame_kind::error: {
            const std::exception_ptr remote = coproc::detail::decode_exception(payload, 1234, "fuzzed");
            try {
                std::rethrow_exception(remote);
            } catch (const std::exception& rebuilt) {
                (void)std::strlen(rebuilt.what());
            }
            break;
        }
        case wire::frame_kind::progress: {
            double value = 0;
            coproc::detail::decode_from(payload, value);
            break;
        }
        case wire::frame_kind::item: {
            std::vector<std::string> value{};
            coproc::detail::decode_from(payload, value);
            break;
        }
        case wire::frame_kind::result: {
            coproc::detail::typed_work_item<std::vector<std::string>> item;
            item.store_result(payload);
            coproc::detail::typed_work_item<std::vector<std::int32_t>> block;
            const std::span<std::byte> into = block.prepare_block_result(payload, payload.size(), {});
            if (!into.empty()) std::memcpy(into.data(), payload.data() + sizeof(coproc::detail::wire_count), into.size());
            break;
        }
        default:
            break; // START has no payload; any other kind kills the worker
        }
    } catch (const cereal::Exception&) {
        // Refused: the parent kills the worker (HELLO) or fails the task.
    }
}

} // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    using coproc_fuzz::encoded;
    coproc_fuzz::write_seeds_if_asked({
        frame(wire::frame_kind::hello, 0, encoded("", wire::protocol_version, std::int32_t{4242})),
        frame(wire::frame_kind::start, 1, "") + frame(wire::frame_kind::result, 1, encoded("", std::vector<std::string>{"a", "bc"})),
        frame(wire::frame_kind::error, 2, error_payload(std::make_exception_ptr(std::invalid_argument("bad")))),
        frame(wire::frame_kind::error, 3,
              error_payload(std::make_exception_ptr(std::system_error(std::make_error_code(std::errc::io_error), "read")))),
        frame(wire::frame_kind::result, 4, encoded("", std::vector<std::int32_t>{1, 2, 3})),
        frame(wire::frame_kind::progress, 5, encoded("", 0.5)) + frame(wire::frame_kind::result, 5, encoded("", 1)),
        frame(wire::frame_kind::item, 6, encoded("", std::vector<std::string>{"x", "yz"})) +
            frame(wire::frame_kind::item, 6, encoded("", std::vector<std::string>{})) + frame(wire::frame_kind::result, 6, ""),
        frame(wire::frame_kind::error, 7,
              error_payload(std::make_exception_ptr(coproc::memory_limit_exceeded(1 << 30, "out of memory")))),
    });
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const auto bytes = std::as_bytes(std::span{data, size});
    std::size_t consumed = 0;
    while (bytes.size() - consumed >= wire::header_size) {
        const wire::frame_header header = wire::read_header(bytes.data() + consumed);
        // The parent waits for the rest of a frame longer than what it has.
        if (header.length > bytes.size() - consumed - wire::header_size) break;
        handle(header, bytes.subspan(consumed + wire::header_size, header.length));
        consumed += wire::header_size + header.length;
    }
    return 0;
}

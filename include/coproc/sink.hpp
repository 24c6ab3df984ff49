// coproc/sink.hpp - coproc::sink<T>, where a stream task pushes the items
// its caller receives one by one (process_pool::submit_stream).
//
//     void primes(long limit, coproc::sink<long>& out) {  // runs in a worker
//         for (long n = 2; n < limit; ++n) {
//             if (is_prime(n)) out.push(n);                 // reaches the parent now
//         }
//     }
//
//     auto found = pool.submit_stream<primes>(1'000'000);  // in the parent
//     while (auto prime = co_await found.next()) use(*prime);
//
// A function is a stream function when its last parameter is a
// coproc::sink<T>& (or the one before a trailing std::stop_token): the
// caller passes the other arguments; the worker passes the sink. It returns
// void; its end ends the stream, and an exception it throws ends the stream
// with that exception, after the items pushed before it.
#pragma once

#include <coproc/detail/serialization.hpp>
#include <coproc/detail/wire.hpp>
#include <coproc/shared_buffer.hpp>

#include <functional>
#include <stdexcept>
#include <utility>

namespace coproc {

template <class T>
class sink;

namespace detail {

// Sends one ITEM frame of the stream task running on this thread: `frame`
// holds a header's worth of bytes (filled in here), then the encoded item.
// Blocks while the parent has granted no room for more (the consumer's
// window is full). Throws coproc::cancelled_error when the task is
// cancelled while it waits, and std::logic_error on a thread that runs no
// stream task (src/worker_task.cpp).
void send_stream_item(byte_buffer& frame);

struct sink_access {
    template <class T>
    static sink<T> for_worker() {
        return sink<T>{};
    }
};

} // namespace detail

template <class T>
class sink {
public:
    static_assert(detail::serializable<T>,
                  "coproc::sink<T>: T cannot be serialized by cereal. Give the type a serialize(Archive&) member (or a "
                  "free serialize function), or include the cereal header for it (<cereal/types/...>)");
    using value_type = T;

    // A sink that hands each item to `receive`, on the calling thread: to
    // call a stream function directly, outside any pool (a unit test of the
    // function, a serial fallback).
    explicit sink(std::function<void(T)> receive) : receive_(std::move(receive)) {
        if (!receive_) throw std::invalid_argument("coproc::sink: the receiving function is empty");
    }
    sink(sink&&) noexcept = default;
    sink(const sink&) = delete;
    sink& operator=(const sink&) = delete;
    sink& operator=(sink&&) = delete;

    // Sends `value` to the consumer: encoded and sent at once, in order.
    // Blocks while the consumer's window is full (submit_options::
    // stream_window items it has not taken yet). Throws coproc::
    // cancelled_error when the stream is cancelled while blocked (its
    // consumer cancelled it or let it go): let it propagate, the task is
    // over. Throws what encoding throws.
    void push(const T& value) {
        if (receive_) {
            receive_(value);
            return;
        }
        detail::byte_buffer frame;
        frame.resize(detail::wire::header_size);
        {
            const detail::descriptor_encoding none{nullptr}; // not the task's result's
            detail::encode_into(frame, value);
        }
        detail::send_stream_item(frame);
    }

private:
    friend struct detail::sink_access;
    sink() = default; // the worker's: items go to the parent

    std::function<void(T)> receive_;
};

} // namespace coproc

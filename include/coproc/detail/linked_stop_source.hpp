// coproc/detail/linked_stop_source.hpp - a stop source that follows other
// stop tokens.
#pragma once

#include <optional>
#include <stop_token>

namespace coproc::detail {

// Requests a stop on a stop_source; the callback type of the links between
// tokens. Thread-safe because std::stop_source::request_stop is.
struct request_stop_on {
    std::stop_source* source;
    void operator()() const noexcept { source->request_stop(); }
};

// A stop source that is stopped by request_stop() or when either of two
// tokens is stopped. Neither movable nor copyable: the callbacks point into it.
class linked_stop_source {
public:
    explicit linked_stop_source(const std::stop_token& first, const std::stop_token& second = {}) {
        // std::stop_callback runs the callback at once when the token is
        // already stopped, so a request racing with construction is not lost.
        if (first.stop_possible()) first_link_.emplace(first, request_stop_on{&source_});
        if (second.stop_possible()) second_link_.emplace(second, request_stop_on{&source_});
    }
    linked_stop_source(const linked_stop_source&) = delete;
    linked_stop_source& operator=(const linked_stop_source&) = delete;

    [[nodiscard]] std::stop_token token() const noexcept { return source_.get_token(); }
    void request_stop() noexcept { source_.request_stop(); }

private:
    std::stop_source source_;
    std::optional<std::stop_callback<request_stop_on>> first_link_;
    std::optional<std::stop_callback<request_stop_on>> second_link_;
};

} // namespace coproc::detail

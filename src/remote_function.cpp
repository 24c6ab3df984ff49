// The registry of remote functions, and exceptions across the process
// boundary.
#include <coproc/detail/remote_function.hpp>
#include <coproc/error.hpp>

#include <cxxabi.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <system_error>
#include <typeindex>
#include <typeinfo>
#include <unordered_map>

namespace coproc::detail {

namespace {

struct exception_entry {
    std::uint64_t id;
    exception_encoder encode;
    exception_decoder decode;
};

struct registry {
    std::mutex mutex;
    std::unordered_map<std::uint64_t, remote_function_entry> entries;
    std::unordered_map<std::type_index, exception_entry> exceptions_by_type;
    std::unordered_map<std::uint64_t, exception_entry> exceptions_by_id;
};

registry& the_registry() {
    static registry instance; // constructed on first use, during static initialization
    return instance;
}

// How a transported exception is rebuilt in the parent.
enum class exception_code : std::uint8_t {
    unknown = 0,        // not a std::exception
    other = 1,          // a std::exception of a type coproc does not rebuild
    logic_error,
    invalid_argument,
    domain_error,
    length_error,
    out_of_range,
    runtime_error,
    range_error,
    overflow_error,
    underflow_error,
    bad_alloc,
    system_error,
    cancelled,
    unknown_function,   // the worker has no function with the CALL's id
    registered,         // a type registered with COPROC_REGISTER_EXCEPTION
    // coproc's own exceptions, each exactly that type (a subclass the parent
    // cannot rebuild is `other`). Added at the end: codes are compared only
    // between a parent and workers of one build.
    coproc_error,
    timeout,
    pool_closed,
    queue_full,
    broken_pool,          // its cause() travels as a nested ERROR payload
    worker_died,          // pid, signal, exit code, function as state
    remote,               // type name, message, pid, function as state
    worker_start_failed,  // code() in error_value
    io_uring_unavailable, // cause() in error_value
    memory_limit,         // limit() as state
};

// A broken_process_pool's cause() may itself be one: nested payloads deeper
// than this are dropped, so a malicious or runaway chain cannot exhaust
// either side's stack.
constexpr int max_cause_depth = 8;

std::string demangle(const char* mangled) {
    int status = 0;
    std::unique_ptr<char, void (*)(void*)> name{abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free};
    return status == 0 && name ? std::string(name.get()) : std::string(mangled);
}

template <class E>
bool is(const std::type_info& type) {
    return type == typeid(E);
}

exception_code classify(const std::exception& error) {
    const std::type_info& type = typeid(error);
    if (is<std::invalid_argument>(type)) return exception_code::invalid_argument;
    if (is<std::domain_error>(type)) return exception_code::domain_error;
    if (is<std::length_error>(type)) return exception_code::length_error;
    if (is<std::out_of_range>(type)) return exception_code::out_of_range;
    if (is<std::logic_error>(type)) return exception_code::logic_error;
    if (is<std::range_error>(type)) return exception_code::range_error;
    if (is<std::overflow_error>(type)) return exception_code::overflow_error;
    if (is<std::underflow_error>(type)) return exception_code::underflow_error;
    if (is<std::system_error>(type)) return exception_code::system_error;
    if (is<std::runtime_error>(type)) return exception_code::runtime_error;
    if (is<std::bad_alloc>(type)) return exception_code::bad_alloc;
    // coproc's types by exact type too: a user's subclass of one of them
    // would lose its own state and type if rebuilt as the base, so it
    // travels as remote_error (or as itself when registered).
    if (is<coproc::error>(type)) return exception_code::coproc_error;
    if (is<timeout_error>(type)) return exception_code::timeout;
    if (is<pool_closed>(type)) return exception_code::pool_closed;
    if (is<queue_full>(type)) return exception_code::queue_full;
    if (is<broken_process_pool>(type)) return exception_code::broken_pool;
    if (is<worker_died>(type)) return exception_code::worker_died;
    if (is<remote_error>(type)) return exception_code::remote;
    if (is<worker_start_failed>(type)) return exception_code::worker_start_failed;
    if (is<io_uring_unavailable>(type)) return exception_code::io_uring_unavailable;
    if (is<memory_limit_exceeded>(type)) return exception_code::memory_limit;
    // Any cancellation is a cancellation to the awaiter, whatever its type.
    if (dynamic_cast<const cancelled_error*>(&error) != nullptr) return exception_code::cancelled;
    return exception_code::other;
}

} // namespace

bool register_remote_function(std::uint64_t id, std::string_view name, invoker invoke, invoker invoke_chunk,
                              argument_preparer prepare, prepared_invoker invoke_prepared) noexcept {
    auto& reg = the_registry();
    std::lock_guard lock{reg.mutex};
    const auto [entry, inserted] = reg.entries.try_emplace(
        id, remote_function_entry{id, name, invoke, invoke_chunk, false, prepare, invoke_prepared});
    if (!inserted && entry->second.invoke != invoke) entry->second.ambiguous = true;
    return true;
}

bool register_remote_exception(const std::type_info& type, std::uint64_t id, exception_encoder encode,
                               exception_decoder decode) noexcept {
    auto& reg = the_registry();
    std::lock_guard lock{reg.mutex};
    reg.exceptions_by_type.try_emplace(std::type_index(type), exception_entry{id, encode, decode});
    reg.exceptions_by_id.try_emplace(id, exception_entry{id, encode, decode});
    return true;
}

namespace {
const exception_entry* find_exception(const std::type_info& type) {
    auto& reg = the_registry();
    std::lock_guard lock{reg.mutex};
    const auto found = reg.exceptions_by_type.find(std::type_index(type));
    return found == reg.exceptions_by_type.end() ? nullptr : &found->second;
}
const exception_entry* find_exception(std::uint64_t id) {
    auto& reg = the_registry();
    std::lock_guard lock{reg.mutex};
    const auto found = reg.exceptions_by_id.find(id);
    return found == reg.exceptions_by_id.end() ? nullptr : &found->second;
}
std::string as_string(const byte_buffer& bytes) {
    return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}
} // namespace

bool remote_function_is_unique(std::uint64_t id, invoker invoke) noexcept {
    const remote_function_entry* entry = find_remote_function(id);
    return entry != nullptr && entry->invoke == invoke && !entry->ambiguous;
}

const remote_function_entry* find_remote_function(std::uint64_t id) noexcept {
    auto& reg = the_registry();
    std::lock_guard lock{reg.mutex};
    const auto found = reg.entries.find(id);
    return found == reg.entries.end() ? nullptr : &found->second;
}

namespace {

void encode_exception_at(std::exception_ptr error, byte_buffer& out, int depth);

// The state beyond what() of one of coproc's own exceptions, classified as
// `code` (so `e` is exactly that type): into `value` when it is one number,
// else encoded into `state`.
void save_coproc_state(const std::exception& e, exception_code code, std::int32_t& value, byte_buffer& state, int depth) {
    switch (code) {
    case exception_code::worker_start_failed: value = static_cast<const worker_start_failed&>(e).code(); break;
    case exception_code::io_uring_unavailable: value = static_cast<const io_uring_unavailable&>(e).cause(); break;
    case exception_code::memory_limit:
        encode_into(state, static_cast<const memory_limit_exceeded&>(e).limit());
        break;
    case exception_code::worker_died: {
        const auto& died = static_cast<const worker_died&>(e);
        encode_into(state, std::int32_t{died.pid()}, std::int32_t{died.signal()}, std::int32_t{died.exit_code()}, died.function());
        break;
    }
    case exception_code::remote: {
        const auto& remote = static_cast<const remote_error&>(e);
        encode_into(state, remote.type_name(), remote.message(), std::int32_t{remote.pid()}, remote.function(),
                    remote.std_exception());
        break;
    }
    case exception_code::broken_pool:
        if (const std::exception_ptr cause = static_cast<const broken_process_pool&>(e).cause(); cause && depth < max_cause_depth) {
            encode_exception_at(cause, state, depth + 1);
        }
        break;
    default: break;
    }
}

void encode_exception_at(std::exception_ptr error, byte_buffer& out, int depth) {
    std::uint8_t code = static_cast<std::uint8_t>(exception_code::unknown);
    std::string type_name; // empty: not even the type is known
    std::string what;
    std::int32_t error_value = 0;
    std::string category;
    std::uint64_t registered_id = 0;
    // A registered type's state, or that of one of coproc's own types (see
    // save_coproc_state): which one, the code says.
    std::string registered_state;
    try {
        std::rethrow_exception(std::move(error));
    } catch (const std::system_error& e) {
        code = static_cast<std::uint8_t>(classify(e));
        type_name = demangle(typeid(e).name());
        what = e.what();
        error_value = e.code().value();
        category = e.code().category().name();
    } catch (const std::exception& e) {
        code = static_cast<std::uint8_t>(classify(e));
        type_name = demangle(typeid(e).name());
        what = e.what();
        byte_buffer coproc_state;
        save_coproc_state(e, static_cast<exception_code>(code), error_value, coproc_state, depth);
        registered_state = as_string(coproc_state);
        if (const exception_entry* registered = find_exception(typeid(e))) {
            try {
                byte_buffer state;
                registered->encode(e, state);
                code = static_cast<std::uint8_t>(exception_code::registered);
                registered_id = registered->id;
                registered_state = as_string(state);
            } catch (...) {
                // Its state does not serialize: it travels as remote_error.
            }
        }
    } catch (...) {
        // Not a std::exception: no what(), but the C++ runtime still knows
        // its type ("int" for `throw 42`).
        if (const std::type_info* type = abi::__cxa_current_exception_type()) type_name = demangle(type->name());
    }
    encode_into(out, code, type_name, what, error_value, category, registered_id, registered_state);
}

} // namespace

void encode_exception(std::exception_ptr error, byte_buffer& out) { encode_exception_at(std::move(error), out, 0); }

void encode_ambiguous_function(std::string_view name, byte_buffer& out) {
    const auto code = static_cast<std::uint8_t>(exception_code::unknown_function);
    const std::string type_name = "ambiguous function";
    const std::string what = "two different functions named like " + std::string(name) + " share an id in the worker";
    encode_into(out, code, type_name, what, std::int32_t{0}, std::string{}, std::uint64_t{0}, std::string{});
}

void encode_unknown_function(std::uint64_t function_id, byte_buffer& out) {
    const auto code = static_cast<std::uint8_t>(exception_code::unknown_function);
    const std::string type_name = "unknown function";
    const std::string what = "no function with id " + std::to_string(function_id) + " is registered in the worker";
    encode_into(out, code, type_name, what, std::int32_t{0}, std::string{}, std::uint64_t{0}, std::string{});
}

std::string describe_ambiguous_function(std::string_view name) {
    return "coproc: cannot submit " + std::string(name) +
           ": another function of the program has the same name and type as this compiler spells them (for "
           "example two specializations of one function template under Clang), so a worker could not tell them "
           "apart. Submit a distinct non-template function instead";
}

namespace {

std::span<const std::byte> bytes_of(const std::string& text) noexcept { return std::as_bytes(std::span{text.data(), text.size()}); }

std::exception_ptr decode_exception_at(std::span<const std::byte> payload, int worker_pid, std::string_view function, int depth) {
    std::uint8_t code = 0;
    std::string type_name;
    std::string what;
    std::int32_t error_value = 0;
    std::string category;
    std::uint64_t registered_id = 0;
    std::string registered_state;
    decode_from(payload, code, type_name, what, error_value, category, registered_id, registered_state);
    switch (static_cast<exception_code>(code)) {
    case exception_code::logic_error: return std::make_exception_ptr(std::logic_error(what));
    case exception_code::invalid_argument: return std::make_exception_ptr(std::invalid_argument(what));
    case exception_code::domain_error: return std::make_exception_ptr(std::domain_error(what));
    case exception_code::length_error: return std::make_exception_ptr(std::length_error(what));
    case exception_code::out_of_range: return std::make_exception_ptr(std::out_of_range(what));
    case exception_code::runtime_error: return std::make_exception_ptr(std::runtime_error(what));
    case exception_code::range_error: return std::make_exception_ptr(std::range_error(what));
    case exception_code::overflow_error: return std::make_exception_ptr(std::overflow_error(what));
    case exception_code::underflow_error: return std::make_exception_ptr(std::underflow_error(what));
    case exception_code::bad_alloc: return std::make_exception_ptr(std::bad_alloc());
    case exception_code::system_error: {
        const std::error_category& cat = category == "generic" ? std::generic_category() : std::system_category();
        const std::error_code ec{error_value, cat};
        // what() was "<argument>: <message>"; pass the argument back alone.
        const std::string suffix = ": " + ec.message();
        std::string argument = what;
        if (argument.size() >= suffix.size() && argument.compare(argument.size() - suffix.size(), suffix.size(), suffix) == 0) {
            argument.resize(argument.size() - suffix.size());
        }
        return std::make_exception_ptr(std::system_error(ec, argument));
    }
    case exception_code::cancelled: return std::make_exception_ptr(cancelled_error(what));
    case exception_code::coproc_error: return std::make_exception_ptr(error(what));
    case exception_code::timeout: return std::make_exception_ptr(timeout_error(what));
    case exception_code::pool_closed: return std::make_exception_ptr(pool_closed(what));
    case exception_code::queue_full: return std::make_exception_ptr(queue_full(what));
    case exception_code::worker_start_failed: return std::make_exception_ptr(worker_start_failed(error_value, what));
    case exception_code::io_uring_unavailable: return std::make_exception_ptr(io_uring_unavailable(error_value, what));
    case exception_code::memory_limit: {
        std::uint64_t limit = 0;
        decode_from(bytes_of(registered_state), limit);
        return std::make_exception_ptr(memory_limit_exceeded(limit, what));
    }
    case exception_code::worker_died: {
        std::int32_t pid = 0;
        std::int32_t signal = 0;
        std::int32_t exit_code = 0;
        std::string died_function;
        decode_from(bytes_of(registered_state), pid, signal, exit_code, died_function);
        return std::make_exception_ptr(worker_died(pid, signal, exit_code, std::move(died_function), what));
    }
    case exception_code::remote: {
        std::string original_type;
        std::string message;
        std::int32_t pid = 0;
        std::string remote_function;
        bool std_exception = true;
        decode_from(bytes_of(registered_state), original_type, message, pid, remote_function, std_exception);
        return std::make_exception_ptr(
            remote_error(std::move(original_type), std::move(message), pid, std::move(remote_function), std_exception));
    }
    case exception_code::broken_pool: {
        std::exception_ptr cause;
        if (!registered_state.empty() && depth < max_cause_depth) {
            cause = decode_exception_at(bytes_of(registered_state), worker_pid, function, depth + 1);
        }
        return std::make_exception_ptr(broken_process_pool(what, std::move(cause)));
    }
    case exception_code::unknown_function:
        return std::make_exception_ptr(error("coproc: worker " + std::to_string(worker_pid) + " does not know the function " +
                                             std::string(function) +
                                             "; a separate worker program must be built from the same sources and "
                                             "register it with COPROC_REGISTER(" + std::string(function) + ")"));
    case exception_code::registered:
        if (const exception_entry* registered = find_exception(registered_id)) {
            try {
                return registered->decode(bytes_of(registered_state));
            } catch (...) {
                // Its state does not load here: report it as remote_error.
            }
        }
        break;
    case exception_code::other:
    case exception_code::unknown:
        break;
    }
    return std::make_exception_ptr(remote_error(type_name, what, worker_pid, std::string(function),
                                                static_cast<exception_code>(code) != exception_code::unknown));
}

} // namespace

std::exception_ptr decode_exception(std::span<const std::byte> payload, int worker_pid, std::string_view function) {
    return decode_exception_at(payload, worker_pid, function, 0);
}

} // namespace coproc::detail

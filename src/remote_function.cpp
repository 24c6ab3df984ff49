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
};

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

void encode_exception(std::exception_ptr error, byte_buffer& out) {
    std::uint8_t code = static_cast<std::uint8_t>(exception_code::unknown);
    std::string type_name = "an exception of unknown type";
    std::string what;
    std::int32_t error_value = 0;
    std::string category;
    std::uint64_t registered_id = 0;
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
    }
    encode_into(out, code, type_name, what, error_value, category, registered_id, registered_state);
}

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

std::exception_ptr decode_exception(std::span<const std::byte> payload, int worker_pid, std::string_view function) {
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
    case exception_code::unknown_function:
        return std::make_exception_ptr(error("coproc: worker " + std::to_string(worker_pid) + " does not know the function " +
                                             std::string(function) +
                                             "; a separate worker program must be built from the same sources and "
                                             "register it with COPROC_REGISTER(" + std::string(function) + ")"));
    case exception_code::registered:
        if (const exception_entry* registered = find_exception(registered_id)) {
            try {
                return registered->decode(std::as_bytes(std::span{registered_state.data(), registered_state.size()}));
            } catch (...) {
                // Its state does not load here: report it as remote_error.
            }
        }
        break;
    case exception_code::other:
    case exception_code::unknown:
        break;
    }
    return std::make_exception_ptr(remote_error(type_name, what, worker_pid, std::string(function)));
}

} // namespace coproc::detail

// coproc/detail/remote_function.hpp - functions that can run in a worker.
//
// A function is known by a stable 64-bit id: the FNV-1a hash of the
// compiler's spelling of F together with that of F's type. Two processes
// running the same program compute the same id, and so does a separate
// worker program built by the same compiler from the same sources. The type
// tells overloads apart; compilers may still spell two functions alike (Clang
// omits the arguments of function template specializations). The registry
// notices when two different functions share an id, and submit then fails
// the future with an error instead of running the wrong one.
//
// remote<F>::registered is an inline variable whose initializer adds F to the
// process-wide registry. Submitting through submit<F> odr-uses it, so it is
// part of the program, and its initializer runs at start-up in every process
// of that program, workers included. A separate worker program names its
// functions with COPROC_REGISTER(f) (coproc/worker.hpp), which does the same.
#pragma once

#include <coproc/detail/serialization.hpp>
#include <coproc/sink.hpp>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <span>
#include <stop_token>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

namespace coproc::detail {

constexpr std::uint64_t fnv1a(std::string_view text) noexcept {
    std::uint64_t hash = 14695981039346656037ULL;
    for (char c : text) {
        hash ^= static_cast<unsigned char>(c);
        hash *= 1099511628211ULL;
    }
    return hash;
}

template <auto F>
constexpr std::string_view pretty_name_of() noexcept {
    return __PRETTY_FUNCTION__;
}

template <class T>
constexpr std::string_view pretty_type_of() noexcept {
    return __PRETTY_FUNCTION__;
}

// What a __PRETTY_FUNCTION__ spells after `marker` ("F = ", "T = "), up to
// the next ';' or ']': the compiler's spelling of a template argument.
constexpr std::string_view spelled_after(std::string_view pretty, std::string_view marker) noexcept {
    const std::size_t at = pretty.find(marker);
    if (at == std::string_view::npos) return pretty;
    const std::string_view rest = pretty.substr(at + marker.size());
    return rest.substr(0, rest.find_first_of(";]"));
}

// The function's name as the compiler spells it, for messages ("simulate",
// "physics::simulate").
template <auto F>
constexpr std::string_view display_name_of() noexcept {
    constexpr std::string_view name = spelled_after(pretty_name_of<F>(), "F = ");
    return name.starts_with('&') ? name.substr(1) : name;
}

// The type's name as the compiler spells it, for messages.
template <class T>
constexpr std::string_view display_type_name_of() noexcept {
    return spelled_after(pretty_type_of<T>(), "T = ");
}

template <class Signature>
struct function_traits;

template <class R, class... Params>
struct function_traits<R (*)(Params...)> {
    using result = R;
    using parameters = std::tuple<Params...>;
    static constexpr std::size_t arity = sizeof...(Params);
};
template <class R, class... Params>
struct function_traits<R (*)(Params...) noexcept> : function_traits<R (*)(Params...)> {};
// operator() of a callable object.
template <class R, class C, class... Params>
struct function_traits<R (C::*)(Params...)> : function_traits<R (*)(Params...)> {};
template <class R, class C, class... Params>
struct function_traits<R (C::*)(Params...) const> : function_traits<R (*)(Params...)> {};
template <class R, class C, class... Params>
struct function_traits<R (C::*)(Params...) noexcept> : function_traits<R (*)(Params...)> {};
template <class R, class C, class... Params>
struct function_traits<R (C::*)(Params...) const noexcept> : function_traits<R (*)(Params...)> {};

// True when the last parameter is a std::stop_token: the worker passes the
// task's token there, and the caller does not.
template <class Parameters>
constexpr bool takes_stop_token() {
    if constexpr (std::tuple_size_v<Parameters> == 0) {
        return false;
    } else {
        using last = std::tuple_element_t<std::tuple_size_v<Parameters> - 1, Parameters>;
        return std::is_same_v<std::remove_cvref_t<last>, std::stop_token>;
    }
}

// A parameter `coproc::sink<T>&`: the function streams T items.
template <class Parameter>
struct sink_parameter : std::false_type {
    using item = void;
};
template <class T>
struct sink_parameter<sink<T>&> : std::true_type {
    using item = T;
};

// How many parameters the worker passes after the caller's: a trailing
// std::stop_token, and before it (or last) a coproc::sink<T>&.
template <class Parameters>
constexpr std::size_t worker_parameters() {
    constexpr std::size_t token = takes_stop_token<Parameters>() ? 1 : 0;
    if constexpr (std::tuple_size_v<Parameters> > token) {
        using before = std::tuple_element_t<std::tuple_size_v<Parameters> - token - 1, Parameters>;
        return token + (sink_parameter<before>::value ? 1 : 0);
    } else {
        return token;
    }
}

// The item type of a stream function (its sink<T>&), or void.
template <class Parameters, bool Stream = (worker_parameters<Parameters>() > (takes_stop_token<Parameters>() ? 1 : 0))>
struct stream_item_of {
    using type = void;
};
template <class Parameters>
struct stream_item_of<Parameters, true> {
    using type = typename sink_parameter<
        std::tuple_element_t<std::tuple_size_v<Parameters> - worker_parameters<Parameters>(), Parameters>>::item;
};
template <class Parameters>
using stream_item_t = typename stream_item_of<Parameters>::type;

// The parameters the caller supplies, decayed: what travels in a CALL frame.
template <class Parameters, class Indices>
struct wire_arguments_impl;
template <class Parameters, std::size_t... I>
struct wire_arguments_impl<Parameters, std::index_sequence<I...>> {
    using type = std::tuple<std::decay_t<std::tuple_element_t<I, Parameters>>...>;
};
template <class Parameters>
using wire_arguments_t = typename wire_arguments_impl<
    Parameters, std::make_index_sequence<std::tuple_size_v<Parameters> - worker_parameters<Parameters>()>>::type;

template <class Tuple, class Indices>
struct all_serializable_impl;
template <class Tuple, std::size_t... I>
struct all_serializable_impl<Tuple, std::index_sequence<I...>>
    : std::bool_constant<(serializable<std::tuple_element_t<I, Tuple>> && ...)> {};
template <class Tuple>
inline constexpr bool all_serializable = all_serializable_impl<Tuple, std::make_index_sequence<std::tuple_size_v<Tuple>>>::value;

// Runs a function in the worker: decodes its arguments from `arguments`,
// calls it with `token` where it takes one, and appends its encoded result to
// `result`; a large block container in the result is moved into `attached`
// instead (encode_attaching). Throws whatever decoding, the function or
// encoding throws.
using invoker = void (*)(std::span<const std::byte> arguments, byte_buffer& result,
                         std::vector<attached_bytes>& attached, std::stop_token token);

// A function whose arguments are one block container (`std::string
// process(std::string data)`) has them received straight into place: the
// worker's reader makes the arguments, `block` (the container's elements)
// is where the CALL frame's remaining bytes go, and the runner calls the
// function on them.
struct prepared_arguments {
    std::shared_ptr<void> values; // the function's argument tuple; null: not prepared
    std::span<std::byte> block;
};
// Makes the arguments for a block of `count` elements filling `bytes`
// bytes, in the memory of `spare` when reuse_block accepts it; returns
// nothing prepared when they do not match.
using argument_preparer = prepared_arguments (*)(std::uint64_t count, std::size_t bytes, spare_block& spare);
using prepared_invoker = void (*)(void* values, byte_buffer& result, std::vector<attached_bytes>& attached,
                                  std::stop_token token);

// Thrown by a chunk's invoker when an input failed after others succeeded:
// `error` is the failure, and the results before it were encoded already.
// Not a std::exception, so that nothing catches it by accident.
struct chunk_failure {
    std::exception_ptr error;
};

struct remote_function_entry {
    std::uint64_t id;
    std::string_view name;
    invoker invoke;       // one call: arguments -> result
    invoker invoke_chunk; // map: a vector of argument tuples -> a vector of results
    bool ambiguous;       // two different functions registered this id
    // Null unless the arguments are one block container.
    argument_preparer prepare = nullptr;
    prepared_invoker invoke_prepared = nullptr;
};

// The process-wide registry (src/remote_function.cpp). Registering an id
// again with a different invoker marks the entry ambiguous.
bool register_remote_function(std::uint64_t id, std::string_view name, invoker invoke, invoker invoke_chunk,
                              argument_preparer prepare = nullptr, prepared_invoker invoke_prepared = nullptr) noexcept;
const remote_function_entry* find_remote_function(std::uint64_t id) noexcept;
// True when `id` names exactly the function whose invoker is `invoke`.
bool remote_function_is_unique(std::uint64_t id, invoker invoke) noexcept;

template <auto F>
struct remote {
    static_assert(std::is_pointer_v<decltype(F)> && std::is_function_v<std::remove_pointer_t<decltype(F)>>,
                  "coproc: submit<F> takes a free function (or a static member function); "
                  "for a callable object, submit the object itself");
    using traits = function_traits<decltype(F)>;
    using parameters = typename traits::parameters;
    using arguments = wire_arguments_t<parameters>;
    using result = std::decay_t<typename traits::result>;
    static constexpr bool wants_stop_token = takes_stop_token<parameters>();
    // A stream function (a coproc::sink<T>& parameter): the T it pushes.
    using stream_item = stream_item_t<parameters>;
    static constexpr bool is_stream = !std::is_void_v<stream_item>;
    static_assert(!is_stream || std::is_void_v<result>,
                  "coproc: a stream function (one that takes a coproc::sink<T>&) returns void: its items go "
                  "through the sink, and its end ends the stream");

    static_assert(all_serializable<arguments>,
                  "coproc: a parameter type of this function cannot be serialized by cereal. Give the type a "
                  "serialize(Archive&) member (or a free serialize function), or include the cereal header "
                  "for it (<cereal/types/...>)");
    static_assert(std::is_void_v<result> || serializable<result>,
                  "coproc: the result type of this function cannot be serialized by cereal. Give the type a "
                  "serialize(Archive&) member (or a free serialize function), or include the cereal header "
                  "for it (<cereal/types/...>)");

    static constexpr std::string_view name = display_name_of<F>();
    static constexpr std::uint64_t id = fnv1a(pretty_name_of<F>()) ^ (fnv1a(pretty_type_of<decltype(F)>()) * 31);

    static void invoke(std::span<const std::byte> encoded, byte_buffer& out, std::vector<attached_bytes>& attached,
                       std::stop_token token) {
        arguments values;
        decode_from(encoded, values);
        invoke_prepared(&values, out, attached, std::move(token));
    }

    // map: F over each argument tuple of a chunk, the results in order.
    // When F throws for an input after others succeeded, their results are
    // encoded into `out` and chunk_failure is thrown with F's exception:
    // the worker sends them as a partial RESULT before the ERROR.
    static void invoke_chunk(std::span<const std::byte> encoded, byte_buffer& out, std::vector<attached_bytes>& attached,
                             std::stop_token token) {
        std::vector<arguments> chunk;
        decode_from(encoded, chunk);
        if constexpr (std::is_void_v<result>) {
            for (auto& values : chunk) call(std::move(values), token);
        } else {
            std::vector<result> results;
            results.reserve(chunk.size());
            for (auto& values : chunk) {
                try {
                    results.push_back(call(std::move(values), token));
                } catch (...) {
                    if (results.empty()) throw;
                    chunk_failure failure{std::current_exception()};
                    encode_attaching(out, attached, std::move(results));
                    throw failure;
                }
            }
            encode_attaching(out, attached, std::move(results));
        }
    }

    static constexpr bool one_block = [] {
        if constexpr (std::tuple_size_v<arguments> == 1) {
            return block_container<std::tuple_element_t<0, arguments>>::value;
        } else {
            return false;
        }
    }();

    static prepared_arguments prepare(std::uint64_t count, std::size_t bytes, spare_block& spare) {
        if constexpr (one_block) {
            if (!block_fills<std::tuple_element_t<0, arguments>>(count, bytes)) return {};
            auto values = std::make_shared<arguments>();
            auto& argument = std::get<0>(*values);
            reuse_block(argument, spare, static_cast<std::size_t>(count));
            const std::span<std::byte> block = size_block(argument, static_cast<std::size_t>(count));
            return {std::move(values), block};
        } else {
            (void)count;
            (void)bytes;
            (void)spare;
            return {};
        }
    }

    // Calls F on arguments already made (by invoke, or by prepare and the
    // worker's reader) and encodes its result.
    static void invoke_prepared(void* prepared, byte_buffer& out, std::vector<attached_bytes>& attached,
                                std::stop_token token) {
        arguments& values = *static_cast<arguments*>(prepared);
        if constexpr (std::is_void_v<result>) {
            call(std::move(values), std::move(token));
        } else {
            encode_attaching(out, attached, result(call(std::move(values), std::move(token))));
        }
    }

    static inline const bool registered =
        register_remote_function(id, name, &invoke, &invoke_chunk, one_block ? &prepare : nullptr,
                                 one_block ? &invoke_prepared : nullptr);

private:
    static decltype(auto) call(arguments&& values, std::stop_token token) {
        return std::apply(
            [&token](auto&&... unpacked) -> decltype(auto) {
                if constexpr (is_stream) {
                    sink<stream_item> out = sink_access::for_worker<stream_item>();
                    if constexpr (wants_stop_token) {
                        F(std::move(unpacked)..., out, std::move(token));
                    } else {
                        (void)token;
                        F(std::move(unpacked)..., out);
                    }
                } else if constexpr (wants_stop_token) {
                    return F(std::move(unpacked)..., std::move(token));
                } else {
                    (void)token;
                    return F(std::move(unpacked)...);
                }
            },
            std::move(values));
    }
};

// A callable object that travels with its call: its state is serialized
// before the arguments, and the worker default-constructs one, loads that
// state and calls it. Known by the hash of its type and of its operator().
template <class T>
struct remote_object {
    static_assert(requires { &T::operator(); },
                  "coproc: submit(object, args...) takes an object whose type has exactly one, non-template operator()");
    static_assert(std::is_default_constructible_v<T>,
                  "coproc: a callable object submitted to a pool must be default-constructible: the worker constructs "
                  "one and then loads its state");
    static_assert(serializable<T>,
                  "coproc: the callable object's type cannot be serialized by cereal; give it a serialize(Archive&) "
                  "member that lists its state");
    using traits = function_traits<decltype(&T::operator())>;
    using parameters = typename traits::parameters;
    using arguments = wire_arguments_t<parameters>;
    using result = std::decay_t<typename traits::result>;
    static constexpr bool wants_stop_token = takes_stop_token<parameters>();
    static_assert(std::is_void_v<stream_item_t<parameters>>,
                  "coproc: a callable object cannot stream (take a coproc::sink<T>&); submit_stream takes a free "
                  "function");
    static_assert(all_serializable<arguments>,
                  "coproc: a parameter type of this object's operator() cannot be serialized by cereal");
    static_assert(std::is_void_v<result> || serializable<result>,
                  "coproc: the result type of this object's operator() cannot be serialized by cereal");

    static constexpr std::string_view name = display_type_name_of<T>();
    static constexpr std::uint64_t id =
        fnv1a(pretty_type_of<T>()) ^ (fnv1a(pretty_type_of<decltype(&T::operator())>()) * 31);

    static void invoke(std::span<const std::byte> encoded, byte_buffer& out, std::vector<attached_bytes>& attached,
                       std::stop_token token) {
        T object{};
        arguments values;
        decode_from(encoded, object, values);
        if constexpr (std::is_void_v<result>) {
            call(object, std::move(values), std::move(token));
        } else {
            encode_attaching(out, attached, result(call(object, std::move(values), std::move(token))));
        }
    }

    static inline const bool registered = register_remote_function(id, name, &invoke, &invoke);

private:
    static decltype(auto) call(T& object, arguments&& values, std::stop_token token) {
        return std::apply(
            [&object, &token](auto&&... unpacked) -> decltype(auto) {
                if constexpr (wants_stop_token) {
                    return object(std::move(unpacked)..., std::move(token));
                } else {
                    (void)token;
                    return object(std::move(unpacked)...);
                }
            },
            std::move(values));
    }
};

// --- exceptions across the process boundary (src/remote_function.cpp)

// A user exception type registered to travel as itself
// (COPROC_REGISTER_EXCEPTION): the worker serializes it, the parent rebuilds
// and rethrows the same type.
using exception_encoder = void (*)(const std::exception& error, byte_buffer& out);
using exception_decoder = std::exception_ptr (*)(std::span<const std::byte> state);
bool register_remote_exception(const std::type_info& type, std::uint64_t id, exception_encoder encode,
                               exception_decoder decode) noexcept;

template <class E>
struct remote_exception {
    static_assert(std::is_base_of_v<std::exception, E>, "coproc: COPROC_REGISTER_EXCEPTION takes a std::exception type");
    static_assert(std::is_default_constructible_v<E>,
                  "coproc: a registered exception type must be default-constructible: the parent constructs one and "
                  "then loads its state");
    static_assert(serializable<E>,
                  "coproc: a registered exception type needs a serialize(Archive&) member listing its state "
                  "(its what() must come from that state)");
    static constexpr std::uint64_t id = fnv1a(pretty_type_of<E>());

    static void encode(const std::exception& error, byte_buffer& out) {
        encode_into(out, static_cast<const E&>(error));
    }
    static std::exception_ptr decode(std::span<const std::byte> state) {
        E rebuilt{};
        decode_from(state, rebuilt);
        return std::make_exception_ptr(std::move(rebuilt));
    }
    static inline const bool registered = register_remote_exception(typeid(E), id, &encode, &decode);
};

// Appends the ERROR payload for the exception in `error` (worker side).
void encode_exception(std::exception_ptr error, byte_buffer& out);

// Appends the ERROR payload saying the worker has no function `function_id`,
// or cannot tell which of several functions it names.
void encode_unknown_function(std::uint64_t function_id, byte_buffer& out);
void encode_ambiguous_function(std::string_view name, byte_buffer& out);

// The message of the error a submit fails with when F's id is ambiguous.
std::string describe_ambiguous_function(std::string_view name);

// Rebuilds the exception from an ERROR payload (parent side): the same
// standard type with the same what(), or coproc::remote_error.
std::exception_ptr decode_exception(std::span<const std::byte> payload, int worker_pid, std::string_view function);

} // namespace coproc::detail

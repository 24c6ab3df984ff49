// What the libFuzzer harnesses share: the seeding mode that writes their
// committed corpus, and the one exception a decoder may throw.
//
// A harness fails on anything but a clean return or a cereal::Exception
// from the decoder: a crash, a sanitizer report, a leak, any other exception
// (std::bad_alloc and std::length_error are how an untrusted count used to
// show), and, under scripts/dev fuzz, any allocation over -malloc_limit_mb.
#pragma once

#include <coproc/detail/byte_buffer.hpp>
#include <coproc/detail/serialization.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace coproc_fuzz {

// The bytes of `values...` as coproc encodes them, with `prefix` before.
template <class... T>
std::string encoded(const std::string& prefix, const T&... values) {
    coproc::detail::byte_buffer out;
    coproc::detail::encode_into(out, values...);
    return prefix + std::string(reinterpret_cast<const char*>(out.data()), out.size());
}

// With COPROC_FUZZ_WRITE_SEEDS=<directory> set, writes `seeds` there as
// seed-0, seed-1, ... and exits: how tests/fuzz/corpus/<harness>/ was made.
inline void write_seeds_if_asked(const std::vector<std::string>& seeds) {
    const char* directory = std::getenv("COPROC_FUZZ_WRITE_SEEDS");
    if (directory == nullptr) return;
    for (std::size_t i = 0; i < seeds.size(); ++i) {
        std::ofstream out{std::string(directory) + "/seed-" + std::to_string(i), std::ios::binary};
        out.write(seeds[i].data(), static_cast<std::streamsize>(seeds[i].size()));
        if (!out) {
            std::fprintf(stderr, "cannot write seed %zu into %s: does the directory exist?\n", i, directory);
            std::exit(1);
        }
    }
    std::exit(0);
}

} // namespace coproc_fuzz

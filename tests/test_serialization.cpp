// Decoding payloads: coproc reads exactly what cereal's binary archive
// writes, and never trusts a size the bytes claim (bounded_input_archive):
// a frame claiming more than it holds is a cereal::Exception naming the
// claim, raised before anything is allocated for it, in the parent and in
// the worker.
#include "remote_functions.hpp"
#include "encoding_support.hpp"
#include "support.hpp"

#include <coproc/detail/byte_buffer.hpp>
#include <coproc/detail/serialization.hpp>

#include <cereal/archives/binary.hpp>
#include <cereal/types/polymorphic.hpp>

#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

using coproc::detail::byte_buffer;
using namespace test_support;
using namespace std::chrono_literals;

namespace {

// Bytes built by hand: each argument appended as its own bytes.
template <class... T>
std::string bytes_of(const T&... parts) {
    std::string out;
    auto append = [&out](const auto& part) {
        using part_type = std::remove_cvref_t<decltype(part)>;
        if constexpr (std::is_same_v<part_type, std::string>) {
            out += part;
        } else {
            static_assert(std::is_arithmetic_v<part_type>);
            out.append(reinterpret_cast<const char*>(&part), sizeof part);
        }
    };
    (append(parts), ...);
    return out;
}

// coproc writes what cereal writes and reads it back.
template <class T>
void check_round_trip(const T& value) {
    const std::string theirs = cereal_bytes(value);
    CHECK(coproc_bytes(value) == theirs);
    CHECK(decoded<T>(theirs) == value);
}

constexpr std::uint64_t huge = std::uint64_t{1} << 40;

// A user type with a templated serialize, as users write them.
struct reading {
    std::string sensor;
    std::vector<double> values;
    std::optional<std::int32_t> quality;
    template <class Archive>
    void serialize(Archive& archive) {
        archive(sensor, values, quality);
    }
    bool operator==(const reading&) const = default;
};

// The same with separate save and load, and a class version.
struct versioned_reading {
    std::map<std::string, std::vector<int>> series;
    template <class Archive>
    void save(Archive& archive, std::uint32_t) const {
        archive(series);
    }
    template <class Archive>
    void load(Archive& archive, std::uint32_t version) {
        if (version != 2) throw std::runtime_error("unexpected version");
        archive(series);
    }
    bool operator==(const versioned_reading&) const = default;
};

// A user type saved as one number (cereal's save_minimal/load_minimal).
struct celsius {
    double degrees = 0;
    template <class Archive>
    double save_minimal(const Archive&) const {
        return degrees;
    }
    template <class Archive>
    void load_minimal(const Archive&, const double& value) {
        degrees = value;
    }
    bool operator==(const celsius&) const = default;
};

// A polymorphic hierarchy, registered with cereal.
struct shape {
    virtual ~shape() = default;
    [[nodiscard]] virtual double area() const = 0;
};
struct square final : shape {
    double side = 0;
    square() = default;
    explicit square(double s) : side(s) {}
    [[nodiscard]] double area() const override { return side * side; }
    template <class Archive>
    void serialize(Archive& archive) {
        archive(side);
    }
};

} // namespace

CEREAL_CLASS_VERSION(versioned_reading, 2);
CEREAL_REGISTER_TYPE(square)
CEREAL_REGISTER_POLYMORPHIC_RELATION(shape, square)

TEST_CASE("cereal's standard types and user types read back exactly what cereal's binary archive writes") {
    check_round_trip(std::vector<std::string>{"a", "", std::string(300, 'x')});
    check_round_trip(std::map<std::string, std::vector<int>>{{"a", {1, 2}}, {"b", {}}});
    check_round_trip(std::unordered_map<std::string, int>{{"x", 1}, {"y", 2}});
    check_round_trip(std::unordered_set<int>{1, 2, 3});
    check_round_trip(std::deque<std::string>{"p", "q"});
    check_round_trip(std::list<std::int16_t>{1, -2, 3});
    check_round_trip(std::set<std::string>{"m", "n"});
    check_round_trip(std::vector<std::vector<std::string>>{{"a"}, {}, {"b", "c"}});
    check_round_trip(std::optional<std::string>{"present"});
    check_round_trip(std::optional<std::string>{});
    check_round_trip(std::variant<int, std::string, std::vector<double>>{std::string{"chosen"}});
    check_round_trip(std::variant<std::monostate, int>{});
    check_round_trip(std::tuple<int, double, std::string>{1, 2.5, "three"});
    check_round_trip(std::pair<std::string, std::uint64_t>{"key", 7});
    check_round_trip(std::array<double, 3>{1, 2, 3});
    check_round_trip(std::array<std::string, 2>{"x", "y"});
    check_round_trip(std::vector<bool>{true, false, true, true});
    check_round_trip(std::vector<float>{1.5f, -0.25f}); // inside cereal's path: one block of bytes
    check_round_trip(std::vector<double>{}); // coproc's block path, into a vector with no memory
    check_round_trip(std::tuple<std::vector<std::int32_t>, std::string>{});
    check_round_trip(std::map<int, std::vector<float>>{{1, {0.5f}}});
    check_round_trip(std::chrono::milliseconds{1234});
    check_round_trip(std::u16string{u"wide"});
    check_round_trip(reading{"probe", {1.5, 2.5}, 7});
    check_round_trip(versioned_reading{{{"s", {1, 2, 3}}}});
    check_round_trip(std::vector<celsius>{{21.5}, {-3}});

    // Pointers compare by what they point to.
    const auto shared = std::make_shared<std::string>("shared");
    using two_pointers = std::pair<std::shared_ptr<std::string>, std::shared_ptr<std::string>>;
    const two_pointers both{shared, shared};
    CHECK(coproc_bytes(both) == cereal_bytes(both));
    const auto back = decoded<two_pointers>(cereal_bytes(both));
    REQUIRE(back.first);
    CHECK(*back.first == "shared");
    CHECK(back.first == back.second); // cereal's tracking: one object, two pointers
    const auto unique = decoded<std::unique_ptr<std::vector<int>>>(cereal_bytes(std::make_unique<std::vector<int>>(3, 9)));
    REQUIRE(unique);
    CHECK(*unique == std::vector<int>(3, 9));
    CHECK_FALSE(decoded<std::unique_ptr<int>>(cereal_bytes(std::unique_ptr<int>{})));
}

TEST_CASE("polymorphic pointers registered with cereal decode through coproc's archive") {
    const std::shared_ptr<shape> drawn = std::make_shared<square>(3.0);
    const std::string bytes = cereal_bytes(drawn);
    CHECK(coproc_bytes(drawn) == bytes);
    const auto back = decoded<std::shared_ptr<shape>>(bytes);
    REQUIRE(back);
    CHECK(back->area() == 9.0);
    // A type name claiming more bytes than are left.
    CHECK_THROWS_WITH_AS(decoded<std::shared_ptr<shape>>(bytes_of(std::uint32_t{0x80000001u}, huge)),
                         doctest::Contains("claims 1099511627776"), cereal::Exception);
}

TEST_CASE("a 24-byte encoding that claims 2^40 strings is refused before anything is allocated for them") {
    const std::string lie = bytes_of(huge, std::string(16, '\0'));
    REQUIRE(lie.size() == 24);
    const auto started = std::chrono::steady_clock::now();
    CHECK_THROWS_WITH_AS(decoded<std::vector<std::string>>(lie),
                         doctest::Contains("a container claims 1099511627776 elements, more than the 16 bytes left"),
                         cereal::Exception);
    CHECK(std::chrono::steady_clock::now() - started < 1s);
    // A count of exactly the bytes left passes the check; the strings then
    // run out of bytes, as they would in cereal.
    CHECK_THROWS_AS(decoded<std::vector<std::string>>(bytes_of(std::uint64_t{16}, std::string(16, '\0'))),
                    cereal::Exception);
    CHECK(decoded<std::vector<std::string>>(bytes_of(std::uint64_t{2}, std::uint64_t{0}, std::uint64_t{0})) ==
          std::vector<std::string>{"", ""});
}

TEST_CASE("maps claiming a huge count are refused, the reserving unordered_map included") {
    const std::string lie = bytes_of(huge, std::string(8, 'k'));
    CHECK_THROWS_WITH_AS((decoded<std::map<std::string, std::vector<int>>>(lie)),
                         doctest::Contains("claims 1099511627776 elements, more than the 8 bytes left"), cereal::Exception);
    // std::unordered_map reserves its count before reading an element.
    CHECK_THROWS_WITH_AS((decoded<std::unordered_map<std::string, int>>(lie)),
                         doctest::Contains("claims 1099511627776 elements, more than the 8 bytes left"), cereal::Exception);
    CHECK_THROWS_WITH_AS((decoded<std::unordered_set<std::uint64_t>>(lie)), doctest::Contains("claims 1099511627776"),
                         cereal::Exception);
}

TEST_CASE("a nested container's claim is checked against the bytes left where it is read") {
    // vector<vector<string>>: two outer elements, the first honest (one
    // empty string), the second claiming 2^40 strings.
    const std::string lie = bytes_of(std::uint64_t{2}, std::uint64_t{1}, std::uint64_t{0}, huge, std::uint64_t{0});
    CHECK_THROWS_WITH_AS(decoded<std::vector<std::vector<std::string>>>(lie),
                         doctest::Contains("claims 1099511627776 elements, more than the 8 bytes left"), cereal::Exception);
    CHECK_THROWS_WITH_AS((decoded<std::deque<std::list<std::string>>>(bytes_of(std::uint64_t{1}, huge))),
                         doctest::Contains("claims 1099511627776 elements, more than the 0 bytes left"), cereal::Exception);
}

TEST_CASE("a string inside a container claiming more bytes than are left is refused") {
    // One string claiming 2^40 characters, 5 present.
    const std::string lie = bytes_of(std::uint64_t{1}, huge, std::string("hello"));
    CHECK_THROWS_WITH_AS(decoded<std::vector<std::string>>(lie),
                         doctest::Contains("claims 1099511627776 elements, more than the 5 bytes left"), cereal::Exception);
    CHECK_THROWS_WITH_AS((decoded<std::pair<int, std::string>>(bytes_of(std::int32_t{1}, huge))),
                         doctest::Contains("claims 1099511627776"), cereal::Exception);
}

TEST_CASE("numbers, bools, blocks and pointers are read only from bytes that are there") {
    CHECK_THROWS_WITH_AS((decoded<std::tuple<std::int32_t, std::int64_t>>(bytes_of(std::int32_t{1}, std::int16_t{2}))),
                         doctest::Contains("claims 8 more bytes, but only 2 bytes are left"), cereal::Exception);
    // A vector of floats inside a pair: cereal reads its elements as one block.
    CHECK_THROWS_WITH_AS((decoded<std::pair<int, std::vector<float>>>(bytes_of(std::int32_t{1}, std::uint64_t{3},
                                                                                std::string(8, '\0')))),
                         doctest::Contains("a block claims 12 bytes, more than the 8 bytes left"), cereal::Exception);
    // An optional's flag is a bool: only 0 and 1 are bools.
    CHECK_THROWS_WITH_AS(decoded<std::optional<std::int32_t>>(bytes_of(std::uint8_t{2}, std::int32_t{5})),
                         doctest::Contains("a bool is encoded as 2"), cereal::Exception);
    // A variant index out of range.
    CHECK_THROWS_AS((decoded<std::variant<int, std::string>>(bytes_of(std::int32_t{-1}, std::int32_t{0}))),
                    cereal::Exception);
    CHECK_THROWS_AS((decoded<std::variant<int, std::string>>(bytes_of(std::int32_t{2}, std::int32_t{0}))),
                    cereal::Exception);
    // A shared pointer referring to an object of another type (cereal's
    // loader would cast it blindly), and to one never read.
    const std::uint32_t first = 0x80000001u;
    const std::uint32_t again = 1;
    using mixed_pointers = std::pair<std::shared_ptr<std::int64_t>, std::shared_ptr<double>>;
    CHECK_THROWS_WITH_AS(decoded<mixed_pointers>(bytes_of(first, std::int64_t{7}, again)),
        doctest::Contains("refers to object 1, which the encoding made with another type"), cereal::Exception);
    CHECK_THROWS_AS(decoded<std::shared_ptr<std::int64_t>>(bytes_of(std::uint32_t{5})), cereal::Exception);
}

TEST_CASE("a container of more empty-encoding elements than bytes left is refused") {
    // std::tuple<> encodes to no bytes: three of them are a count and
    // nothing else, which the bound refuses (documented in
    // bounded_input_archive.hpp).
    const std::vector<std::tuple<>> three(3);
    CHECK(coproc_bytes(three) == bytes_of(std::uint64_t{3}));
    CHECK_THROWS_WITH_AS(decoded<std::vector<std::tuple<>>>(coproc_bytes(three)),
                         doctest::Contains("claims 3 elements, more than the 0 bytes left"), cereal::Exception);
}

namespace {
coproc::task<std::vector<std::string>> submit_lying(coproc::process_pool* pool) {
    // The pool's first task has work id 1.
    co_return co_await pool->submit<pool_test::send_lying_strings_result>(std::uint64_t{1});
}
coproc::task<void> until_no_worker(coproc::event_loop* loop, coproc::process_pool* pool) {
    while (pool->stats().workers_alive > 0) co_await loop->sleep_for(1ms);
}
coproc::task<int> submit_square(coproc::process_pool* pool, int x) { co_return co_await pool->submit<pool_test::square>(x); }
} // namespace

TEST_CASE("a worker's RESULT frame claiming 2^40 strings fails that future only; the pool serves on") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    try {
        run_bounded(loop, submit_lying(&pool));
        FAIL("no exception");
    } catch (const coproc::worker_died&) {
        FAIL("the future must fail for its undecodable result, not for the worker's end");
    } catch (const coproc::error& e) {
        const std::string what = e.what();
        CHECK(what.find("could not be decoded") != std::string::npos);
        CHECK(what.find("claims 1099511627776 elements, more than the 0 bytes left") != std::string::npos);
    }
    // The worker then sends its real result for a task the parent no longer
    // holds, and is killed for it; a new one serves the next task.
    run_bounded(loop, until_no_worker(&loop, &pool));
    CHECK(run_bounded(loop, submit_square(&pool, 9)) == 81);
}

// Shared buffers: coproc::shared_buffer travels as a descriptor (a memfd,
// SCM_RIGHTS) and a size, as an argument and as a result: neither side
// copies its bytes, both map the same pages. Lifetimes, crashes, retries,
// cancellation and descriptor leaks on both sides.
#include "remote_functions.hpp"
#include "support.hpp"

#include <coproc/shared_buffer.hpp>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

using coproc::shared_buffer;
using coproc::task;
using namespace std::chrono_literals;
using namespace test_support;
using namespace pool_test;

namespace {

shared_buffer filled(std::size_t size, int seed) {
    shared_buffer buffer{size};
    const std::string bytes = pattern(size, seed);
    std::memcpy(buffer.data(), bytes.data(), size);
    return buffer;
}

std::uint64_t byte_sum(const shared_buffer& buffer) {
    std::uint64_t sum = 0;
    for (const std::byte value : buffer.bytes()) sum += std::to_integer<std::uint8_t>(value);
    return sum;
}

// The number of descriptors the pool's worker has open.
task<std::size_t> worker_descriptors(coproc::process_pool* pool) {
    co_return (co_await pool->submit<open_descriptors>()).size();
}

task<std::vector<std::uint64_t>> sum_each(coproc::process_pool* pool, std::vector<shared_buffer> buffers) {
    co_return co_await pool->map<sum_shared>(std::move(buffers), {.chunksize = 2});
}

task<void> first_item(coproc::stream<shared_buffer>* items) { (void)co_await items->next(); }

} // namespace

TEST_CASE("a shared buffer argument is the parent's memory in the worker: what the task writes, the parent reads") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    constexpr std::size_t size = 4 << 20;
    shared_buffer data = filled(size, 3);
    const std::uint64_t before = byte_sum(data);
    CHECK(run_bounded(loop, await_future(pool.submit<sum_shared>(data))) == before);
    const std::string expected = pattern(size, 3);
    run_bounded(loop, await_future(pool.submit<increment_shared>(data)));
    bool all_incremented = true;
    for (std::size_t i = 0; i < size; ++i) {
        all_incremented = all_incremented && std::to_integer<std::uint8_t>(data.bytes()[i]) ==
                                                 static_cast<std::uint8_t>(static_cast<std::uint8_t>(expected[i]) + 1);
    }
    CHECK(all_incremented);
}

TEST_CASE("a buffer reused across tasks keeps its pages: each task sees the last one's writes") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    shared_buffer data{1 << 20};
    for (int round = 0; round < 5; ++round) run_bounded(loop, await_future(pool.submit<increment_shared>(data)));
    CHECK(std::to_integer<int>(data.bytes()[0]) == 5);
    CHECK(std::to_integer<int>(data.bytes()[(1 << 20) - 1]) == 5);
}

TEST_CASE("a task writes its output into a buffer the parent passed: no copy either way") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    constexpr std::size_t size = 1 << 20;
    shared_buffer in = filled(size, 7);
    shared_buffer out{size};
    run_bounded(loop, await_future(pool.submit<invert_shared>(in, out)));
    bool inverted = true;
    for (std::size_t i = 0; i < size; ++i) inverted = inverted && out.bytes()[i] == ~in.bytes()[i];
    CHECK(inverted);
}

TEST_CASE("a buffer the worker creates reaches the parent as its result, intact, and stays valid after the worker is gone") {
    shared_buffer kept;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1}};
        constexpr std::size_t size = 8 << 20;
        kept = run_bounded(loop, await_future(pool.submit<make_shared_pattern>(size, 11)));
        REQUIRE(kept.size() == size);
    }
    const std::string expected = pattern(8 << 20, 11);
    CHECK(std::memcmp(kept.data(), expected.data(), expected.size()) == 0);
}

TEST_CASE("one buffer twice in one call is one mapping in the worker; empty buffers travel as empty") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    shared_buffer data{4096};
    CHECK(run_bounded(loop, await_future(pool.submit<same_shared>(data, data))));
    CHECK_FALSE(run_bounded(loop, await_future(pool.submit<same_shared>(data, shared_buffer{4096}))));
    CHECK(run_bounded(loop, await_future(pool.submit<sum_shared>(shared_buffer{}))) == 0);
    CHECK(run_bounded(loop, await_future(pool.submit<make_shared_pattern>(0, 1))).empty());
}

TEST_CASE("many buffers: a vector of them in arguments and in a result, and map over buffers") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    shared_buffer whole = filled(100 * 4096, 5);
    const std::vector<shared_buffer> slices = run_bounded(loop, await_future(pool.submit<split_shared>(whole, 100)));
    REQUIRE(slices.size() == 100);
    bool intact = true;
    for (std::size_t i = 0; i < slices.size(); ++i) {
        intact = intact && slices[i].size() == 4096 && std::memcmp(slices[i].data(), whole.data() + i * 4096, 4096) == 0;
    }
    CHECK(intact);
    CHECK(run_bounded(loop, await_future(pool.submit<measure_shared>(slices))) == 100 * 4096 * 1000 + 100);
    std::vector<shared_buffer> some(slices.begin(), slices.begin() + 7);
    std::vector<std::uint64_t> expected;
    for (const auto& slice : some) expected.push_back(byte_sum(slice));
    CHECK(run_bounded(loop, sum_each(&pool, some)) == expected);
}

TEST_CASE("253 buffers fit in one call; 254 fail the submit with length_error, before any worker is involved") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    std::vector<shared_buffer> buffers;
    for (int i = 0; i < 254; ++i) buffers.emplace_back(64);
    std::vector<shared_buffer> most(buffers.begin(), buffers.begin() + 253);
    CHECK(run_bounded(loop, await_future(pool.submit<measure_shared>(most))) == 253 * 64 * 1000 + 253);
    CHECK_THROWS_AS(run_bounded(loop, await_future(pool.submit<measure_shared>(buffers))), std::length_error);
}

TEST_CASE("a worker that dies holding a buffer: the task fails, the parent's buffer keeps what it wrote, nothing leaks") {
    const int descriptors_before = count_open_fds();
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1}};
        shared_buffer data{4096};
        CHECK_THROWS_AS(run_bounded(loop, await_future(pool.submit<crash_with_shared>(data))), coproc::worker_died);
        CHECK(data.bytes()[0] == std::byte{0xee}); // shared memory: the write landed before the crash
        CHECK(run_bounded(loop, await_future(pool.submit<sum_shared>(data))) == 0xee);
    }
    CHECK(count_open_fds() == descriptors_before);
}

TEST_CASE("a task with a buffer runs again on a fresh worker after a crash (max_retries), with the same buffer") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    marker_file crashed{"shared-crash-once"};
    shared_buffer data = filled(65536, 2);
    auto pending = pool.submit_with<crash_once_with_shared>({.max_retries = 1}, crashed.path(), data);
    CHECK(run_bounded(loop, await_future(std::move(pending))) == byte_sum(data));
    CHECK(crashed.exists());
}

TEST_CASE("a buffer passed again stays mapped in the worker for keep_result_memory, then is let go") {
    coproc::event_loop loop;
    // Kept for 2 s after each use: the round trips below fit in that on a
    // loaded machine under a sanitizer.
    coproc::process_pool pool{loop, {.max_workers = 1, .keep_result_memory = std::chrono::seconds{2}}};
    const std::size_t worker_before = run_bounded(loop, worker_descriptors(&pool));
    {
        shared_buffer data = filled(1 << 20, 5);
        data.bytes()[0] = std::byte{0x11};
        const auto first = run_bounded(loop, await_future(pool.submit<shared_address>(data)));
        CHECK(first.second == 0x11);
        // The parent writes between the tasks: the kept mapping sees it.
        data.bytes()[0] = std::byte{0x7f};
        const auto second = run_bounded(loop, await_future(pool.submit<shared_address>(data)));
        CHECK(second.second == 0x7f);
        CHECK(first.first == second.first); // one mapping, at one address
        // Kept: its memfd is one more descriptor in the worker, after the task.
        CHECK(run_bounded(loop, worker_descriptors(&pool)) == worker_before + 1);
    }
    // Unused for keep_result_memory, the mapping goes, even with the parent's
    // buffer gone and the worker idle.
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    std::size_t now = 0;
    while ((now = run_bounded(loop, worker_descriptors(&pool))) != worker_before &&
           std::chrono::steady_clock::now() < deadline) {
        run_bounded(loop, pause_for(&loop, std::chrono::milliseconds{50}));
    }
    CHECK(now == worker_before);
}

TEST_CASE("cancelling a task that holds a buffer; no descriptor stays open in the worker or the parent") {
    const int descriptors_before = count_open_fds();
    {
        coproc::event_loop loop;
        // keep_result_memory 0: the worker keeps no mapping of a buffer it
        // received past its task (the next case checks that it does, and
        // for how long, with the default).
        coproc::process_pool pool{loop, {.max_workers = 1, .keep_result_memory = std::chrono::milliseconds{0}}};
        const std::size_t worker_before = run_bounded(loop, worker_descriptors(&pool));
        shared_buffer data{4096};
        auto pending = pool.submit<wait_with_shared>(data);
        run_bounded(loop, until_running(&loop, &pending));
        CHECK(pending.cancel());
        CHECK_THROWS_AS(run_bounded(loop, await_future(std::move(pending))), coproc::cancelled_error);
        for (int i = 0; i < 20; ++i) {
            run_bounded(loop, await_future(pool.submit<increment_shared>(data)));
            (void)run_bounded(loop, await_future(pool.submit<make_shared_pattern>(4096, i)));
        }
        CHECK(run_bounded(loop, worker_descriptors(&pool)) == worker_before);
    }
    CHECK(count_open_fds() == descriptors_before);
}

TEST_CASE("a shared buffer does not travel as a stream item: the push throws logic_error, which ends the task") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    auto items = pool.submit_stream<push_shared>();
    CHECK_THROWS_AS(run_bounded(loop, first_item(&items)), std::logic_error);
}

TEST_CASE("a RESULT that claims a descriptor it did not send is a protocol violation") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    try {
        run_bounded(loop, await_future(pool.submit<send_result_claiming_descriptor>(std::uint64_t{1})));
        FAIL("the task should have failed");
    } catch (const coproc::worker_died& e) {
        CHECK(std::string(e.what()).find("descriptors, more than it sent") != std::string::npos);
    }
}

TEST_CASE("as<T> views the bytes as numbers, and refuses a size that is not a whole number of them") {
    shared_buffer numbers{16};
    auto view = numbers.as<std::uint32_t>();
    REQUIRE(view.size() == 4);
    view[3] = 7;
    CHECK(std::to_integer<int>(numbers.bytes()[12]) + std::to_integer<int>(numbers.bytes()[15]) == 7);
    CHECK_THROWS_AS((void)shared_buffer{10}.as<std::uint32_t>(), std::invalid_argument);
    const shared_buffer copy = numbers;
    CHECK(copy == numbers);
    CHECK_FALSE(shared_buffer{16} == numbers);
}

TEST_CASE("a shared buffer serialized outside a task's arguments or result is refused") {
    coproc::detail::byte_buffer out;
    CHECK_THROWS_AS(coproc::detail::encode_into(out, shared_buffer{64}), std::logic_error);
}

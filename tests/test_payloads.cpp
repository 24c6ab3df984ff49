// Large payloads: the byte buffers frames are built in, large arguments and
// results through the pool (shared with the outbox rather than copied,
// received into huge-page buffers), and the huge-page tunable the pool gives
// its workers.
#include "remote_functions.hpp"
#include "support.hpp"

#include <coproc/detail/byte_buffer.hpp>

#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

using coproc::future;
using coproc::task;
using coproc::detail::byte_buffer;
using namespace test_support;
using namespace pool_test;

#if defined(__SANITIZE_ADDRESS__)
#define COPROC_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define COPROC_TEST_ASAN 1
#endif
#endif

namespace {

// Waits until `count` tasks are dispatched to or running in a worker.
task<void> until_in_workers(coproc::event_loop* loop, coproc::process_pool* pool, std::size_t count) {
    while (pool->stats().tasks_running < count) co_await loop->sleep_for(std::chrono::milliseconds{1});
}

byte_buffer counting_bytes(std::size_t size) {
    byte_buffer buffer(size);
    for (std::size_t i = 0; i < size; ++i) buffer[i] = static_cast<std::byte>(i * 7 + i / 4096);
    return buffer;
}

bool holds_counting_bytes(const byte_buffer& buffer, std::size_t size) {
    if (buffer.size() != size) return false;
    for (std::size_t i = 0; i < size; ++i) {
        if (buffer[i] != static_cast<std::byte>(i * 7 + i / 4096)) return false;
    }
    return true;
}

// Sets (or unsets, with nullopt) an environment variable for one scope.
class scoped_environment {
public:
    scoped_environment(const char* name, std::optional<std::string> value) : name_(name) {
        if (const char* old = std::getenv(name)) old_ = old;
        if (value) {
            ::setenv(name, value->c_str(), 1);
        } else {
            ::unsetenv(name);
        }
    }
    ~scoped_environment() {
        if (old_) {
            ::setenv(name_, old_->c_str(), 1);
        } else {
            ::unsetenv(name_);
        }
    }
    scoped_environment(const scoped_environment&) = delete;
    scoped_environment& operator=(const scoped_environment&) = delete;

private:
    const char* name_;
    std::optional<std::string> old_;
};

std::string worker_tunables(coproc::process_pool_options options) {
    coproc::event_loop loop;
    options.max_workers = 1;
    coproc::process_pool pool{loop, std::move(options)};
    return run_bounded(loop, await_future(pool.submit<environment_variable>("GLIBC_TUNABLES")));
}

} // namespace

TEST_CASE("byte_buffer: appends, copies, moves and shrinks, below and above the huge-block size") {
    constexpr std::size_t small = 1000;
    constexpr std::size_t large = byte_buffer::huge_block + 12'345;

    byte_buffer buffer;
    CHECK(buffer.empty());
    const byte_buffer pattern = counting_bytes(large);
    buffer.append(pattern.data(), small); // small block
    buffer.append(pattern.data() + small, large - small); // grows into a mapping
    CHECK(holds_counting_bytes(buffer, large));
    CHECK(reinterpret_cast<std::uintptr_t>(buffer.data()) % 4096 == 0); // a mapping of its own

    buffer.resize(3 * large); // a mapping grows by mremap: the bytes stay
    buffer.resize(large);
    CHECK(holds_counting_bytes(buffer, large));

    byte_buffer copy{buffer};
    CHECK(holds_counting_bytes(copy, large));
    CHECK(copy.data() != buffer.data());
    byte_buffer moved{std::move(copy)};
    CHECK(copy.empty()); // NOLINT(bugprone-use-after-move): moved-from is empty
    CHECK(holds_counting_bytes(moved, large));

    moved.resize(small);
    moved.shrink_to(4096);
    CHECK(moved.capacity() == 4096);
    CHECK(std::equal(moved.begin(), moved.end(), pattern.begin()));

    const std::size_t capacity = moved.capacity();
    moved.clear();
    CHECK(moved.empty());
    CHECK(moved.capacity() == capacity);
    moved.push_back(std::byte{42});
    CHECK(moved.size() == 1);
    CHECK(moved[0] == std::byte{42});

    byte_buffer assigned;
    assigned = pattern;
    CHECK(holds_counting_bytes(assigned, large));
    assigned = byte_buffer{};
    CHECK(assigned.empty());
}

TEST_CASE("byte_buffer: a huge block is advised for transparent huge pages") {
    const std::string mode = transparent_huge_page_mode();
    if (mode == "never" || mode == "unavailable") {
        MESSAGE("transparent huge pages are " << mode << " here: nothing to check");
        return;
    }
    byte_buffer buffer(byte_buffer::huge_block * 4);
    CHECK(huge_page_eligible(buffer.data()));
    buffer.resize(byte_buffer::huge_block * 9); // grown by mremap: still advised
    CHECK(huge_page_eligible(buffer.data() + byte_buffer::huge_block * 8));
}

TEST_CASE("a large argument and a large result travel intact") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1}};
    const std::string data = pattern((8u << 20) + 3, 1);
    const std::string back = run_bounded(loop, await_future(pool.submit<reverse_complement>(data)), 60s);
    CHECK(back.size() == data.size());
    CHECK(back == reverse_complement(data));
    // A large result of small arguments; then small tasks again.
    CHECK(run_bounded(loop, await_future(pool.submit<pattern>((5u << 20) + 1, 7)), 60s) == pattern((5u << 20) + 1, 7));
    CHECK(run_bounded(loop, await_future(pool.submit<square>(12))) == 144);
}

TEST_CASE("many large and small tasks queued at once on one worker all come back right") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 8, .max_prefetch = 8}};
    std::vector<future<std::string>> large;
    std::vector<future<int>> small;
    for (int i = 0; i < 8; ++i) {
        // Sizes on both sides of the sharing threshold (64 KiB) and of the
        // huge-block size (2 MiB).
        const std::size_t size = (i % 2 == 0) ? (3u << 20) + static_cast<std::size_t>(i) : (60u << 10) + static_cast<std::size_t>(i) * 4096;
        large.push_back(pool.submit<reverse_complement>(pattern(size, i)));
        small.push_back(pool.submit<square>(i));
    }
    const auto values = run_bounded(loop, await_all(std::move(large)), 60s);
    const auto squares = run_bounded(loop, await_all(std::move(small)));
    for (int i = 0; i < 8; ++i) {
        const std::size_t size = (i % 2 == 0) ? (3u << 20) + static_cast<std::size_t>(i) : (60u << 10) + static_cast<std::size_t>(i) * 4096;
        CHECK(values[static_cast<std::size_t>(i)] == reverse_complement(pattern(size, i)));
        CHECK(squares[static_cast<std::size_t>(i)] == i * i);
    }
}

TEST_CASE("a large task cancelled while its CALL is being sent leaves the stream and the next task intact") {
    coproc::event_loop loop;
    // A long grace: should the task already run when cancelled (slow
    // builds), the worker finishes it rather than being killed, so that a
    // second worker can only mean a broken stream.
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = std::chrono::milliseconds{60'000}}};
    CHECK(run_bounded(loop, await_future(pool.submit<square>(3))) == 9); // the worker is ready
    auto doomed = pool.submit<reverse_complement>(pattern(32u << 20, 5));
    run_bounded(loop, until_in_workers(&loop, &pool, 1));
    CHECK(doomed.cancel());
    CHECK_THROWS_AS(run_bounded(loop, await_future(std::move(doomed))), coproc::cancelled_error);
    const std::string data = pattern((4u << 20) + 9, 6);
    CHECK(run_bounded(loop, await_future(pool.submit<reverse_complement>(data)), 60s) == reverse_complement(data));
    CHECK(pool.stats().workers_started == 1); // nothing was killed: the frames stayed in step
}

TEST_CASE("a large task sent to a worker that died before starting it is requeued with its arguments intact") {
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .prefetch = 2, .max_prefetch = 2}};
    auto blocker = pool.submit<busy_forever>();
    const std::string data = pattern((6u << 20) + 1, 8);
    auto large = pool.submit<reverse_complement>(data);
    run_bounded(loop, until_running(&loop, &blocker));
    run_bounded(loop, until_in_workers(&loop, &pool, 2)); // the large one is in the same worker, not started
    pool.kill_workers();
    CHECK(run_bounded(loop, await_future(std::move(large)), 60s) == reverse_complement(data));
    CHECK(pool.stats().workers_started == 2);
}

TEST_CASE("huge_pages: workers' GLIBC_TUNABLES gets glibc.malloc.hugetlb=1 unless that tunable is set") {
    {
        scoped_environment unset{"GLIBC_TUNABLES", std::nullopt};
        CHECK(worker_tunables({}) == "glibc.malloc.hugetlb=1");
        CHECK(worker_tunables({.huge_pages = false}) == "<unset>");
    }
    {
        scoped_environment other{"GLIBC_TUNABLES", "glibc.malloc.arena_max=2"};
        CHECK(worker_tunables({}) == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1");
        CHECK(worker_tunables({.huge_pages = false}) == "glibc.malloc.arena_max=2");
    }
    {
        scoped_environment chosen{"GLIBC_TUNABLES", "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"};
        CHECK(worker_tunables({}) == "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2");
    }
    // The pool's own environment option is honoured the same way.
    scoped_environment unset{"GLIBC_TUNABLES", std::nullopt};
    CHECK(worker_tunables({.environment = {{"GLIBC_TUNABLES", "glibc.malloc.hugetlb=0"}}}) == "glibc.malloc.hugetlb=0");
}

TEST_CASE("huge_pages: a large malloc block in a worker may be backed by huge pages, and not without the option") {
#ifdef COPROC_TEST_ASAN
    MESSAGE("AddressSanitizer replaces malloc: glibc's tunable does not apply");
    return;
#endif
    const std::string mode = transparent_huge_page_mode();
    if (mode != "madvise") {
        MESSAGE("transparent huge pages are '" << mode << "' here, not 'madvise': the option makes no difference to check");
        return;
    }
    scoped_environment unset{"GLIBC_TUNABLES", std::nullopt};
    coproc::event_loop loop;
    coproc::process_pool with{loop, {.max_workers = 1}};
    coproc::process_pool without{loop, {.max_workers = 1, .huge_pages = false}};
    constexpr std::size_t size = 16u << 20;
    CHECK(run_bounded(loop, await_future(with.submit<malloc_block_huge_page_eligible>(size))));
    CHECK_FALSE(run_bounded(loop, await_future(without.submit<malloc_block_huge_page_eligible>(size))));
}

// coproc/asio.hpp: async_submit, async_map, async_next and async_shutdown with every
// completion token of Asio 1.22, per-operation cancellation in every task
// state, executors and work, lifetimes, and the loop driven by an
// io_context on one thread.
#include "remote_functions.hpp"
#include "support.hpp"

#include <coproc/asio.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/experimental/parallel_group.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using test_support::marker_file;

namespace asio_test {

// Creates `started` when it begins, then waits up to `milliseconds` for its
// stop token; creates `stopped` and returns -1 when it saw the stop,
// otherwise returns `milliseconds`.
int wait_for_stop(std::string started, std::string stopped, int milliseconds, std::stop_token token) {
    std::ofstream{started} << "started\n";
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds{milliseconds};
    while (std::chrono::steady_clock::now() < deadline) {
        if (token.stop_requested()) {
            std::ofstream{stopped} << "stopped\n";
            return -1;
        }
        std::this_thread::sleep_for(1ms);
    }
    return milliseconds;
}

// Creates `started`, then spins, ignoring every request to stop.
int spin_after_start(std::string started) {
    std::ofstream{started} << "started\n";
    volatile unsigned long spin = 0;
    for (;;) spin = spin + 1;
}

} // namespace asio_test

namespace {

coproc::task<void> park(coproc::event_loop* loop) {
    for (;;) co_await loop->sleep_for(1h);
}

// A loop and its pool on a thread of their own: made here, run on that
// thread from start() until stop(), and destroyed there, pool first (a loop
// must be destroyed on the thread that ran it).
class loop_thread {
public:
    explicit loop_thread(coproc::process_pool_options options = {}) {
        loop_.emplace();
        pool_.emplace(*loop_, std::move(options));
    }
    loop_thread(const loop_thread&) = delete;
    ~loop_thread() {
        stop();
        pool_.reset();
        loop_.reset();
    }
    void start() {
        thread_ = std::thread([this] {
            try {
                loop_->run(park(&*loop_), stop_.get_token());
            } catch (const coproc::cancelled_error&) {
                // stop() ended it.
            }
            pool_.reset();
            loop_.reset();
        });
    }
    void stop() {
        if (!thread_.joinable()) return;
        stop_.request_stop();
        thread_.join();
    }
    coproc::event_loop& loop() { return *loop_; }
    coproc::process_pool& pool() { return *pool_; }
    // Destroys the pool on the running loop's thread.
    void destroy_pool_on_loop() {
        std::promise<void> gone;
        loop_->post([&] {
            pool_.reset();
            gone.set_value();
        });
        REQUIRE(gone.get_future().wait_for(10s) == std::future_status::ready);
    }

private:
    std::optional<coproc::event_loop> loop_;
    std::optional<coproc::process_pool> pool_;
    std::stop_source stop_;
    std::thread thread_;
};

// Where the loop runs: on a thread of its own, or on the io_context's
// thread, driven by an asio_driver.
enum class mode { own_thread, one_thread };
constexpr std::array both_modes{mode::own_thread, mode::one_thread};
const char* mode_name(mode kind) { return kind == mode::own_thread ? "loop on its own thread" : "one thread (asio_driver)"; }

// An io_context, a loop and its pool, in either mode. start() starts the
// loop's thread, or makes the driver.
struct bridge {
    explicit bridge(mode how, coproc::process_pool_options options = {}, bool start_now = true) : kind(how) {
        if (kind == mode::own_thread) {
            thread.emplace(std::move(options));
        } else {
            loop.emplace(coproc::driven_loop_options);
            own_pool.emplace(*loop, std::move(options));
        }
        if (start_now) start();
    }
    void start() {
        if (kind == mode::own_thread) thread->start();
        else driver.emplace(io, *loop);
    }
    coproc::process_pool& pool() { return kind == mode::own_thread ? thread->pool() : *own_pool; }

    // Waits until `ready()`, running the io_context meanwhile (handlers
    // run, and in one-thread mode the loop is driven).
    template <class Predicate>
    bool wait_until(Predicate ready, std::chrono::steady_clock::duration limit = 10s) {
        const auto deadline = std::chrono::steady_clock::now() + limit;
        while (!ready()) {
            if (std::chrono::steady_clock::now() > deadline) return false;
            io.restart();
            if (io.run_for(2ms) == 0 && io.stopped()) std::this_thread::sleep_for(1ms);
        }
        return true;
    }
    void pause(std::chrono::milliseconds duration) {
        const auto until = std::chrono::steady_clock::now() + duration;
        wait_until([&] { return std::chrono::steady_clock::now() >= until; });
    }

    mode kind;
    asio::io_context io;
    std::optional<loop_thread> thread;
    std::optional<coproc::event_loop> loop;
    std::optional<coproc::process_pool> own_pool;
    std::optional<coproc::asio_driver> driver; // destroyed first, then the pool, then the loop
};

// Runs `io` until it has no more work; fails instead of hanging.
void run_io(asio::io_context& io, std::chrono::steady_clock::duration limit = 20s) {
    io.restart();
    io.run_for(limit);
    REQUIRE_MESSAGE(io.stopped(), "io_context::run() still had work after the time limit");
}

template <class Predicate>
bool wait_until(Predicate ready, std::chrono::steady_clock::duration limit = 10s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!ready()) {
        if (std::chrono::steady_clock::now() > deadline) return false;
        std::this_thread::sleep_for(2ms);
    }
    return true;
}

bool is_aborted(const std::exception_ptr& error) {
    if (!error) return false;
    try {
        std::rethrow_exception(error);
    } catch (const std::system_error& e) {
        return e.code() == asio::error::operation_aborted;
    } catch (...) {
        return false;
    }
}

template <class E>
bool is_a(const std::exception_ptr& error) {
    if (!error) return false;
    try {
        std::rethrow_exception(error);
    } catch (const E&) {
        return true;
    } catch (...) {
        return false;
    }
}

// What one handler saw.
struct outcome {
    int calls = 0;
    std::exception_ptr error;
    int value = 0;
    bool on_io_thread = false;
    bool slot_cleared = true;
};

// A move-only callback bound to `io` and, when given, to a cancellation slot.
struct recorder {
    outcome* seen;
    asio::io_context* io;
    asio::cancellation_signal* signal = nullptr;
    std::unique_ptr<int> move_only = std::make_unique<int>(0);
    template <class... Value> // int, or nothing for a function returning void
    void operator()(std::exception_ptr error, Value... value) {
        ++seen->calls;
        seen->error = std::move(error);
        if constexpr (sizeof...(Value) == 1) seen->value = (value, ...);
        seen->on_io_thread = io->get_executor().running_in_this_thread();
        if (signal != nullptr) seen->slot_cleared = !signal->slot().has_handler();
    }
};

auto record_on(asio::io_context& io, outcome& seen) { return asio::bind_executor(io, recorder{&seen, &io}); }
auto record_on(asio::io_context& io, outcome& seen, asio::cancellation_signal& signal) {
    return asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(io, recorder{&seen, &io, &signal}));
}

const char* type_name(asio::cancellation_type type) {
    switch (type) {
    case asio::cancellation_type::terminal: return "terminal";
    case asio::cancellation_type::partial: return "partial";
    case asio::cancellation_type::total: return "total";
    default: return "other";
    }
}

constexpr std::array all_types{asio::cancellation_type::terminal, asio::cancellation_type::partial,
                               asio::cancellation_type::total};

// --- coroutines for the tokens (value parameters only: GCC 12)

asio::awaitable<void> square_then_fail(coproc::process_pool* pool, int* value, std::string* failure) {
    *value = co_await coproc::async_submit<pool_test::square>(*pool, 12, asio::use_awaitable);
    try {
        co_await coproc::async_submit<pool_test::fail_at>(*pool, 3, 3, asio::use_awaitable);
    } catch (const std::domain_error& e) {
        *failure = e.what();
    }
}

asio::awaitable<void> crash_in_coroutine(coproc::process_pool* pool, std::string* failure) {
    try {
        co_await coproc::async_submit<pool_test::crash_segfault>(*pool, asio::use_awaitable);
    } catch (const coproc::worker_died& e) {
        *failure = e.what();
    }
}

asio::awaitable<void> deferred_awaited(coproc::process_pool* pool, int* value) {
    auto later = coproc::async_submit<pool_test::square>(*pool, 4, asio::experimental::deferred);
    *value = co_await std::move(later)(asio::use_awaitable);
}

asio::awaitable<void> as_tuple_awaited(coproc::process_pool* pool, std::exception_ptr* error, int* value, int* good) {
    auto [failure, result] = co_await coproc::async_submit<pool_test::fail_at>(
        *pool, 4, 4, asio::experimental::as_tuple(asio::use_awaitable));
    *error = failure;
    *value = result;
    auto [none, square] = co_await coproc::async_submit<pool_test::square>(*pool, 3, asio::experimental::as_tuple(asio::use_awaitable));
    if (!none) *good = square;
}

struct group_result {
    std::size_t first = 99;
    std::exception_ptr slow_error;
    std::exception_ptr fast_error;
    int fast_value = 0;
};

asio::awaitable<void> first_of_group(coproc::process_pool* pool, group_result* out) {
    auto group = asio::experimental::make_parallel_group(
        coproc::async_submit<pool_test::sleep_then>(*pool, 10000, 1, asio::experimental::deferred),
        coproc::async_submit<pool_test::square>(*pool, 6, asio::experimental::deferred));
    auto [order, slow_error, slow_value, fast_error, fast_value] =
        co_await group.async_wait(asio::experimental::wait_for_one(), asio::use_awaitable);
    (void)slow_value;
    out->first = order[0];
    out->slow_error = slow_error;
    out->fast_error = fast_error;
    out->fast_value = fast_value;
}

asio::awaitable<void> submit_or_timer(coproc::process_pool* pool, std::size_t* index) {
    using namespace asio::experimental::awaitable_operators;
    asio::steady_timer timer{co_await asio::this_coro::executor, 200ms};
    auto slow = coproc::async_submit<pool_test::sleep_then>(*pool, 10000, 1, asio::use_awaitable);
    auto tick = timer.async_wait(asio::use_awaitable);
    auto winner = co_await (std::move(slow) || std::move(tick));
    *index = winner.index();
}

asio::awaitable<void> submit_and_timer(coproc::process_pool* pool, int* value) {
    using namespace asio::experimental::awaitable_operators;
    asio::steady_timer timer{co_await asio::this_coro::executor, 50ms};
    auto quick = coproc::async_submit<pool_test::square>(*pool, 8, asio::use_awaitable);
    auto tick = timer.async_wait(asio::use_awaitable);
    *value = co_await (std::move(quick) && std::move(tick));
}

} // namespace

// ---------------------------------------------------------------------------
// Tokens, each in both modes

TEST_CASE("async_submit with a move-only callback calls it once, on its executor, never inside the initiating call") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 2}};
        outcome seen;
        coproc::async_submit<pool_test::square>(b.pool(), 9, record_on(b.io, seen));
        CHECK(seen.calls == 0);
        run_io(b.io);
        CHECK(seen.calls == 1);
        CHECK_FALSE(seen.error);
        CHECK(seen.value == 81);
        CHECK(seen.on_io_thread);
    }
}

TEST_CASE("use_awaitable yields the value and rethrows the task's exception as its own type") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 2}};
        int value = 0;
        std::string failure;
        std::string crash;
        std::exception_ptr escaped;
        asio::co_spawn(b.io, square_then_fail(&b.pool(), &value, &failure), [&](std::exception_ptr e) { escaped = e; });
        asio::co_spawn(b.io, crash_in_coroutine(&b.pool(), &crash), [&](std::exception_ptr e) { escaped = e; });
        run_io(b.io);
        CHECK_FALSE(escaped);
        CHECK(value == 144);
        CHECK(failure == "bad input 3");
        CHECK(crash.find("crash_segfault") != std::string::npos);
    }
}

TEST_CASE("use_future delivers the value, and the exception through the std::future") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 2}};
        std::future<int> squared = coproc::async_submit<pool_test::square>(b.pool(), 5, asio::use_future);
        std::future<int> failed = coproc::async_submit<pool_test::fail_at>(b.pool(), 2, 2, asio::use_future);
        std::future<void> nothing = coproc::async_submit<pool_test::sleep_ms>(b.pool(), 1, asio::use_future);
        const auto ready = [](auto& f) { return f.wait_for(0s) == std::future_status::ready; };
        REQUIRE(b.wait_until([&] { return ready(squared) && ready(failed) && ready(nothing); }));
        CHECK(squared.get() == 25);
        CHECK_THROWS_AS(failed.get(), std::domain_error);
        CHECK_NOTHROW(nothing.get());
    }
}

TEST_CASE("experimental::deferred submits nothing until the deferred operation is started") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 2}};
        marker_file ran{"asio-deferred"};
        auto later = coproc::async_submit<pool_test::touch_file>(b.pool(), ran.path(), asio::experimental::deferred);
        b.pause(200ms);
        CHECK_FALSE(ran.exists());
        const auto stats = b.pool().stats();
        CHECK(stats.tasks_queued + stats.tasks_running + stats.tasks_completed == 0);
        int calls = 0;
        std::exception_ptr error;
        std::move(later)(asio::bind_executor(b.io, [&](std::exception_ptr e) {
            ++calls;
            error = e;
        }));
        int value = 0;
        asio::co_spawn(b.io, deferred_awaited(&b.pool(), &value), asio::detached);
        run_io(b.io);
        CHECK(calls == 1);
        CHECK_FALSE(error);
        CHECK(ran.exists());
        CHECK(value == 16);
    }
}

TEST_CASE("experimental::as_tuple hands the exception_ptr and the value over without throwing") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 2}};
        std::exception_ptr error;
        int value = -1;
        int good = 0;
        asio::co_spawn(b.io, as_tuple_awaited(&b.pool(), &error, &value, &good), asio::detached);
        run_io(b.io);
        CHECK(is_a<std::domain_error>(error));
        CHECK(value == 0);
        CHECK(good == 9);
    }
}

TEST_CASE("detached runs the task and drops its outcome") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 2}};
        marker_file ran{"asio-detached"};
        coproc::async_submit<pool_test::touch_file>(b.pool(), ran.path(), asio::detached);
        CHECK(b.wait_until([&] { return ran.exists() && b.pool().stats().tasks_completed == 1; }));
    }
}

TEST_CASE("parallel_group wait_for_one: the first task wins and the other is cancelled with operation_aborted") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 2, .cancel_grace = 100ms}};
        group_result result;
        asio::co_spawn(b.io, first_of_group(&b.pool(), &result), asio::detached);
        run_io(b.io);
        CHECK(result.first == 1);
        CHECK_FALSE(result.fast_error);
        CHECK(result.fast_value == 36);
        CHECK(is_aborted(result.slow_error));
        CHECK(b.pool().stats().tasks_cancelled == 1);
        if (how == mode::own_thread) {
            // The worker let go of it: dropped unrun, or (sleep_then ignores
            // its stop token) killed after cancel_grace.
            CHECK(b.wait_until([&] { return b.pool().stats().tasks_cancelling == 0; }));
        }
    }
}

TEST_CASE("awaitable operators: submit || timer cancels the task when the timer wins; submit && timer yields both") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 2, .cancel_grace = 100ms}};
        auto hold = how == mode::one_thread ? b.driver->keep_driving() : coproc::asio_driver::hold{};
        std::size_t index = 99;
        int value = 0;
        asio::co_spawn(b.io, submit_or_timer(&b.pool(), &index), asio::detached);
        asio::co_spawn(b.io, submit_and_timer(&b.pool(), &value), asio::detached);
        CHECK(b.wait_until([&] { return index != 99 && value != 0; }));
        CHECK(index == 1);
        CHECK(value == 64);
        CHECK(b.pool().stats().tasks_cancelled == 1);
        // With a hold, the loop is driven between operations too, so the
        // worker lets go of the task (dropped unrun, or killed after
        // cancel_grace) in one-thread mode as well.
        CHECK(b.wait_until([&] { return b.pool().stats().tasks_cancelling == 0; }));
    }
}

// ---------------------------------------------------------------------------
// Executors and work

TEST_CASE("a failure at the initiating call (queue_full, pool_closed) is posted, never delivered inside the call") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        // Nothing drives the loop yet, so the first task stays queued and
        // fills the queue.
        bridge b{how, {.max_workers = 1, .max_pending = 1}, false};
        outcome first;
        outcome refused;
        coproc::async_submit<pool_test::square>(b.pool(), 2, record_on(b.io, first));
        coproc::async_submit<pool_test::square>(b.pool(), 3, record_on(b.io, refused));
        CHECK(refused.calls == 0);
        b.start();
        run_io(b.io);
        CHECK(first.calls == 1);
        CHECK(first.value == 4);
        CHECK(refused.calls == 1);
        CHECK(refused.on_io_thread);
        CHECK(is_a<coproc::queue_full>(refused.error));

        std::exception_ptr shutdown_error = std::make_exception_ptr(std::runtime_error("not called"));
        coproc::async_shutdown(b.pool(), {}, asio::bind_executor(b.io, [&](std::exception_ptr e) { shutdown_error = e; }));
        run_io(b.io);
        CHECK_FALSE(shutdown_error);
        CHECK(b.pool().stats().workers_alive == 0);
        outcome closed;
        coproc::async_submit<pool_test::square>(b.pool(), 3, record_on(b.io, closed));
        CHECK(closed.calls == 0);
        run_io(b.io);
        CHECK(closed.calls == 1);
        CHECK(is_a<coproc::pool_closed>(closed.error));
    }
}

TEST_CASE("io_context::run() does not return while a task is outstanding") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 1}};
        outcome seen;
        coproc::async_submit<pool_test::sleep_then>(b.pool(), 300, 5, record_on(b.io, seen));
        run_io(b.io); // nothing else keeps it running
        CHECK(seen.calls == 1);
        CHECK(seen.value == 5);
    }
}

TEST_CASE("handlers bound to a strand run in that strand, one at a time, on an io_context run by two threads") {
    bridge b{mode::own_thread, {.max_workers = 2}};
    auto strand = asio::make_strand(b.io);
    int inside = 0;
    int overlaps = 0;
    int in_strand = 0;
    int done = 0;
    for (int i = 0; i < 16; ++i) {
        coproc::async_submit<pool_test::square>(b.pool(), i, asio::bind_executor(strand, [&](std::exception_ptr, int) {
            if (++inside != 1) ++overlaps;
            if (strand.running_in_this_thread()) ++in_strand;
            std::this_thread::sleep_for(1ms);
            --inside;
            ++done;
        }));
    }
    std::thread second([&] { b.io.run_for(20s); });
    b.io.run_for(20s);
    second.join();
    CHECK(done == 16);
    CHECK(in_strand == 16);
    CHECK(overlaps == 0);
}

// ---------------------------------------------------------------------------
// One thread: the driver

TEST_CASE("asio_driver: the loop runs on the io_context's thread, and run() returns once nothing is outstanding") {
    asio::io_context io;
    coproc::event_loop loop{coproc::driven_loop_options};
    coproc::process_pool pool{loop, {.max_workers = 1}};
    coproc::asio_driver driver{io, loop};
    // Nothing outstanding: the driver does not keep run() busy.
    run_io(io, 2s);
    std::thread::id loop_thread_id;
    loop.post([&] { loop_thread_id = std::this_thread::get_id(); });
    int value = 0;
    coproc::async_submit<pool_test::square>(pool, 6, asio::bind_executor(io, [&](std::exception_ptr, int v) { value = v; }));
    run_io(io);
    CHECK(value == 36);
    CHECK(loop_thread_id == std::this_thread::get_id());
    const auto started = std::chrono::steady_clock::now();
    run_io(io, 2s);
    CHECK(std::chrono::steady_clock::now() - started < 1s);
}

namespace {
coproc::task<void> tick_then_release(coproc::event_loop* loop, coproc::asio_driver::hold* hold, int* ticks) {
    for (int i = 0; i < 3; ++i) {
        co_await loop->sleep_for(20ms);
        ++*ticks;
    }
    hold->release();
}
} // namespace

TEST_CASE("asio_driver: a hold keeps the loop driven without operations until it is released") {
    asio::io_context io;
    coproc::event_loop loop{coproc::driven_loop_options};
    coproc::asio_driver driver{io, loop};
    auto hold = driver.keep_driving();
    int ticks = 0;
    loop.spawn(tick_then_release(&loop, &hold, &ticks));
    run_io(io, 5s);
    CHECK(ticks == 3);
    CHECK_FALSE(hold.owns());
}

TEST_CASE("asio_driver: one driver per loop") {
    asio::io_context io;
    coproc::event_loop loop{coproc::driven_loop_options};
    coproc::asio_driver driver{io, loop};
    CHECK_THROWS_AS(coproc::asio_driver(io, loop), std::logic_error);
}

// ---------------------------------------------------------------------------
// Per-operation cancellation, in every task state, in both modes

TEST_CASE("cancelling a pending task removes it for every cancellation type: it never runs") {
    for (const auto how : both_modes) {
        for (const auto type : all_types) {
            const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
            const std::string type_text = type_name(type);
            CAPTURE(type_text);
            bridge b{how, {.max_workers = 1, .prefetch = 1, .max_prefetch = 1}};
            marker_file started{"asio-pending-started"};
            marker_file stopped{"asio-pending-stopped"};
            marker_file ran{"asio-pending-ran"};
            asio::cancellation_signal blocker_signal;
            asio::cancellation_signal pending_signal;
            outcome blocker;
            outcome pending;
            coproc::async_submit<asio_test::wait_for_stop>(b.pool(), started.path(), stopped.path(), 10000,
                                                           record_on(b.io, blocker, blocker_signal));
            REQUIRE(b.wait_until([&] { return started.exists(); }));
            coproc::async_submit<pool_test::touch_file>(b.pool(), ran.path(), record_on(b.io, pending, pending_signal));
            REQUIRE(b.wait_until([&] { return b.pool().stats().tasks_queued == 1; }));
            pending_signal.emit(type);
            blocker_signal.emit(asio::cancellation_type::terminal);
            run_io(b.io);
            CHECK(pending.calls == 1);
            CHECK(is_aborted(pending.error));
            CHECK(pending.slot_cleared);
            CHECK(blocker.calls == 1);
            CHECK(is_aborted(blocker.error));
            // The worker is free again; the removed task never reaches it.
            b.pause(100ms);
            CHECK_FALSE(ran.exists());
            CHECK(b.pool().stats().tasks_cancelled == 2);
        }
    }
}

TEST_CASE("cancelling a running task: partial and terminal stop its token; total lets it run to its result") {
    for (const auto how : both_modes) {
        for (const auto type : all_types) {
            const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
            const std::string type_text = type_name(type);
            CAPTURE(type_text);
            bridge b{how, {.max_workers = 1, .cancel_grace = 5000ms}};
            marker_file started{"asio-running-started"};
            marker_file stopped{"asio-running-stopped"};
            asio::cancellation_signal signal;
            outcome seen;
            coproc::async_submit<asio_test::wait_for_stop>(b.pool(), started.path(), stopped.path(), 3000,
                                                           record_on(b.io, seen, signal));
            REQUIRE(b.wait_until([&] { return started.exists(); }));
            // The worker sent START before it ran the function; give the
            // parent time to read it (slow under sanitizers), so that the
            // task is running there, not merely dispatched.
            b.pause(1000ms);
            const auto cancelled_at = std::chrono::steady_clock::now();
            signal.emit(type);
            run_io(b.io);
            CHECK(seen.calls == 1);
            CHECK(seen.slot_cleared);
            if (type == asio::cancellation_type::total) {
                CHECK_FALSE(seen.error);
                CHECK(seen.value == 3000);
                CHECK_FALSE(stopped.exists());
                CHECK(b.pool().stats().tasks_cancelled == 0);
            } else {
                CHECK(is_aborted(seen.error));
                CHECK(std::chrono::steady_clock::now() - cancelled_at < 500ms);
                auto hold = how == mode::one_thread ? b.driver->keep_driving() : coproc::asio_driver::hold{};
                CHECK(b.wait_until([&] { return stopped.exists() && b.pool().stats().tasks_cancelling == 0; }));
                CHECK(b.pool().stats().tasks_cancelled == 1);
                CHECK(b.pool().stats().workers_killed_for_cancel == 0); // it stopped within cancel_grace
            }
        }
    }
}

TEST_CASE("terminal cancellation of a running task that ignores its stop token kills its worker after cancel_grace") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 1, .cancel_grace = 200ms}};
        auto hold = how == mode::one_thread ? b.driver->keep_driving() : coproc::asio_driver::hold{};
        marker_file started{"asio-spinning"};
        asio::cancellation_signal signal;
        outcome seen;
        coproc::async_submit<asio_test::spin_after_start>(b.pool(), started.path(), record_on(b.io, seen, signal));
        REQUIRE(b.wait_until([&] { return started.exists(); }));
        b.pause(300ms);
        signal.emit(asio::cancellation_type::terminal);
        REQUIRE(b.wait_until([&] { return seen.calls == 1; }));
        CHECK(is_aborted(seen.error));
        CHECK(b.wait_until([&] { return b.pool().stats().workers_killed_for_cancel == 1; }));
        // And the pool serves on.
        outcome after;
        coproc::async_submit<pool_test::square>(b.pool(), 7, record_on(b.io, after));
        CHECK(b.wait_until([&] { return after.calls == 1; }));
        CHECK(after.value == 49);
    }
}

TEST_CASE("partial cancellation of a running task that ignores its stop token never kills its worker") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 1, .cancel_grace = 100ms}};
        auto hold = how == mode::one_thread ? b.driver->keep_driving() : coproc::asio_driver::hold{};
        marker_file started{"asio-spinning-partial"};
        asio::cancellation_signal signal;
        outcome seen;
        coproc::async_submit<asio_test::spin_after_start>(b.pool(), started.path(), record_on(b.io, seen, signal));
        REQUIRE(b.wait_until([&] { return started.exists(); }));
        b.pause(300ms);
        signal.emit(asio::cancellation_type::partial);
        REQUIRE(b.wait_until([&] { return seen.calls == 1; }));
        CHECK(is_aborted(seen.error));
        b.pause(600ms); // six grace periods
        CHECK(b.pool().stats().workers_killed_for_cancel == 0);
        CHECK(b.pool().stats().tasks_cancelling == 1);
    }
}

TEST_CASE("cancelling a finished task does nothing: the handler gets the result") {
    for (const auto how : both_modes) {
        for (const auto type : all_types) {
            const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
            const std::string type_text = type_name(type);
            CAPTURE(type_text);
            bridge b{how, {.max_workers = 1}};
            // The handler's own io_context, not run until the task has
            // finished and its handler was posted there.
            asio::io_context handlers;
            asio::cancellation_signal signal;
            outcome seen;
            coproc::async_submit<pool_test::square>(b.pool(), 11, record_on(handlers, seen, signal));
            auto hold = how == mode::one_thread ? b.driver->keep_driving() : coproc::asio_driver::hold{};
            REQUIRE(b.wait_until([&] { return b.pool().stats().tasks_completed == 1; }));
            b.pause(50ms);
            signal.emit(type);
            run_io(handlers);
            CHECK(seen.calls == 1);
            CHECK_FALSE(seen.error);
            CHECK(seen.value == 121);
            CHECK(seen.slot_cleared);
            CHECK(b.pool().stats().tasks_cancelled == 0);
        }
    }
}

// ---------------------------------------------------------------------------
// async_map and async_shutdown

namespace {

asio::awaitable<void> map_squares(coproc::process_pool* pool, std::vector<int>* out, std::string* failure) {
    std::vector<int> inputs{1, 2, 3, 4, 5, 6, 7};
    *out = co_await coproc::async_map<pool_test::square>(*pool, inputs, {.chunksize = 3}, asio::use_awaitable);
    std::vector<std::tuple<int, int>> pairs{{1, 9}, {2, 2}, {3, 3}};
    try {
        co_await coproc::async_map<pool_test::fail_at>(*pool, pairs, {}, asio::use_awaitable);
    } catch (const std::domain_error& e) {
        *failure = e.what();
    }
}

asio::awaitable<void> map_or_timer(coproc::process_pool* pool, std::size_t* index) {
    using namespace asio::experimental::awaitable_operators;
    asio::steady_timer timer{co_await asio::this_coro::executor, 200ms};
    std::vector<std::tuple<int, int>> inputs{{10000, 1}, {10000, 2}, {10000, 3}, {10000, 4}};
    auto slow = coproc::async_map<pool_test::sleep_then>(*pool, inputs, {}, asio::use_awaitable);
    auto tick = timer.async_wait(asio::use_awaitable);
    auto winner = co_await (std::move(slow) || std::move(tick));
    *index = winner.index();
}

asio::awaitable<void> stream_items(coproc::process_pool* pool, std::vector<int>* out, std::vector<int>* before_crash,
                                   std::string* crash) {
    auto items = pool->submit_stream<pool_test::count_up>(40);
    while (std::optional<int> value = co_await coproc::async_next(*pool, items, asio::use_awaitable)) out->push_back(*value);
    auto crashing = pool->submit_stream<pool_test::push_then_crash>(2);
    try {
        while (std::optional<int> value = co_await coproc::async_next(*pool, crashing, asio::use_awaitable)) {
            before_crash->push_back(*value);
        }
    } catch (const coproc::worker_died& e) {
        *crash = e.what();
    }
}

asio::awaitable<void> stream_or_timer(coproc::process_pool* pool, std::string marker, std::size_t* index) {
    using namespace asio::experimental::awaitable_operators;
    auto items = pool->submit_stream<pool_test::push_then_wait>(1, marker);
    const std::optional<int> first = co_await coproc::async_next(*pool, items, asio::use_awaitable);
    if (!first || *first != 0) co_return;
    asio::steady_timer timer{co_await asio::this_coro::executor, 200ms};
    auto next = coproc::async_next(*pool, items, asio::use_awaitable);
    auto tick = timer.async_wait(asio::use_awaitable);
    auto winner = co_await (std::move(next) || std::move(tick));
    *index = winner.index();
}

asio::awaitable<void> work_then_shutdown(coproc::process_pool* pool, int* value, bool* closed) {
    auto pending = coproc::async_submit<pool_test::sleep_then>(*pool, 200, 3, asio::experimental::deferred);
    auto shutdown = coproc::async_shutdown(*pool, {.wait = true}, asio::experimental::deferred);
    using namespace asio::experimental::awaitable_operators;
    auto first = std::move(pending)(asio::use_awaitable);
    auto second = std::move(shutdown)(asio::use_awaitable);
    *value = co_await (std::move(first) && std::move(second));
    try {
        co_await coproc::async_submit<pool_test::square>(*pool, 1, asio::use_awaitable);
    } catch (const coproc::pool_closed&) {
        *closed = true;
    }
}

} // namespace

TEST_CASE("async_map yields the results in input order and rethrows the first failure") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 2}};
        std::vector<int> squares;
        std::string failure;
        asio::co_spawn(b.io, map_squares(&b.pool(), &squares, &failure), asio::detached);
        run_io(b.io);
        CHECK(squares == std::vector<int>{1, 4, 9, 16, 25, 36, 49});
        CHECK(failure == "bad input 2");
    }
}

TEST_CASE("async_map cancelled by || cancels every chunk, pending and running") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 2, .cancel_grace = 100ms}};
        auto hold = how == mode::one_thread ? b.driver->keep_driving() : coproc::asio_driver::hold{};
        std::size_t index = 99;
        asio::co_spawn(b.io, map_or_timer(&b.pool(), &index), asio::detached);
        CHECK(b.wait_until([&] { return index != 99; }));
        CHECK(index == 1);
        CHECK(b.wait_until([&] { return b.pool().stats().tasks_cancelled == 4; }));
        CHECK(b.wait_until([&] { return b.pool().stats().tasks_cancelling == 0; }));
    }
}

TEST_CASE("async_next yields a stream's items in order, then nothing; a crash ends it with worker_died after its items") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 2}};
        std::vector<int> items;
        std::vector<int> before_crash;
        std::string crash;
        asio::co_spawn(b.io, stream_items(&b.pool(), &items, &before_crash, &crash), asio::detached);
        run_io(b.io);
        REQUIRE(items.size() == 40);
        for (int i = 0; i < 40; ++i) CHECK(items[static_cast<std::size_t>(i)] == i);
        CHECK(before_crash == std::vector<int>{0, 1});
        CHECK(crash.find("push_then_crash") != std::string::npos);
    }
}

TEST_CASE("async_next cancelled by || cancels the stream: its task sees the stop") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 1}};
        auto hold = how == mode::one_thread ? b.driver->keep_driving() : coproc::asio_driver::hold{};
        marker_file stopped{"asio-stream-stopped"};
        std::size_t index = 99;
        asio::co_spawn(b.io, stream_or_timer(&b.pool(), stopped.path(), &index), asio::detached);
        CHECK(b.wait_until([&] { return index != 99; }));
        CHECK(index == 1);
        CHECK(b.wait_until([&] { return stopped.exists(); }));
        CHECK(b.wait_until([&] { return b.pool().stats().tasks_cancelled == 1; }));
    }
}

TEST_CASE("async_map ignores a total cancellation, and a partial one ends it with operation_aborted") {
    for (const auto how : both_modes) {
        for (const auto type : {asio::cancellation_type::total, asio::cancellation_type::partial}) {
            const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
            const std::string type_text = type_name(type);
            CAPTURE(type_text);
            bridge b{how, {.max_workers = 2}};
            asio::cancellation_signal signal;
            std::exception_ptr error;
            std::vector<int> values;
            bool called = false;
            std::vector<std::tuple<int, int>> inputs{{300, 1}, {300, 2}, {300, 3}};
            coproc::async_map<pool_test::sleep_then>(
                b.pool(), inputs, {},
                asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(b.io, [&](std::exception_ptr e, std::vector<int> v) {
                    called = true;
                    error = e;
                    values = std::move(v);
                })));
            b.pause(100ms);
            signal.emit(type);
            run_io(b.io);
            CHECK(called);
            if (type == asio::cancellation_type::total) {
                CHECK_FALSE(error);
                CHECK(values == std::vector<int>{1, 2, 3});
            } else {
                CHECK(is_aborted(error));
                CHECK(values.empty());
            }
        }
    }
}

TEST_CASE("async_shutdown waits for the running task and the workers, then submits fail with pool_closed") {
    for (const auto how : both_modes) {
        const std::string mode_text = mode_name(how);
        CAPTURE(mode_text);
        bridge b{how, {.max_workers = 1}};
        int value = 0;
        bool closed = false;
        asio::co_spawn(b.io, work_then_shutdown(&b.pool(), &value, &closed), asio::detached);
        run_io(b.io);
        CHECK(value == 3);
        CHECK(closed);
        CHECK(b.pool().stats().workers_alive == 0);
    }
}

// ---------------------------------------------------------------------------
// Lifetimes

namespace {

struct sentinel {
    bool* destroyed;
    explicit sentinel(bool* flag) : destroyed(flag) {}
    sentinel(const sentinel&) = delete;
    ~sentinel() { *destroyed = true; }
};

asio::awaitable<void> await_long_task(coproc::process_pool* pool, bool* frame_destroyed, bool* resumed) {
    sentinel local{frame_destroyed};
    co_await coproc::async_submit<pool_test::sleep_then>(*pool, 10000, 1, asio::use_awaitable);
    *resumed = true;
}

} // namespace

TEST_CASE("destroying the io_context first destroys the outstanding handlers uncalled and cancels their tasks") {
    loop_thread thread{{.max_workers = 1, .cancel_grace = 50ms}};
    thread.start();
    coproc::process_pool& pool = thread.pool();
    bool called = false;
    bool handler_destroyed = false;
    bool frame_destroyed = false;
    bool resumed = false;
    {
        asio::io_context io;
        coproc::async_submit<pool_test::sleep_then>(
            pool, 10000, 1, asio::bind_executor(io, [&, guard = std::make_unique<sentinel>(&handler_destroyed)](std::exception_ptr, int) {
                called = true;
            }));
        asio::co_spawn(io, await_long_task(&pool, &frame_destroyed, &resumed), asio::detached);
        io.run_for(100ms); // the coroutine starts and submits
        REQUIRE_FALSE(io.stopped());
        CHECK_FALSE(handler_destroyed);
    }
    CHECK(handler_destroyed);
    CHECK(frame_destroyed);
    CHECK_FALSE(called);
    CHECK_FALSE(resumed);
    CHECK(wait_until([&] { return pool.stats().tasks_cancelled == 2; }));
}

TEST_CASE("destroying the pool first: each outstanding handler is called with operation_aborted") {
    SUBCASE("the pool is destroyed on its running loop") {
        asio::io_context io;
        loop_thread thread{{.max_workers = 1}};
        thread.start();
        outcome running;
        outcome pending;
        std::exception_ptr map_error;
        coproc::async_submit<pool_test::sleep_then>(thread.pool(), 10000, 1, record_on(io, running));
        coproc::async_submit<pool_test::square>(thread.pool(), 2, record_on(io, pending));
        std::vector<std::tuple<int, int>> inputs{{10000, 1}, {10000, 2}};
        coproc::async_map<pool_test::sleep_then>(thread.pool(), inputs, {},
                                                 asio::bind_executor(io, [&](std::exception_ptr e, std::vector<int>) { map_error = e; }));
        thread.destroy_pool_on_loop();
        run_io(io);
        CHECK(running.calls == 1);
        CHECK(is_aborted(running.error));
        CHECK(pending.calls == 1);
        CHECK(is_aborted(pending.error));
        CHECK(is_aborted(map_error));
    }
    SUBCASE("the loop stops, then the pool and the loop are destroyed, then the io_context runs") {
        asio::io_context io;
        outcome running;
        std::exception_ptr map_error;
        std::exception_ptr shutdown_error;
        {
            loop_thread thread{{.max_workers = 1}};
            thread.start();
            coproc::process_pool& pool = thread.pool();
            coproc::async_submit<pool_test::sleep_then>(pool, 10000, 1, record_on(io, running));
            REQUIRE(wait_until([&] { return pool.stats().tasks_running == 1; }));
            std::vector<std::tuple<int, int>> inputs{{10000, 1}, {10000, 2}};
            coproc::async_map<pool_test::sleep_then>(pool, inputs, {},
                                                     asio::bind_executor(io, [&](std::exception_ptr e, std::vector<int>) { map_error = e; }));
            coproc::async_shutdown(pool, {}, asio::bind_executor(io, [&](std::exception_ptr e) { shutdown_error = e; }));
            std::this_thread::sleep_for(50ms);
            thread.stop();
        }
        CHECK(running.calls == 0);
        run_io(io);
        CHECK(running.calls == 1);
        CHECK(is_aborted(running.error));
        CHECK(is_aborted(map_error));
        CHECK(is_aborted(shutdown_error));
    }
}

TEST_CASE("destroying the io_context last destroys the handlers it never ran") {
    bool handler_destroyed = false;
    bool called = false;
    {
        asio::io_context io;
        {
            loop_thread thread{{.max_workers = 1}};
            thread.start();
            coproc::async_submit<pool_test::square>(
                thread.pool(), 3, asio::bind_executor(io, [&, guard = std::make_unique<sentinel>(&handler_destroyed)](std::exception_ptr, int) {
                    called = true;
                }));
            REQUIRE(wait_until([&] { return thread.pool().stats().tasks_completed == 1; }));
        }
        CHECK_FALSE(handler_destroyed); // posted, waiting in the io_context
    }
    CHECK(handler_destroyed);
    CHECK_FALSE(called);
}

TEST_CASE("one thread: destroying the io_context first destroys the handlers and stops the driver; pool and loop go after") {
    coproc::event_loop loop{coproc::driven_loop_options};
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = 50ms}};
    std::optional<coproc::asio_driver> driver;
    bool called = false;
    bool handler_destroyed = false;
    bool frame_destroyed = false;
    bool resumed = false;
    {
        asio::io_context io;
        driver.emplace(io, loop);
        coproc::async_submit<pool_test::sleep_then>(
            pool, 10000, 1, asio::bind_executor(io, [&, guard = std::make_unique<sentinel>(&handler_destroyed)](std::exception_ptr, int) {
                called = true;
            }));
        asio::co_spawn(io, await_long_task(&pool, &frame_destroyed, &resumed), asio::detached);
        io.run_for(200ms);
        REQUIRE_FALSE(io.stopped());
        REQUIRE(pool.stats().tasks_running + pool.stats().tasks_queued == 2);
    }
    CHECK(handler_destroyed);
    CHECK(frame_destroyed);
    CHECK_FALSE(called);
    CHECK_FALSE(resumed);
    CHECK(pool.stats().tasks_cancelled == 2);
    driver.reset(); // after its io_context: it does nothing more
}

TEST_CASE("one thread: destroying the pool between two runs of the io_context: each handler gets operation_aborted") {
    asio::io_context io;
    coproc::event_loop loop{coproc::driven_loop_options};
    auto pool = std::make_unique<coproc::process_pool>(loop, coproc::process_pool_options{.max_workers = 1});
    coproc::asio_driver driver{io, loop};
    outcome running;
    outcome pending;
    std::exception_ptr map_error;
    coproc::async_submit<pool_test::sleep_then>(*pool, 10000, 1, record_on(io, running));
    coproc::async_submit<pool_test::square>(*pool, 2, record_on(io, pending));
    std::vector<std::tuple<int, int>> inputs{{10000, 1}, {10000, 2}};
    coproc::async_map<pool_test::sleep_then>(*pool, inputs, {},
                                             asio::bind_executor(io, [&](std::exception_ptr e, std::vector<int>) { map_error = e; }));
    io.run_for(200ms);
    REQUIRE_FALSE(io.stopped());
    pool.reset();
    run_io(io);
    CHECK(running.calls == 1);
    CHECK(is_aborted(running.error));
    CHECK(pending.calls == 1);
    CHECK(is_aborted(pending.error));
    CHECK(is_aborted(map_error));
}

TEST_CASE("one thread: the driver, the pool and the loop destroyed before the io_context runs again: handlers get operation_aborted") {
    asio::io_context io;
    outcome running;
    std::exception_ptr map_error;
    std::exception_ptr shutdown_error;
    {
        coproc::event_loop loop{coproc::driven_loop_options};
        coproc::process_pool pool{loop, {.max_workers = 1}};
        coproc::asio_driver driver{io, loop};
        coproc::async_submit<pool_test::sleep_then>(pool, 10000, 1, record_on(io, running));
        std::vector<std::tuple<int, int>> inputs{{10000, 1}, {10000, 2}};
        coproc::async_map<pool_test::sleep_then>(pool, inputs, {},
                                                 asio::bind_executor(io, [&](std::exception_ptr e, std::vector<int>) { map_error = e; }));
        coproc::async_shutdown(pool, {}, asio::bind_executor(io, [&](std::exception_ptr e) { shutdown_error = e; }));
        io.run_for(200ms);
        REQUIRE_FALSE(io.stopped());
    }
    CHECK(running.calls == 0);
    run_io(io);
    CHECK(running.calls == 1);
    CHECK(is_aborted(running.error));
    CHECK(is_aborted(map_error));
    CHECK(is_aborted(shutdown_error));
}

TEST_CASE("asio_driver refuses a loop on io_uring, and says how to create one it can drive") {
    asio::io_context io;
    coproc::event_loop loop{coproc::event_loop_options{.backend = coproc::event_loop_backend::io_uring}};
    try {
        coproc::asio_driver driver{io, loop};
        FAIL("the driver accepted an io_uring loop");
    } catch (const std::logic_error& e) {
        CHECK(std::string(e.what()).find("driven_loop_options") != std::string::npos);
    }
}

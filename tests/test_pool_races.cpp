// Races between threads that submit and cancel and a loop thread that shuts
// pools down in every documented way, one pool after another on one loop.
// Every future must end final, none may hang, and no worker may outlive its
// pool. COPROC_RACE_ITERATIONS sets how many pools (default: a short run
// for CI; scripts/soak runs the long form).
#include "remote_functions.hpp"
#include "support.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <csignal>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <sys/wait.h>

using coproc::future;
using coproc::task;
using namespace test_support;
using namespace pool_test;

namespace {

int iterations_from_environment(int fallback) {
    if (const char* text = std::getenv("COPROC_RACE_ITERATIONS")) return std::max(1, std::atoi(text));
    return fallback;
}

// The futures the submitting threads made, for the loop thread to settle.
struct shared_futures {
    std::mutex mutex;
    std::vector<future<int>> futures;
};

enum class ending { wait, wait_cancel, no_wait, blocking, destroy };

task<void> pause_random(coproc::event_loop* loop, int microseconds) {
    co_await loop->sleep_for(std::chrono::microseconds{microseconds});
}

task<void> shut_down(coproc::event_loop* loop, coproc::process_pool* pool, ending how, int delay_us) {
    co_await pause_random(loop, delay_us);
    switch (how) {
    case ending::wait: co_await pool->shutdown({.wait = true}); break;
    case ending::wait_cancel: co_await pool->shutdown({.wait = true, .cancel_futures = true}); break;
    case ending::no_wait: co_await pool->shutdown({.wait = false}); break;
    default: break;
    }
}

// Waits, on the loop, until every future is final.
task<void> settle_all(coproc::event_loop* loop, shared_futures* shared) {
    for (;;) {
        bool all_done = true;
        {
            std::lock_guard lock{shared->mutex};
            for (auto& pending : shared->futures) all_done = all_done && pending.done();
        }
        if (all_done) co_return;
        co_await loop->sleep_for(std::chrono::milliseconds{1});
    }
}

} // namespace

TEST_CASE("threads submit and cancel while pools are shut down in every way: every future ends, nothing hangs") {
    const int iterations = iterations_from_environment(60);
    coproc::event_loop loop;
    std::mt19937 random{2024};
    std::size_t finished = 0, cancelled = 0, failed = 0;
    for (int iteration = 0; iteration < iterations; ++iteration) {
        const auto how = static_cast<ending>(random() % 5);
        auto pool = std::make_unique<coproc::process_pool>(
            loop, coproc::process_pool_options{.max_workers = 1 + static_cast<int>(random() % 3),
                                               .cancel_grace = std::chrono::milliseconds{20 + random() % 60}});
        shared_futures shared;
        std::atomic<bool> stop_submitting{false};
        std::atomic<bool> stop_cancelling{false};
        std::vector<std::thread> threads;
        for (int t = 0; t < 3; ++t) {
            threads.emplace_back([&, seed = random()] {
                std::mt19937 local{seed};
                while (!stop_cancelling.load()) {
                    if (!stop_submitting.load() && local() % 2 == 0) {
                        try {
                            auto submitted = local() % 3 == 0 ? pool->submit<square>(1)
                                                              : pool->submit<sleep_then>(static_cast<int>(local() % 3), 1);
                            std::lock_guard lock{shared.mutex};
                            shared.futures.push_back(std::move(submitted));
                        } catch (const coproc::pool_closed&) {
                        } catch (const coproc::broken_process_pool&) {
                        }
                    } else {
                        std::lock_guard lock{shared.mutex};
                        if (!shared.futures.empty()) {
                            auto& victim = shared.futures[local() % shared.futures.size()];
                            victim.cancel(local() % 4 == 0);
                        }
                    }
                    if (local() % 8 == 0) std::this_thread::sleep_for(std::chrono::microseconds{local() % 300});
                }
            });
        }
        const int delay_us = static_cast<int>(random() % 5000);
        const auto started = std::chrono::steady_clock::now();
        if (how == ending::blocking) {
            std::thread closer([&] {
                std::this_thread::sleep_for(std::chrono::microseconds{delay_us});
                pool->shutdown_blocking({.wait = true, .cancel_futures = random() % 2 == 0});
            });
            // The loop runs until the blocking shutdown returned.
            loop.run(with_timeout(pause_random(&loop, delay_us + 200'000), std::chrono::seconds{10}));
            closer.join();
        } else if (how == ending::destroy) {
            loop.run(with_timeout(pause_random(&loop, delay_us), std::chrono::seconds{10}));
            stop_submitting = true; // a pool must not be destroyed under a submit
            std::this_thread::sleep_for(std::chrono::milliseconds{1});
            pool.reset();
        } else {
            REQUIRE_NOTHROW(loop.run(with_timeout(shut_down(&loop, pool.get(), how, delay_us), std::chrono::seconds{10})));
        }
        stop_submitting = true;
        stop_cancelling = true;
        for (auto& thread : threads) thread.join();
        // Whatever is still running (shutdown without wait) ends on its own.
        INFO("iteration " << iteration << ", ending " << static_cast<int>(how));
        REQUIRE_NOTHROW(loop.run(with_timeout(settle_all(&loop, &shared), std::chrono::seconds{10})));
        if (pool) {
            REQUIRE_NOTHROW(loop.run(with_timeout(pool->shutdown({.wait = true}), std::chrono::seconds{10})));
            CHECK(pool->stats().tasks_queued == 0);
            CHECK(pool->stats().tasks_running == 0);
            CHECK(pool->worker_pids().empty());
        }
        pool.reset();
        for (auto& pending : shared.futures) {
            if (pending.cancelled()) {
                ++cancelled;
            } else if (pending.exception() != nullptr) {
                ++failed;
            } else {
                ++finished;
            }
        }
        CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds{20});
    }
    // No worker outlived its pool: nothing is left to reap.
    CHECK(::waitpid(-1, nullptr, WNOHANG) == -1);
    MESSAGE(iterations << " pools: " << finished << " finished, " << cancelled << " cancelled, " << failed << " failed");
}

// Races between threads that submit and cancel and a loop thread that shuts
// pools down in every documented way, one pool after another on one loop.
// Every future must end final, none may hang, and no worker may outlive its
// pool. COPROC_RACE_ITERATIONS sets how many pools (default: a short run
// for CI; scripts/soak runs the long form).
#include "remote_functions.hpp"
#include "support.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
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

int count_from_environment(const char* name, int fallback) {
    if (const char* text = std::getenv(name)) return std::max(1, std::atoi(text));
    return fallback;
}

int iterations_from_environment(int fallback) { return count_from_environment("COPROC_RACE_ITERATIONS", fallback); }

// Kills (SIGKILL) a random worker every few milliseconds, starting ones
// included, until `stop` is set; counts the kills. A kill waits until some
// tasks completed since the last one, so that the pool makes progress
// however long its workers take to start (sanitizer builds are slow).
task<void> kill_randomly(coproc::event_loop* loop, coproc::process_pool* pool, const bool* stop, std::size_t* kills) {
    std::mt19937 random{99};
    std::size_t completed_at_last_kill = 0;
    while (!*stop) {
        co_await loop->sleep_for(std::chrono::microseconds{1000 + random() % 4000});
        const std::size_t completed = pool->stats().tasks_completed;
        if (completed < completed_at_last_kill + 20) continue;
        const auto pids = pool->worker_pids();
        if (pids.empty()) continue;
        ::kill(pids[random() % pids.size()], SIGKILL);
        completed_at_last_kill = completed;
        ++*kills;
    }
}

struct soak_counts {
    std::size_t values = 0, died = 0, never_ran = 0, kills = 0, wrong = 0, lost = 0;
    std::vector<char> outcome; // per task: 'v' value, 'd' died running, 'n' never ran
};

// Submits `total` count_run tasks, `window` at a time, and checks each
// outcome against how often the task ran.
task<void> submit_and_check(coproc::process_pool* pool, std::string path, int total, soak_counts* counts, bool* stop) {
    counts->outcome.assign(static_cast<std::size_t>(total), '?');
    constexpr int window = 512;
    for (int first = 0; first < total; first += window) {
        std::vector<future<int>> futures;
        const int end = std::min(total, first + window);
        for (int i = first; i < end; ++i) futures.push_back(pool->submit<count_run>(path, i, i));
        for (int i = first; i < end; ++i) {
            auto& pending = futures[static_cast<std::size_t>(i - first)];
            try {
                const int value = co_await pending;
                ++counts->values;
                counts->outcome[static_cast<std::size_t>(i)] = 'v';
                if (value != 2 * i) ++counts->wrong;
            } catch (const coproc::worker_died& e) {
                const std::string what = e.what();
                const bool never_ran = what.find("never ran") != std::string::npos;
                ++(never_ran ? counts->never_ran : counts->died);
                counts->outcome[static_cast<std::size_t>(i)] = never_ran ? 'n' : 'd';
            } catch (...) {
                ++counts->lost;
            }
        }
    }
    *stop = true;
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

task<void> until_set(coproc::event_loop* loop, const std::atomic<bool>* flag) {
    while (!flag->load()) co_await loop->sleep_for(std::chrono::milliseconds{1});
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
        // Threads that saw stop_submitting and will never submit again: a
        // pool may only be destroyed once no thread is inside its submit.
        std::atomic<int> stopped_submitting{0};
        std::vector<std::thread> threads;
        for (int t = 0; t < 3; ++t) {
            threads.emplace_back([&, seed = random()] {
                std::mt19937 local{seed};
                bool submitting = true;
                while (!stop_cancelling.load()) {
                    if (submitting && stop_submitting.load()) {
                        submitting = false;
                        stopped_submitting.fetch_add(1);
                    }
                    if (submitting && local() % 2 == 0) {
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
            std::atomic<bool> closed{false};
            const bool cancel_futures = random() % 2 == 0;
            std::thread closer([&] {
                std::this_thread::sleep_for(std::chrono::microseconds{delay_us});
                pool->shutdown_blocking({.wait = true, .cancel_futures = cancel_futures});
                closed = true;
            });
            // As shutdown_blocking requires: the loop runs until it returned.
            REQUIRE_NOTHROW(loop.run(with_timeout(until_set(&loop, &closed), std::chrono::seconds{10})));
            closer.join();
        } else if (how == ending::destroy) {
            loop.run(with_timeout(pause_random(&loop, delay_us), std::chrono::seconds{10}));
            stop_submitting = true; // a pool must not be destroyed under a submit
            while (stopped_submitting.load() < 3) std::this_thread::yield();
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

TEST_CASE("random SIGKILLs of workers, starting ones included: every task ends, none lost, wrong or run twice") {
    const int total = count_from_environment("COPROC_SOAK_TASKS", 20000);
    const auto path = std::filesystem::temp_directory_path() / ("coproc-soak-" + std::to_string(::getpid()));
    {
        std::ofstream file{path, std::ios::binary};
        const std::vector<char> zeros(static_cast<std::size_t>(total) * sizeof(std::uint32_t), '\0');
        file.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
    }
    soak_counts counts;
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 2}};
        bool stop = false;
        loop.spawn(kill_randomly(&loop, &pool, &stop, &counts.kills));
        const auto started = std::chrono::steady_clock::now();
        REQUIRE_NOTHROW(loop.run(with_timeout(submit_and_check(&pool, path.string(), total, &counts, &stop),
                                              std::chrono::seconds{60 + total / 1000})));
        REQUIRE_NOTHROW(loop.run(with_timeout(pool.shutdown({.wait = true}), std::chrono::seconds{10})));
        MESSAGE(total << " tasks in " << std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count()
                      << " s");
    }
    // Every worker is gone: the counters are final.
    std::vector<std::uint32_t> runs(static_cast<std::size_t>(total));
    {
        std::ifstream file{path, std::ios::binary};
        file.read(reinterpret_cast<char*>(runs.data()), static_cast<std::streamsize>(runs.size() * sizeof(std::uint32_t)));
    }
    std::filesystem::remove(path);
    // A value or a death while running: it ran exactly once (a death is
    // seen after its START, so it did start). "Never ran": not at all.
    std::size_t ran_twice = 0, value_without_run = 0, never_ran_but_ran = 0;
    for (std::size_t i = 0; i < runs.size(); ++i) {
        if (runs[i] > 1) ++ran_twice;
        if (counts.outcome[i] == 'v' && runs[i] != 1) ++value_without_run;
        if (counts.outcome[i] == 'n' && runs[i] != 0) ++never_ran_but_ran;
    }
    MESSAGE(counts.values << " values, " << counts.died << " died running, " << counts.never_ran << " never ran, "
                          << counts.kills << " kills, " << ran_twice << " ran twice");
    CHECK(counts.values + counts.died + counts.never_ran == static_cast<std::size_t>(total));
    CHECK(counts.lost == 0);
    CHECK(counts.wrong == 0);
    CHECK(ran_twice == 0);
    CHECK(value_without_run == 0);
    CHECK(never_ran_but_ran == 0);
    CHECK(counts.kills > 0);
}

// crash: a worker that dies (here by a segmentation fault) fails only the
// task it was running, with coproc::worker_died; the pool starts a
// replacement and every other task completes. Python's executor would have
// broken the whole pool (crash_policy::break_pool reproduces that).
#include <coproc/coproc.hpp>

#include <csignal>
#include <cstdio>
#include <vector>

namespace {

int fragile_square(int x) {
    if (x == 13) std::raise(SIGSEGV); // an unlucky input crashes its worker
    return x * x;
}

coproc::task<int> run_all(coproc::process_pool* pool) {
    std::vector<coproc::future<int>> futures;
    for (int x = 0; x < 40; ++x) futures.push_back(pool->submit<fragile_square>(x));
    int completed = 0;
    int died = 0;
    for (int x = 0; x < 40; ++x) {
        try {
            const int value = co_await std::move(futures[static_cast<std::size_t>(x)]);
            completed += value == x * x;
        } catch (const coproc::worker_died& e) {
            std::printf("task %d: %s\n", x, e.what());
            ++died;
        }
    }
    const auto stats = pool->stats();
    std::printf("%d tasks completed, %d failed with worker_died, %zu workers started in all\n", completed, died,
                stats.workers_started);
    co_return completed == 39 && died == 1 ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
    coproc::run_worker_if_requested(argc, argv);
    coproc::event_loop loop;
    // Under AddressSanitizer (as in CI) the worker would catch the SIGSEGV
    // itself; let it die by the signal as it would in a normal build.
    coproc::process_pool pool{loop, {.max_workers = 2, .environment = {{"ASAN_OPTIONS", "handle_segv=0"}}}};
    return loop.run(run_all(&pool));
}

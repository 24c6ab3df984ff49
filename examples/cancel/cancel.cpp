// cancel: cancelling work that is already running in a worker, something
// Python's ProcessPoolExecutor cannot do. A cooperative task stops when its
// std::stop_token is stopped, and its worker serves on. A task that ignores
// the token has its worker killed after cancel_grace, and a replacement
// serves the next task.
#include <coproc/coproc.hpp>

#include <chrono>
#include <cstdio>
#include <stop_token>
#include <thread>
#include <unistd.h>

using namespace std::chrono_literals;

namespace {

// Cooperative: checks its token between steps.
long count_steps(long steps, std::stop_token stop) {
    long done = 0;
    for (; done < steps && !stop.stop_requested(); ++done) std::this_thread::sleep_for(1ms);
    return done;
}

// Uncooperative: never looks at a token.
long spin() {
    volatile long counter = 0;
    for (;;) counter = counter + 1;
}

int worker_pid() { return static_cast<int>(::getpid()); }

template <class T>
coproc::task<void> until_running(coproc::event_loop* loop, coproc::future<T>* pending) {
    while (!pending->running()) co_await loop->sleep_for(1ms);
}

coproc::task<int> demonstrate(coproc::event_loop* loop, coproc::process_pool* pool) {
    const int first_worker = co_await pool->submit<worker_pid>();

    auto polite = pool->submit<count_steps>(100'000);
    co_await until_running(loop, &polite);
    co_await loop->sleep_for(20ms);
    polite.cancel();
    try {
        co_await std::move(polite);
    } catch (const coproc::cancelled_error&) {
        std::printf("cooperative task cancelled while running; ");
    }
    const int after_polite = co_await pool->submit<worker_pid>();
    std::printf("its worker %s\n", after_polite == first_worker ? "serves on" : "was replaced");

    auto stubborn = pool->submit<spin>();
    co_await until_running(loop, &stubborn);
    stubborn.cancel(); // the future is cancelled at once; the worker is killed after cancel_grace
    std::printf("uncooperative task cancelled: future cancelled = %s\n", stubborn.cancelled() ? "yes" : "no");
    const int after_stubborn = co_await pool->submit<worker_pid>();
    std::printf("next task ran on worker %d (%s), workers killed for cancellation: %zu\n", after_stubborn,
                after_stubborn != first_worker ? "a replacement" : "the same one",
                pool->stats().workers_killed_for_cancel);
    co_return after_polite == first_worker && after_stubborn != first_worker ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
    coproc::run_worker_if_requested(argc, argv);
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 1, .cancel_grace = 200ms}};
    return loop.run(demonstrate(&loop, &pool));
}

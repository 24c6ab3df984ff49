// coproc/progress.hpp - progress reports from a task running in a worker.
//
//     double simulate(int steps) {                       // runs in a worker
//         for (int i = 0; i < steps; ++i) {
//             step(i);
//             coproc::report_progress(double(i + 1) / steps);
//         }
//         return result();
//     }
//
//     auto f = pool.submit<simulate>(1000);              // in the parent
//     f.on_progress([](double done) { draw_bar(done); }); // on the loop thread
//     double value = co_await std::move(f);
//
// The parent sees the reports through the task's future: on_progress(fn)
// and latest_progress() (coproc/future.hpp).
#pragma once

namespace coproc {

// Reports how far the task that runs on this thread got: any number the
// task and its caller agree on (a fraction from 0 to 1, items done, ...),
// passed through as it is. Sent to the parent at most once per
// process_pool_options::progress_interval: a report made sooner after the
// last one sent is held back, replaced by later ones, and sent with the next
// report made after the interval, or, at the latest, just before the task's
// result or error, so the last value always arrives before the future ends.
// Cheap when held back (a clock read); so call it as often as convenient.
// Call it on the thread that runs the task (the function submitted, not a
// thread it starts). Anywhere else (in the parent, in a pool's
// initializer, in a thread of the task's own) it does nothing. Never throws
// (a worker whose parent is gone exits, as it does when sending a result).
void report_progress(double value) noexcept;

} // namespace coproc

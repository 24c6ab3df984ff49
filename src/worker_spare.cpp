// See worker_spare.hpp.
#include "worker_spare.hpp"

#include "worker_limits.hpp"

#include <coproc/worker.hpp>

#include <atomic>
#include <cstdio>
#include <system_error>
#include <thread>
#include <utility>

namespace coproc::detail {

namespace {

std::atomic<std::size_t> blocks_reused{0};
std::atomic<std::size_t> spare_bytes{0};

} // namespace

std::size_t worker_blocks_reused() noexcept { return blocks_reused.load(std::memory_order_relaxed); }
std::size_t worker_spare_bytes() noexcept { return spare_bytes.load(std::memory_order_relaxed); }

void spare_memory::keep(outgoing& sent) {
    kept_block kept;
    for (const auto& part : sent.attached) {
        if (part.container != nullptr && part.reserved > kept.bytes && part.owner.use_count() == 1) {
            kept = {{part.owner, part.container}, part.reserved, {}};
        }
    }
    sent.clear();
    if (!kept.block.owner || keep_for_ <= std::chrono::milliseconds::zero()) return;
    kept.expiry = clock_type::now() + keep_for_;
    kept_block old;
    {
        std::lock_guard lock{mutex_};
        if (!janitor_started_) {
            janitor_started_ = true;
            janitor_running_ = start_janitor();
        }
        if (!janitor_running_) return; // nothing would free it: `kept` is freed now, not kept
        old = std::exchange(spare_, std::move(kept));
        spare_bytes.store(spare_.bytes, std::memory_order_relaxed);
    }
    changed_.notify_one();
} // `old` is freed here, outside the lock

prepared_arguments spare_memory::prepare(const remote_function_entry& function, std::uint64_t count, std::size_t bytes) {
    kept_block spare = take();
    const bool had_spare = spare.block.owner != nullptr;
    prepared_arguments prepared = function.prepare(count, bytes, spare.block);
    if (had_spare && !spare.block.owner) blocks_reused.fetch_add(1, std::memory_order_relaxed);
    if (spare.block.owner) put_back(std::move(spare));
    return prepared;
}

// Starts the janitor; false, said on stderr, when no thread can be created.
// Only memory is lost then, not work: the worker serves on.
bool spare_memory::start_janitor() {
    try {
        std::thread{[this] { run_janitor(); }}.detach(); // the process ends with _exit
        return true;
    } catch (const std::system_error& e) {
        std::fputs(describe_thread_failure("janitor", e,
                                           "the worker serves on, without keeping the memory of large results "
                                           "for the next task (process_pool_options::keep_result_memory)")
                       .c_str(),
                   stderr);
        return false;
    }
}

spare_memory::kept_block spare_memory::take() {
    std::lock_guard lock{mutex_};
    spare_bytes.store(0, std::memory_order_relaxed);
    return std::exchange(spare_, {});
}

// Not taken: back, unless it expired or another was kept meanwhile (then it
// is freed, outside the lock).
void spare_memory::put_back(kept_block spare) {
    {
        std::lock_guard lock{mutex_};
        if (spare_.block.owner || clock_type::now() >= spare.expiry) return;
        spare_ = std::move(spare);
        spare_bytes.store(spare_.bytes, std::memory_order_relaxed);
    }
    changed_.notify_one();
}

// The janitor: frees each spare when it expires.
void spare_memory::run_janitor() {
    std::unique_lock lock{mutex_};
    for (;;) {
        if (!spare_.block.owner) {
            changed_.wait(lock);
        } else if (clock_type::now() < spare_.expiry) {
            changed_.wait_until(lock, spare_.expiry);
        } else {
            kept_block expired = std::exchange(spare_, {});
            spare_bytes.store(0, std::memory_order_relaxed);
            lock.unlock();
            expired = {}; // its memory goes back, outside the lock
            lock.lock();
        }
    }
}

} // namespace coproc::detail

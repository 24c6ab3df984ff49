// A worker's kept mappings of received shared buffers (received_mappings.hpp).

#include "received_mappings.hpp"

#include <algorithm>
#include <atomic>
#include <system_error>
#include <thread>
#include <utility>

namespace coproc::detail {

namespace {
// Set once, before the worker decodes its first frame; never freed (the
// janitor thread uses it until the process ends with _exit).
std::atomic<received_mappings*> instance{nullptr};
} // namespace

received_mappings* received_mappings::current() noexcept { return instance.load(std::memory_order_acquire); }

void received_mappings::enable(std::chrono::milliseconds keep_for) {
    if (keep_for.count() <= 0 || instance.load(std::memory_order_relaxed) != nullptr) return;
    instance.store(new received_mappings(keep_for), std::memory_order_release);
}

std::shared_ptr<const shared_mapping> received_mappings::find(::dev_t device, ::ino_t inode, std::size_t size) {
    std::lock_guard lock{mutex_};
    const auto found = std::find_if(entries_.begin(), entries_.end(), [&](const entry& e) {
        return e.device == device && e.inode == inode && e.mapping->size() == size;
    });
    if (found == entries_.end()) return nullptr;
    entry used = std::move(*found);
    entries_.erase(found);
    used.expiry = clock_type::now() + keep_for_;
    auto mapping = used.mapping;
    entries_.push_back(std::move(used));
    return mapping;
}

bool received_mappings::keep(::dev_t device, ::ino_t inode, const std::shared_ptr<const shared_mapping>& mapping) {
    std::shared_ptr<const shared_mapping> dropped; // unmapped outside the lock
    {
        std::lock_guard lock{mutex_};
        if (!janitor_started_) {
            janitor_started_ = true;
            janitor_running_ = start_janitor();
        }
        if (!janitor_running_) return false;
        // Another size of the same file replaces the one kept.
        const auto same = std::find_if(entries_.begin(), entries_.end(),
                                       [&](const entry& e) { return e.device == device && e.inode == inode; });
        if (same != entries_.end()) {
            dropped = std::move(same->mapping);
            entries_.erase(same);
        } else if (entries_.size() == capacity) {
            dropped = std::move(entries_.front().mapping);
            entries_.erase(entries_.begin());
        }
        entries_.push_back({device, inode, mapping, clock_type::now() + keep_for_});
    }
    changed_.notify_one();
    return true;
}

std::size_t received_mappings::size() {
    std::lock_guard lock{mutex_};
    return entries_.size();
}

bool received_mappings::start_janitor() {
    try {
        std::thread{[this] { run_janitor(); }}.detach(); // the process ends with _exit
        return true;
    } catch (const std::system_error&) {
        return false; // no thread: nothing is kept, every buffer is mapped for its task
    }
}

// Drops each mapping once unused for keep_for_.
void received_mappings::run_janitor() {
    std::unique_lock lock{mutex_};
    for (;;) {
        if (entries_.empty()) {
            changed_.wait(lock);
            continue;
        }
        const auto soonest = std::min_element(entries_.begin(), entries_.end(),
                                              [](const entry& a, const entry& b) { return a.expiry < b.expiry; });
        // A copy: wait_until reads its deadline after it wakes, by which
        // time a keep() may have moved the entries.
        const clock_type::time_point expiry = soonest->expiry;
        if (clock_type::now() < expiry) {
            changed_.wait_until(lock, expiry);
            continue;
        }
        std::shared_ptr<const shared_mapping> expired = std::move(soonest->mapping);
        entries_.erase(soonest);
        lock.unlock();
        expired.reset(); // unmapped and closed here unless a task still holds it
        lock.lock();
    }
}

} // namespace coproc::detail

// process_pool_options::placement (coproc/placement.hpp): the pool's second
// kind of worker life, without MPI. A test placement starts each "remote"
// worker on this machine with the pool's own spawn function and watches it
// from a thread of its own, so that every build (sanitizers, TSan, epoll)
// checks the seam: exit events, signals and releases through the placement,
// pids from HELLO, hosts in errors. tests/test_mpi.cpp checks the MPI one.
// doctest_main's listener checks that no case leaves a process or descriptor.
#include "remote_functions.hpp"
#include "support.hpp"
#include "worker_process.hpp"

#include <coproc/coproc.hpp>

#include <doctest/doctest.h>

#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

using namespace test_support;
using namespace pool_test;
using namespace std::chrono_literals;

namespace {

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

class local_placement final : public coproc::worker_placement {
public:
    explicit local_placement(std::size_t slots) : slots_(slots) {}

    ~local_placement() override {
        std::map<std::uint64_t, std::unique_ptr<worker>> left;
        {
            std::lock_guard lock{mutex_};
            left.swap(workers_);
        }
        for (auto& [handle, w] : left) finish(*w);
    }

    [[nodiscard]] std::size_t slots() const override { return slots_; }

    // The next `count` starts end at once with `status`: by default as on a
    // host short of processes.
    void fail_starts(int count, exit_status status = {0, true, 127, "could not be started on placed-host: Resource temporarily unavailable", EAGAIN}) {
        std::lock_guard lock{mutex_};
        fail_starts_ = count;
        fail_status_ = std::move(status);
    }

    started start(const std::string& program, const std::vector<std::string>& environment) override {
        int fds[2];
        REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
        {
            std::lock_guard lock{mutex_};
            if (fail_starts_ > 0) {
                --fail_starts_;
                ::close(fds[1]); // no worker: the pool reads EOF
                auto w = std::make_unique<worker>();
                w->exit_event = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
                w->status = fail_status_;
                w->exited.store(true);
                const std::uint64_t one = 1;
                [[maybe_unused]] const auto wrote = ::write(w->exit_event, &one, sizeof one);
                const std::uint64_t handle = ++next_;
                const int event = w->exit_event;
                workers_.emplace(handle, std::move(w));
                ++started_;
                return {fds[0], event, handle, "placed-host"};
            }
        }
        // The pool's entries, then ours minus the names it sets (as an MPI
        // agent does).
        auto entries = environment;
        const auto name_of = [](std::string_view entry) { return entry.substr(0, entry.find('=')); };
        for (char** entry = environ; *entry != nullptr; ++entry) {
            const std::string_view text{*entry};
            bool replaced = text.starts_with("COPROC_");
            for (const auto& given : environment) replaced = replaced || name_of(given) == name_of(text);
            if (!replaced) entries.emplace_back(text);
        }
        entries.push_back("COPROC_PARENT_PID=" + std::to_string(::getpid()));
        std::vector<char*> pointers;
        for (auto& entry : entries) pointers.push_back(entry.data());
        pointers.push_back(nullptr);
        ::pid_t pid = -1;
        const int failed = coproc::detail::spawn_worker_program(program.empty() ? "/proc/self/exe" : program,
                                                                "coproc-worker:placed", pointers.data(), fds[1], -1, pid);
        ::close(fds[1]);
        REQUIRE(failed == 0);
        auto w = std::make_unique<worker>();
        w->pid = pid;
        w->exit_event = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        worker* raw = w.get();
        // Watches the worker as an agent would: its exit, then the event.
        w->watcher = std::thread([raw] {
            ::siginfo_t info{};
            while (::waitid(P_PID, static_cast<::id_t>(raw->pid), &info, WEXITED) < 0 && errno == EINTR) {
            }
            raw->status = {raw->pid, info.si_code == CLD_EXITED, info.si_status, {}};
            if (raw->lost.load()) {
                raw->status.reason = "was lost with its host agent (placed-host): it hangs";
                raw->status.host_lost = true;
            }
            raw->exited.store(true);
            const std::uint64_t one = 1;
            [[maybe_unused]] const auto wrote = ::write(raw->exit_event, &one, sizeof one);
        });
        std::lock_guard lock{mutex_};
        const std::uint64_t handle = ++next_;
        workers_.emplace(handle, std::move(w));
        ++started_;
        return {fds[0], raw->exit_event, handle, "placed-host"};
    }

    exit_status exit(std::uint64_t handle) override {
        std::lock_guard lock{mutex_};
        const auto found = workers_.find(handle);
        REQUIRE(found != workers_.end());
        REQUIRE(found->second->exited.load());
        ++exits_asked_;
        return found->second->status;
    }

    void signal(std::uint64_t handle, int number) noexcept override {
        std::lock_guard lock{mutex_};
        if (const auto found = workers_.find(handle); found != workers_.end() && !found->second->exited.load()) {
            ::kill(found->second->pid, number);
            signals_.push_back(number);
        }
    }

    void release(std::uint64_t handle) noexcept override {
        std::unique_ptr<worker> gone;
        {
            std::lock_guard lock{mutex_};
            const auto found = workers_.find(handle);
            if (found == workers_.end()) return;
            gone = std::move(found->second);
            workers_.erase(found);
            ++released_;
        }
        finish(*gone);
    }

    // Every worker's host is lost: each is killed and reported lost with it.
    void lose_all() {
        std::lock_guard lock{mutex_};
        for (auto& [handle, w] : workers_) {
            if (w->exited.load()) continue;
            w->lost.store(true);
            ::kill(w->pid, SIGKILL);
        }
    }

    std::size_t started_count() {
        std::lock_guard lock{mutex_};
        return started_;
    }
    std::size_t released_count() {
        std::lock_guard lock{mutex_};
        return released_;
    }
    std::size_t held() {
        std::lock_guard lock{mutex_};
        return workers_.size();
    }
    std::vector<int> signals() {
        std::lock_guard lock{mutex_};
        return signals_;
    }

private:
    struct worker {
        ::pid_t pid = -1;
        int exit_event = -1;
        std::thread watcher;
        std::atomic<bool> exited{false};
        std::atomic<bool> lost{false};
        exit_status status;
    };

    static void finish(worker& w) {
        if (!w.exited.load()) ::kill(w.pid, SIGKILL);
        if (w.watcher.joinable()) w.watcher.join();
        ::close(w.exit_event);
    }

    std::size_t slots_;
    std::mutex mutex_;
    std::map<std::uint64_t, std::unique_ptr<worker>> workers_;
    std::uint64_t next_ = 0;
    std::size_t started_ = 0;
    std::size_t released_ = 0;
    std::size_t exits_asked_ = 0;
    int fail_starts_ = 0;
    exit_status fail_status_;
    std::vector<int> signals_;
};

coproc::task<std::vector<int>> pids_of(coproc::process_pool* pool, int tasks) {
    std::vector<coproc::future<int>> futures;
    for (int i = 0; i < tasks; ++i) futures.push_back(pool->submit<sleep_then_pid>(200));
    std::vector<int> pids;
    for (auto& f : futures) pids.push_back(co_await f);
    co_return pids;
}

} // namespace

TEST_CASE("placement: remote workers serve beyond the local ones, and each is released once it ends") {
    auto placement = std::make_shared<local_placement>(2);
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .placement = placement}};
        const auto pids = run_bounded(loop, pids_of(&pool, 3), 30s);
        CHECK(std::set<int>(pids.begin(), pids.end()).size() == 3);
        CHECK(placement->started_count() == 2); // the local worker first, then two placed
        // Each pid the pool reports came with its worker's HELLO.
        const auto listed = pool.worker_pids();
        CHECK(std::set<int>(listed.begin(), listed.end()) == std::set<int>(pids.begin(), pids.end()));
        run_bounded(loop, pool.shutdown(), 30s);
        CHECK(pool.stats().workers_alive == 0);
        CHECK(placement->released_count() == 2);
        CHECK(placement->held() == 0);
    }
}

TEST_CASE("placement: a placed worker's crash fails its task with its host, its kill goes through the placement") {
    auto placement = std::make_shared<local_placement>(1);
    {
        coproc::event_loop loop;
        // Under AddressSanitizer a worker would catch its own SIGSEGV and
        // exit(1); let the signal kill it, as in a normal build.
        const char* asan = std::getenv("ASAN_OPTIONS");
        coproc::process_pool pool{loop, {.max_workers = 0,
                                         .placement = placement,
                                         .environment = {{"ASAN_OPTIONS", std::string(asan != nullptr ? asan : "") + ":handle_segv=0"}},
                                         .cancel_grace = 100ms}};
        try {
            run_bounded(loop, await_future(pool.submit<crash_segfault>()), 30s);
            FAIL("no exception");
        } catch (const coproc::worker_died& e) {
            CHECK(e.signal() == SIGSEGV);
            CHECK(e.pid() > 0);
            CHECK(contains(e.what(), " on placed-host running "));
        }
        CHECK(run_bounded(loop, await_future(pool.submit<square>(6)), 30s) == 36);
        // A task that ignores its stop token: killed after the grace, by a
        // signal the placement sends, never by the pool's own kill(2).
        auto stuck = pool.submit<busy_forever>();
        run_bounded(loop, until_running(&loop, &stuck), 10s);
        REQUIRE(stuck.running());
        stuck.cancel();
        const auto deadline = std::chrono::steady_clock::now() + 10s;
        while (placement->signals().empty() && std::chrono::steady_clock::now() < deadline) {
            run_bounded(loop, pause_for(&loop, 5ms));
        }
        CHECK(placement->signals() == std::vector<int>{SIGKILL});
        CHECK(run_bounded(loop, await_future(pool.submit<square>(7)), 30s) == 49);
    }
    CHECK(placement->held() == 0); // the pool released every worker it had
}

TEST_CASE("placement: destroying the pool with placed tasks running releases them") {
    auto placement = std::make_shared<local_placement>(2);
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 0, .placement = placement}};
        auto a = pool.submit<hang_forever>();
        auto b = pool.submit<hang_forever>();
        run_bounded(loop, until_running(&loop, &a), 10s);
        run_bounded(loop, until_running(&loop, &b), 10s);
        REQUIRE(a.running());
        REQUIRE(b.running());
    }
    CHECK(placement->signals() == std::vector<int>{SIGKILL, SIGKILL});
    CHECK(placement->held() == 0);
    CHECK(placement->released_count() == 2);
}

TEST_CASE("placement: a host short of processes is a passing shortage: the pool backs off and serves, unbroken") {
    auto placement = std::make_shared<local_placement>(1);
    placement->fail_starts(5); // more than the start-up failures that break a pool
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 0, .placement = placement}};
        int start_failures = 0;
        int result = 0;
        for (int attempt = 0; attempt < 20 && result == 0; ++attempt) {
            try {
                result = run_bounded(loop, await_future(pool.submit<square>(3)), 30s);
            } catch (const coproc::worker_start_failed& e) {
                // No worker alive to wait for: queued tasks fail, as locally.
                ++start_failures;
                CHECK(contains(e.what(), "could not be started on placed-host"));
                run_bounded(loop, pause_for(&loop, 20ms));
            }
        }
        CHECK(result == 9);
        CHECK(start_failures >= 1);
        CHECK(placement->started_count() == 6); // five refused, then one that serves
    }
    CHECK(placement->held() == 0);
}

TEST_CASE("placement: workers lost with their host before HELLO do not count against the program") {
    auto placement = std::make_shared<local_placement>(1);
    coproc::worker_placement::exit_status lost{0, false, SIGKILL, "was lost with its host agent (rank 2): it hangs"};
    lost.host_lost = true;
    placement->fail_starts(5, lost); // more than the start-up failures that break a pool
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 0, .placement = placement}};
        CHECK(run_bounded(loop, await_future(pool.submit<square>(4)), 30s) == 16);
        CHECK(run_bounded(loop, await_future(pool.submit<square>(5)), 30s) == 25); // and not broken
        CHECK(placement->started_count() == 6); // five lost, then one that serves
    }
    CHECK(placement->held() == 0);
}

coproc::task<void> until_sent(coproc::event_loop* loop, coproc::process_pool* pool, std::size_t tasks) {
    while (pool->stats().tasks_running < tasks) co_await loop->sleep_for(std::chrono::milliseconds{1});
}

TEST_CASE("placement: a worker lost with its host fails every task it was sent, started or not: none runs twice") {
    auto placement = std::make_shared<local_placement>(1);
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 0, .placement = placement}};
        auto running = pool.submit<sleep_then>(60'000, 1);
        run_bounded(loop, until_running(&loop, &running), 20s);
        auto sent = pool.submit<square>(3); // sent ahead to the one worker (prefetch 2), not started
        run_bounded(loop, until_sent(&loop, &pool, 2), 20s);
        REQUIRE_FALSE(sent.running());
        placement->lose_all();
        try {
            run_bounded(loop, await_future(std::move(running)), 30s);
            FAIL("no exception");
        } catch (const coproc::worker_died& e) {
            CHECK(contains(e.what(), "was lost with its host agent (placed-host)"));
        }
        try {
            const int value = run_bounded(loop, await_future(std::move(sent)), 30s);
            FAIL("ran again elsewhere: " << value);
        } catch (const coproc::worker_died& e) {
            CHECK(contains(e.what(), "square"));
            CHECK(contains(e.what(), "was lost with its host agent (placed-host)"));
        }
        // A new worker serves on.
        CHECK(run_bounded(loop, await_future(pool.submit<square>(4)), 30s) == 16);
    }
    CHECK(placement->held() == 0);
}

TEST_CASE("placement: local workers start first") {
    auto placement = std::make_shared<local_placement>(2);
    {
        coproc::event_loop loop;
        coproc::process_pool pool{loop, {.max_workers = 1, .placement = placement}};
        const int pid = run_bounded(loop, await_future(pool.submit<worker_pid>()), 30s);
        CHECK(pid > 0);
        CHECK(placement->started_count() == 0); // one task: the local worker
    }
}

TEST_CASE("placement: a shared_buffer task waits for a local worker without holding up the tasks behind it") {
    auto placement = std::make_shared<local_placement>(1);
    {
        coproc::event_loop loop;
        // prefetch 1: nothing is sent ahead to the busy local worker.
        coproc::process_pool pool{loop, {.max_workers = 1, .placement = placement, .prefetch = 1, .max_prefetch = 1}};
        auto busy = pool.submit<sleep_then>(5000, 1); // the local worker, first
        run_bounded(loop, until_running(&loop, &busy), 10s);
        REQUIRE(busy.running());
        coproc::shared_buffer buffer{4096};
        buffer.bytes()[0] = std::byte{7};
        auto local_only = pool.submit<sum_shared>(buffer);
        auto behind = pool.submit<square>(5);
        // The task behind runs on the placed worker while the local one is
        // busy and the shared_buffer task waits for it.
        CHECK(run_bounded(loop, await_future(std::move(behind)), 3s) == 25); // long before `busy` ends
        CHECK(!local_only.done());
        CHECK(!busy.done());
        CHECK(run_bounded(loop, await_future(std::move(local_only)), 30s) == 7);
        CHECK(placement->started_count() == 1);
    }
}

TEST_CASE("placement: zero local workers needs a placement with slots") {
    coproc::event_loop loop;
    CHECK_THROWS_AS(coproc::process_pool(loop, {.max_workers = 0}), std::invalid_argument);
    CHECK_THROWS_AS(coproc::process_pool(loop, {.max_workers = 0, .placement = std::make_shared<local_placement>(0)}),
                    std::invalid_argument);
    coproc::process_pool pool{loop, {.max_workers = 0, .placement = std::make_shared<local_placement>(1)}};
    coproc::shared_buffer buffer{16};
    CHECK_THROWS_AS((void)pool.submit<sum_shared>(buffer), std::invalid_argument);
}

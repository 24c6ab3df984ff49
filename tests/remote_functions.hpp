// Functions the process-pool tests run in workers. Compiled into the test
// program (whose workers are the test program itself) and into
// worker_program, the separate worker used by the worker_executable tests.
#pragma once

#include <coproc/error.hpp>
#include <coproc/shared_buffer.hpp>
#include <coproc/sink.hpp>

#include <cereal/cereal.hpp>

#include <cstdint>
#include <memory_resource>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace pool_test {

int square(int x);
int cube(int x); // not registered in worker_program
int add(int a, int b);
int halve(int x);       // two overloads: told apart by their types
double halve(double x);
template <int N>
int scale(int x) {      // specializations that Clang spells alike
    return x * N;
}
int fail_at(int x, int bad); // throws std::domain_error when x == bad
std::string greet(std::string name, int times);
int worker_pid();
void sleep_ms(int milliseconds);
int sleep_then(int milliseconds, int value);
int sleep_then_pid(int milliseconds); // returns the worker's pid
std::string environment_variable(std::string name);
std::vector<int> open_descriptors();
// voluntary_ctxt_switches of the thread that runs it (/proc/thread-self/status).
long thread_voluntary_switches();
// "fd target" for each open descriptor, target as /proc/self/fd shows it.
std::vector<std::string> descriptor_targets();
void write_to_stderr(std::string text);
void touch_file(std::string path);

// Initializers: the first records `label` for initialized_label() and counts
// how often it ran in this process; the second throws.
void initialize(std::string label);
std::string initialized_label();
void failing_initializer(std::string message);
int crashing_initializer();

// Cancellation: a task that honours its stop token (and records that it
// saw the stop in `marker`), and one that ignores it.
int cooperative_wait(int milliseconds, std::string marker, std::stop_token token);
int busy_forever();

// Failures.
void throw_standard(std::string type, std::string message);
struct custom_failure : std::runtime_error {
    using std::runtime_error::runtime_error;
};
void throw_custom(std::string message);

// coproc's own exceptions, thrown by a task (as one that uses a pool or a
// timeout of its own would let them escape). `type` names the class; each
// carries `message` (pool_closed and queue_full their own) and known
// accessor values: worker_died(1234, SIGSEGV, -1, "inner_function"),
// remote_error("inner::failure", message, 4321, "inner_function"),
// worker_start_failed(EMFILE), io_uring_unavailable(EPERM), and
// broken_process_pool with the cause std::invalid_argument("the cause").
// "derived" throws derived_pool_error, "registered derived"
// budget_exhausted(message).
void throw_coproc(std::string type, std::string message);
// A user type derived from coproc::error, not registered.
struct derived_pool_error : coproc::error {
    using coproc::error::error;
};
// A user type derived from coproc::error, registered to travel as itself.
struct budget_exhausted : coproc::error {
    budget_exhausted() : coproc::error("") {}
    explicit budget_exhausted(std::string account)
        : coproc::error(""), account(std::move(account)), message("the budget of " + this->account + " is exhausted") {}
    const char* what() const noexcept override { return message.c_str(); }
    std::string account;
    std::string message;
    template <class Archive>
    void serialize(Archive& archive) {
        archive(account, message);
    }
};

// Installs on the calling thread (and what it starts later) a seccomp
// filter under which creating a thread fails with EAGAIN, as it does at
// RLIMIT_NPROC or a cgroup's pids.max, while starting a process still works
// (clone3 answers ENOSYS, so glibc falls back to clone, whose flags the
// filter can see: CLONE_THREAD is refused). Returns whether it was installed.
bool deny_thread_creation();
// Run in a worker: denies thread creation to the worker's task thread, then
// returns pattern(size, 5), a large result the worker would keep as a spare.
std::string large_result_without_threads(std::size_t size);
int crash_segfault();
int crash_abort();
int crash_exit(int code);
int hang_forever();
int write_pid_and_hang(std::string path);
// Crashes its worker the first time (when `marker` does not exist yet, it
// creates it), returns `value` afterwards.
int crash_once(std::string marker, int value);
void send_garbage_frame();
void send_oversized_frame();
void send_frame_for_unknown_work();
// Adds one to the 32-bit counter `index` of the file `path` (mapped shared,
// once per worker) and returns 2 * value: how often each task ran.
int count_run(std::string path, int index, int value);
// count_run after sleeping `milliseconds`; returns the worker's pid.
int count_run_slowly(std::string path, int index, int milliseconds);
// count_run, then the worker kills itself (SIGKILL) at once, long before
// the watcher would have said START.
int count_run_then_die(std::string path, int index);
// CLOCK_MONOTONIC (the same clock in every process) when the task ran, in
// ns: tells in which order a worker ran tasks. `tag` is only passed along.
std::int64_t monotonic_ns(int tag);
// Progress (coproc::report_progress): reports 1, 2, ... `steps`, one every
// `milliseconds`, and returns `steps`.
int report_steps(int steps, int milliseconds);
// Reports 1, 2, 3, ... as fast as it can for `milliseconds` (at least
// `minimum` reports), and returns the number of reports made.
int report_chattily(int milliseconds, int minimum);
// Reports `value`, then throws std::runtime_error.
int report_then_fail(double value);
// Reports 1, 2, ... every 10 ms until its token is stopped, and 5 times more
// after that (a task that takes a moment to stop); returns the count.
int report_until_stopped(std::stop_token token);
// An initializer that reports progress (which does nothing there).
void initialize_reporting();

// This worker's resident memory in bytes (/proc/self/statm).
std::uint64_t resident_memory();
// Allocates `mebibytes` MiB, touches every page and keeps it for the rest of
// the worker's life (a leak, on purpose), then sleeps `milliseconds`;
// returns the worker's pid.
int hold_memory(int mebibytes, int milliseconds);
// Sends an ERROR frame for `work_id` whose payload does not decode, then hangs.
void send_undecodable_error(std::uint64_t work_id);
// Sends the header of a RESULT frame of `size` bytes for `work_id` and the
// first few bytes of it, then hangs without sending the rest.
void send_partial_frame(std::uint64_t work_id, std::uint32_t size);
// Sends, for its task `work_id`, a RESULT frame of 8 bytes claiming 2^40
// strings, then returns an honest (empty) result the parent no longer
// expects.
std::vector<std::string> send_lying_strings_result(std::uint64_t work_id);

// A value that serializes in the worker but cannot be read back in the
// parent, and its mirror that cannot be written in the worker.
struct unreadable {
    int value = 0;
    template <class Archive>
    void save(Archive& archive) const {
        archive(value);
    }
    template <class Archive>
    void load(Archive&) {
        throw std::runtime_error("this type refuses to be loaded");
    }
};
struct unwritable {
    int value = 0;
    template <class Archive>
    void save(Archive&) const {
        throw std::runtime_error("this type refuses to be saved");
    }
    template <class Archive>
    void load(Archive& archive) {
        archive(value);
    }
};
unreadable make_unreadable(int value);
unwritable make_unwritable(int value);
int take_unreadable(unreadable value);
int take_unwritable(unwritable value);

// A callable object whose state travels with the call.
struct scaler {
    int factor = 1;
    std::string unit;
    std::string operator()(int value) const { return std::to_string(value * factor) + unit; }
    template <class Archive>
    void serialize(Archive& archive) {
        archive(factor, unit);
    }
};

// A user exception type registered to travel as itself.
struct quota_exceeded : std::exception {
    quota_exceeded() = default;
    quota_exceeded(std::string who, int limit) : who(std::move(who)), limit(limit), message(this->who + " exceeded " + std::to_string(limit)) {}
    const char* what() const noexcept override { return message.c_str(); }
    std::string who;
    int limit = 0;
    std::string message;
    template <class Archive>
    void serialize(Archive& archive) {
        archive(who, limit, message);
    }
};
void exceed_quota(std::string who, int limit);

// Large payloads: `size` bytes of a pseudo-random pattern chosen by `seed`,
// and the input reversed with every byte complemented.
std::string pattern(std::size_t size, int seed);
std::string reverse_complement(std::string data);
// The first `size` bytes of `data`, each complemented; `second` with each
// byte complemented; the bytes of `data` as a vector of char.
std::string complement_prefix(std::string data, std::size_t size);
std::string complement_second(std::string first, std::string second);
std::vector<char> bytes_as_chars(std::string data);
// Run in a worker: coproc::detail::worker_blocks_reused() and
// worker_spare_bytes().
std::size_t blocks_reused_in_worker();
std::size_t spare_bytes_in_worker();
// Several arguments of a call, large and small, in one digest (FNV-1a over
// all their bytes, in order).
std::uint64_t digest_parts(std::string text, std::int32_t marker, std::vector<double> numbers, std::vector<std::byte> bytes);
// One block container as the only argument.
std::uint64_t digest_bytes(std::vector<std::byte> bytes);
std::uint64_t digest_text(std::string text);
double sum_doubles(std::vector<double> numbers);
// Creates the file named by `data` up to its first newline, and returns
// the size of `data`: a one-block call with a side effect to look for.
std::size_t record_block(std::string data);
// A vector from a memory resource: not a block container, copied at submit.
double sum_pmr_doubles(std::pmr::vector<double> numbers);
// A one-block function that also takes the task's stop token.
std::string echo_unless_stopped(std::string data, std::stop_token token);
// The same over a block, a vector of strings (not a block), and a block.
std::uint64_t digest_lines(std::string first, std::vector<std::string> lines, std::string last);
// A result with large blocks inside a tuple: pattern(size, seed), seed, and
// `size` / 8 numbers counting up from seed.
std::tuple<std::string, std::int32_t, std::vector<std::int64_t>> make_parts(std::size_t size, int seed);

// Sends by hand, for work id `work_id`, a RESULT frame holding a
// `size`-byte string (pattern(size, 1)): its header and first half at once,
// the rest after `pause_ms`, or never when `exit_code` >= 0 (the worker
// exits with that code instead). Then it hangs, so that the worker's own
// answer never follows.
std::string send_block_result_by_hand(std::uint64_t work_id, std::size_t size, int pause_ms, int exit_code);

// Transparent huge pages: the kernel's mode ("always", "madvise", "never",
// or "unavailable"); whether the mapping holding `address` may be backed by
// huge pages (THPeligible in /proc/self/smaps); and, run in a worker,
// whether a malloc block of `size` bytes may be.
std::string transparent_huge_page_mode();
bool huge_page_eligible(const void* address);
bool malloc_block_huge_page_eligible(std::size_t size);

// Streams (submit_stream, coproc::sink).
// Pushes 0, 1, ... n - 1.
void count_up(int n, coproc::sink<int>& out);
// Pushes 0 .. n - 1 and after each push writes how many it pushed to the
// file `path`: how far the task got, whatever the consumer took.
void push_counted(int n, std::string path, coproc::sink<int>& out);
// Pushes 0 .. n - 1, then waits for its stop token (30 s at most) and
// creates `marker` when it saw the stop.
void push_then_wait(int n, std::string marker, coproc::sink<int>& out, std::stop_token token);
// Pushes 0 .. n - 1, then its worker kills itself (SIGKILL).
void push_then_crash(int n, coproc::sink<int>& out);
// Pushes 0 .. n - 1, then throws std::runtime_error("failed after <n> items").
void push_then_throw(int n, coproc::sink<int>& out);
// Pushes 0 .. n - 1, then spins ignoring its stop token.
void push_then_ignore_stop(int n, coproc::sink<int>& out);
// Pushes 0, 1, ... for ever; when a push throws cancelled_error it creates
// `marker` and lets the error end the task.
void push_until_cancelled(std::string marker, coproc::sink<int>& out);
// Pushes 0 .. n - 1, sleeping `milliseconds` before each.
void push_slowly(int n, int milliseconds, coproc::sink<int>& out);
// Pushes n strings of `size` bytes: pattern(size, i) for the i-th.
void push_strings(int n, int size, coproc::sink<std::string>& out);
// Writes `count` ITEM frames for `work_id` by hand, ignoring the window,
// then hangs: a worker that breaks the protocol.
void send_items_by_hand(std::uint64_t work_id, int count, coproc::sink<int>& out);
// A plain task that writes an ITEM frame for `work_id` by hand, then hangs.
int send_item_for_plain_task(std::uint64_t work_id);

// Allocates `mebibytes` MiB (touching its first and last byte only) and
// returns the size: address space, hardly any resident memory.
std::size_t allocate_mebibytes(int mebibytes);

// Shared buffers (coproc::shared_buffer).
// The sum of the buffer's bytes.
std::uint64_t sum_shared(coproc::shared_buffer data);
// Adds one to every byte, in place; returns the worker's pid.
int increment_shared(coproc::shared_buffer data);
// out[i] = ~in[i].
void invert_shared(coproc::shared_buffer in, coproc::shared_buffer out);
// A new buffer of `size` bytes holding pattern(size, seed).
coproc::shared_buffer make_shared_pattern(std::size_t size, int seed);
// Whether a and b are one handle and one mapping in this worker.
bool same_shared(coproc::shared_buffer a, coproc::shared_buffer b);
// Where the worker has `data` mapped, and its first byte.
std::pair<std::uint64_t, int> shared_address(coproc::shared_buffer data);
// `parts` new buffers, each a copy of one slice of `data`.
std::vector<coproc::shared_buffer> split_shared(coproc::shared_buffer data, int parts);
// The total size of the buffers, and how many there are (size * 1000 + count).
std::uint64_t measure_shared(std::vector<coproc::shared_buffer> buffers);
// Writes 0xEE into the first byte, then its worker kills itself.
int crash_with_shared(coproc::shared_buffer data);
// The first time (no `marker` yet: it creates it) the worker kills itself;
// then returns the sum of the bytes.
std::uint64_t crash_once_with_shared(std::string marker, coproc::shared_buffer data);
// Waits for its stop token (30 s at most); returns the buffer's size.
std::uint64_t wait_with_shared(coproc::shared_buffer data, std::stop_token token);
// Pushes a shared buffer as a stream item (not supported: it throws).
void push_shared(coproc::sink<coproc::shared_buffer>& out);
// Writes a RESULT frame for `work_id` that claims a descriptor it does not
// send, then hangs.
coproc::shared_buffer send_result_claiming_descriptor(std::uint64_t work_id);

} // namespace pool_test

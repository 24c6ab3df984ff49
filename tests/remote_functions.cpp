#include "remote_functions.hpp"

#include <coproc/detail/wire.hpp>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <dirent.h>
#include <exception>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <filesystem>
#include <fstream>
#include <system_error>
#include <thread>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <atomic>
#include <memory>
#include <vector>

#include <coproc/progress.hpp>
#include <coproc/cancellation.hpp>
#include <coproc/worker.hpp>

COPROC_REGISTER_EXCEPTION(pool_test::quota_exceeded);
COPROC_REGISTER_EXCEPTION(pool_test::budget_exhausted);

namespace pool_test {

void exceed_quota(std::string who, int limit) { throw quota_exceeded(std::move(who), limit); }

std::string pattern(std::size_t size, int seed) {
    std::string data(size, '\0');
    std::uint32_t state = static_cast<std::uint32_t>(seed) * 2654435761U + 1;
    for (char& byte : data) {
        state = state * 1664525U + 1013904223U;
        byte = static_cast<char>(state >> 24);
    }
    return data;
}

std::string reverse_complement(std::string data) {
    std::reverse(data.begin(), data.end());
    for (char& byte : data) byte = static_cast<char>(~byte);
    return data;
}

std::string complement_prefix(std::string data, std::size_t size) {
    data.resize(std::min(size, data.size()));
    for (char& byte : data) byte = static_cast<char>(~byte);
    return data;
}

std::string complement_second(std::string first, std::string second) {
    (void)first;
    const std::size_t size = second.size();
    return complement_prefix(std::move(second), size);
}

std::vector<char> bytes_as_chars(std::string data) { return {data.begin(), data.end()}; }

std::size_t blocks_reused_in_worker() { return coproc::detail::worker_blocks_reused(); }
std::size_t spare_bytes_in_worker() { return coproc::detail::worker_spare_bytes(); }

std::uint64_t digest_parts(std::string text, std::int32_t marker, std::vector<double> numbers, std::vector<std::byte> bytes) {
    std::uint64_t hash = 14695981039346656037ULL;
    auto add = [&hash](const void* data, std::size_t size) {
        for (std::size_t i = 0; i < size; ++i) {
            hash ^= static_cast<const unsigned char*>(data)[i];
            hash *= 1099511628211ULL;
        }
    };
    add(text.data(), text.size());
    add(&marker, sizeof marker);
    add(numbers.data(), numbers.size() * sizeof(double));
    add(bytes.data(), bytes.size());
    return hash;
}

std::uint64_t digest_bytes(std::vector<std::byte> bytes) { return digest_parts({}, 0, {}, std::move(bytes)); }
std::uint64_t digest_text(std::string text) { return digest_parts(std::move(text), 0, {}, {}); }

std::size_t record_block(std::string data) {
    std::ofstream{data.substr(0, data.find('\n'))} << "ran\n";
    return data.size();
}

std::string echo_unless_stopped(std::string data, std::stop_token token) {
    if (token.stop_requested()) throw std::runtime_error("stopped");
    return data;
}

double sum_pmr_doubles(std::pmr::vector<double> numbers) {
    double sum = 0;
    for (double number : numbers) sum += number;
    return sum;
}

double sum_doubles(std::vector<double> numbers) {
    double sum = 0;
    for (double number : numbers) sum += number;
    return sum;
}

std::uint64_t digest_lines(std::string first, std::vector<std::string> lines, std::string last) {
    std::string all = std::move(first);
    for (const auto& line : lines) all += line;
    all += last;
    return digest_parts(std::move(all), 0, {}, {});
}

std::tuple<std::string, std::int32_t, std::vector<std::int64_t>> make_parts(std::size_t size, int seed) {
    std::vector<std::int64_t> numbers(size / 8);
    for (std::size_t i = 0; i < numbers.size(); ++i) numbers[i] = seed + static_cast<std::int64_t>(i);
    return {pattern(size, seed), seed, std::move(numbers)};
}

std::string send_block_result_by_hand(std::uint64_t work_id, std::size_t size, int pause_ms, int exit_code) {
    const std::string data = pattern(size, 1);
    const std::uint64_t count = size;
    const coproc::detail::wire::frame_header header{static_cast<std::uint32_t>(sizeof count + size),
                                                    static_cast<std::uint16_t>(coproc::detail::wire::frame_kind::result),
                                                    0, work_id};
    auto write_all = [](const void* bytes, std::size_t length) {
        const auto* at = static_cast<const char*>(bytes);
        while (length > 0) {
            const ssize_t written = ::write(3, at, length);
            if (written <= 0) std::_Exit(9);
            at += written;
            length -= static_cast<std::size_t>(written);
        }
    };
    write_all(&header, sizeof header);
    write_all(&count, sizeof count);
    write_all(data.data(), size / 2);
    if (exit_code >= 0) std::_Exit(exit_code);
    std::this_thread::sleep_for(std::chrono::milliseconds{pause_ms});
    write_all(data.data() + size / 2, size - size / 2);
    hang_forever();
    return {};
}

std::string transparent_huge_page_mode() {
    std::ifstream file{"/sys/kernel/mm/transparent_hugepage/enabled"};
    std::string line;
    if (!std::getline(file, line)) return "unavailable";
    const auto open = line.find('[');
    const auto close = line.find(']');
    if (open == std::string::npos || close == std::string::npos || close < open) return "unavailable";
    return line.substr(open + 1, close - open - 1);
}

bool huge_page_eligible(const void* address) {
    const auto wanted = reinterpret_cast<std::uintptr_t>(address);
    std::ifstream smaps{"/proc/self/smaps"};
    std::string line;
    bool inside = false;
    while (std::getline(smaps, line)) {
        unsigned long start = 0;
        unsigned long end = 0;
        if (std::sscanf(line.c_str(), "%lx-%lx ", &start, &end) == 2 && line.find(':') > line.find(' ')) {
            inside = start <= wanted && wanted < end;
            continue;
        }
        if (inside && line.starts_with("THPeligible:")) return line.find('1') != std::string::npos;
    }
    return false;
}

bool malloc_block_huge_page_eligible(std::size_t size) {
    void* block = std::malloc(size);
    if (block == nullptr) throw std::bad_alloc();
    std::memset(block, 1, size);
    const bool eligible = huge_page_eligible(block);
    std::free(block);
    return eligible;
}


int square(int x) { return x * x; }
int cube(int x) { return x * x * x; }
int add(int a, int b) { return a + b; }
int halve(int x) { return x / 2; }
double halve(double x) { return x / 2; }
int fail_at(int x, int bad) {
    if (x == bad) throw std::domain_error("bad input " + std::to_string(x));
    return x;
}

std::string greet(std::string name, int times) {
    std::string out;
    for (int i = 0; i < times; ++i) out += "hello " + name + ";";
    return out;
}

namespace {
std::string label_of_this_process;
int initializations = 0;
} // namespace

void initialize(std::string label) {
    label_of_this_process = std::move(label);
    ++initializations;
}

std::string initialized_label() { return label_of_this_process + " x" + std::to_string(initializations); }

void failing_initializer(std::string message) { throw std::runtime_error(message); }

int crashing_initializer() { std::abort(); }

int worker_pid() { return static_cast<int>(::getpid()); }

void sleep_ms(int milliseconds) { std::this_thread::sleep_for(std::chrono::milliseconds{milliseconds}); }

int sleep_then(int milliseconds, int value) {
    sleep_ms(milliseconds);
    return value;
}

int sleep_then_pid(int milliseconds) {
    sleep_ms(milliseconds);
    return static_cast<int>(::getpid());
}

std::string environment_variable(std::string name) {
    const char* value = std::getenv(name.c_str());
    return value == nullptr ? "<unset>" : value;
}

std::vector<int> open_descriptors() {
    std::vector<int> fds;
    DIR* dir = ::opendir("/proc/self/fd");
    const int own = ::dirfd(dir);
    while (::dirent* entry = ::readdir(dir)) {
        if (entry->d_name[0] == '.') continue;
        const int fd = std::atoi(entry->d_name);
        if (fd != own) fds.push_back(fd);
    }
    ::closedir(dir);
    return fds;
}

long thread_voluntary_switches() {
    std::ifstream status{"/proc/thread-self/status"};
    std::string line;
    while (std::getline(status, line)) {
        if (line.starts_with("voluntary_ctxt_switches:")) return std::stol(line.substr(line.find(':') + 1));
    }
    return -1;
}

std::vector<std::string> descriptor_targets() {
    std::vector<std::string> targets;
    for (const int fd : open_descriptors()) {
        char target[256] = {};
        const std::string link = "/proc/self/fd/" + std::to_string(fd);
        const ssize_t size = ::readlink(link.c_str(), target, sizeof target - 1);
        targets.push_back(std::to_string(fd) + " " + (size > 0 ? std::string(target, static_cast<std::size_t>(size)) : "?"));
    }
    return targets;
}

void write_to_stderr(std::string text) {
    std::fputs(text.c_str(), stderr);
    std::fflush(stderr);
}

void touch_file(std::string path) { std::ofstream{path} << "ran\n"; }

void throw_standard(std::string type, std::string message) {
    if (type == "invalid_argument") throw std::invalid_argument(message);
    if (type == "out_of_range") throw std::out_of_range(message);
    if (type == "domain_error") throw std::domain_error(message);
    if (type == "length_error") throw std::length_error(message);
    if (type == "logic_error") throw std::logic_error(message);
    if (type == "runtime_error") throw std::runtime_error(message);
    if (type == "range_error") throw std::range_error(message);
    if (type == "overflow_error") throw std::overflow_error(message);
    if (type == "underflow_error") throw std::underflow_error(message);
    if (type == "system_error") throw std::system_error(ENOENT, std::generic_category(), message);
    if (type == "int") throw 42;
}

void throw_custom(std::string message) { throw custom_failure(message); }

void throw_coproc(std::string type, std::string message) {
    if (type == "error") throw coproc::error(message);
    if (type == "timeout_error") throw coproc::timeout_error(message);
    if (type == "cancelled_error") throw coproc::cancelled_error(message);
    if (type == "pool_closed") throw coproc::pool_closed();
    if (type == "queue_full") throw coproc::queue_full();
    if (type == "broken_process_pool") {
        throw coproc::broken_process_pool(message, std::make_exception_ptr(std::invalid_argument("the cause")));
    }
    if (type == "worker_died") throw coproc::worker_died(1234, SIGSEGV, -1, "inner_function", message);
    if (type == "remote_error") throw coproc::remote_error("inner::failure", message, 4321, "inner_function");
    if (type == "worker_start_failed") throw coproc::worker_start_failed(EMFILE, message);
    if (type == "io_uring_unavailable") throw coproc::io_uring_unavailable(EPERM, message);
    if (type == "derived") throw derived_pool_error(message);
    if (type == "registered derived") throw budget_exhausted(message);
}

bool deny_thread_creation() {
#if defined(__x86_64__)
    constexpr unsigned arch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
    constexpr unsigned arch = AUDIT_ARCH_AARCH64;
#else
#error "add this architecture's AUDIT_ARCH value"
#endif
    // clone's flags are its first argument; their low 32 bits (little
    // endian: the first word of args[0]) hold CLONE_THREAD.
    ::sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(::seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, arch, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(::seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(::seccomp_data, args[0])),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_THREAD, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EAGAIN),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    ::sock_fprog program{static_cast<unsigned short>(std::size(filter)), filter};
    return ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 && ::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &program) == 0;
}

std::string large_result_without_threads(std::size_t size) {
    if (!deny_thread_creation()) throw std::runtime_error("cannot install the seccomp filter");
    return pattern(size, 5);
}

int cooperative_wait(int milliseconds, std::string marker, std::stop_token token) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds{milliseconds};
    while (std::chrono::steady_clock::now() < deadline) {
        if (token.stop_requested()) {
            std::ofstream{marker} << "stopped\n";
            return -1;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds{1});
    }
    return milliseconds;
}

int busy_forever() {
    volatile unsigned long spin = 0;
    for (;;) spin = spin + 1;
}

int crash_segfault() {
    std::raise(SIGSEGV);
    return 0;
}
int crash_abort() { std::abort(); }
int crash_exit(int code) { std::exit(code); }

int hang_forever() {
    for (;;) std::this_thread::sleep_for(std::chrono::seconds{1});
}

int crash_once(std::string marker, int value) {
    if (!std::filesystem::exists(marker)) {
        std::ofstream{marker} << "crashed once\n";
        std::abort();
    }
    return value;
}

int write_pid_and_hang(std::string path) {
    {
        std::ofstream out{path + ".tmp"};
        out << ::getpid() << "\n";
    }
    std::filesystem::rename(path + ".tmp", path);
    return hang_forever();
}

// The worker's socket to the parent is descriptor 3. These write frames the
// parent must reject, as a buggy or hostile worker would.
void send_garbage_frame() {
    coproc::detail::wire::frame_header header{4, 999, 0, 1};
    char bytes[sizeof header + 4] = {};
    std::memcpy(bytes, &header, sizeof header);
    [[maybe_unused]] auto written = ::write(3, bytes, sizeof bytes);
    hang_forever();
}

void send_oversized_frame() {
    coproc::detail::wire::frame_header header{0xFFFFFFF0u, 4, 0, 1};
    [[maybe_unused]] auto written = ::write(3, &header, sizeof header);
    hang_forever();
}

void send_frame_for_unknown_work() {
    coproc::detail::wire::frame_header header{0, 4, 0, 0xDEADBEEFu};
    [[maybe_unused]] auto written = ::write(3, &header, sizeof header);
    hang_forever();
}

int count_run(std::string path, int index, int value) {
    static std::string mapped_path;
    static std::atomic<std::uint32_t>* counters = nullptr;
    if (mapped_path != path) {
        const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
        if (fd < 0) throw std::system_error(errno, std::system_category(), "open " + path);
        struct ::stat status {};
        ::fstat(fd, &status);
        void* mapping = ::mmap(nullptr, static_cast<std::size_t>(status.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        ::close(fd);
        if (mapping == MAP_FAILED) throw std::system_error(errno, std::system_category(), "mmap " + path);
        counters = static_cast<std::atomic<std::uint32_t>*>(mapping);
        mapped_path = path;
    }
    // relaxed: the parent reads the counters after every task has ended
    // and its worker exited.
    counters[index].fetch_add(1, std::memory_order_relaxed);
    return 2 * value;
}

int count_run_slowly(std::string path, int index, int milliseconds) {
    std::this_thread::sleep_for(std::chrono::milliseconds{milliseconds});
    (void)count_run(std::move(path), index, 0);
    return static_cast<int>(::getpid());
}

int count_run_then_die(std::string path, int index) {
    (void)count_run(std::move(path), index, 0);
    std::raise(SIGKILL);
    return 0;
}

std::int64_t monotonic_ns(int tag) {
    (void)tag;
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int report_steps(int steps, int milliseconds) {
    for (int i = 1; i <= steps; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds{milliseconds});
        coproc::report_progress(i);
    }
    return steps;
}

int report_chattily(int milliseconds, int minimum) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds{milliseconds};
    int reports = 0;
    while (reports < minimum || std::chrono::steady_clock::now() < end) coproc::report_progress(++reports);
    return reports;
}

int report_then_fail(double value) {
    coproc::report_progress(value);
    throw std::runtime_error("failed after reporting progress");
}

int report_until_stopped(std::stop_token token) {
    int reports = 0;
    int after_stop = 0;
    while (after_stop < 5) {
        after_stop += token.stop_requested();
        coproc::report_progress(++reports);
        std::this_thread::sleep_for(std::chrono::milliseconds{10});
    }
    return reports;
}

void initialize_reporting() { coproc::report_progress(0.5); }

std::uint64_t resident_memory() {
    std::ifstream statm{"/proc/self/statm"};
    std::uint64_t size = 0;
    std::uint64_t resident = 0;
    statm >> size >> resident;
    return resident * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
}

int hold_memory(int mebibytes, int milliseconds) {
    static std::vector<std::unique_ptr<char[]>> kept;
    const std::size_t size = static_cast<std::size_t>(mebibytes) << 20;
    auto block = std::make_unique_for_overwrite<char[]>(size);
    for (std::size_t at = 0; at < size; at += 4096) block[at] = static_cast<char>(at);
    kept.push_back(std::move(block));
    std::this_thread::sleep_for(std::chrono::milliseconds{milliseconds});
    return static_cast<int>(::getpid());
}

void send_undecodable_error(std::uint64_t work_id) {
    coproc::detail::wire::frame_header header{3, static_cast<std::uint16_t>(coproc::detail::wire::frame_kind::error), 0,
                                              work_id};
    char bytes[sizeof header + 3] = {};
    std::memcpy(bytes, &header, sizeof header);
    [[maybe_unused]] auto written = ::write(3, bytes, sizeof bytes);
    hang_forever();
}

void send_partial_frame(std::uint64_t work_id, std::uint32_t size) {
    coproc::detail::wire::frame_header header{size, static_cast<std::uint16_t>(coproc::detail::wire::frame_kind::result), 0,
                                              work_id};
    char bytes[sizeof header + 8] = {};
    std::memcpy(bytes, &header, sizeof header);
    [[maybe_unused]] auto written = ::write(3, bytes, sizeof bytes);
    hang_forever();
}

std::vector<std::string> send_lying_strings_result(std::uint64_t work_id) {
    const std::uint64_t claimed = std::uint64_t{1} << 40;
    const coproc::detail::wire::frame_header header{sizeof claimed,
                                                    static_cast<std::uint16_t>(coproc::detail::wire::frame_kind::result),
                                                    0, work_id};
    char bytes[sizeof header + sizeof claimed];
    std::memcpy(bytes, &header, sizeof header);
    std::memcpy(bytes + sizeof header, &claimed, sizeof claimed);
    [[maybe_unused]] auto written = ::write(3, bytes, sizeof bytes);
    return {};
}

unreadable make_unreadable(int value) { return {value}; }
unwritable make_unwritable(int value) { return {value}; }
int take_unreadable(unreadable value) { return value.value; }
int take_unwritable(unwritable value) { return value.value; }

void count_up(int n, coproc::sink<int>& out) {
    for (int i = 0; i < n; ++i) out.push(i);
}

void push_counted(int n, std::string path, coproc::sink<int>& out) {
    for (int i = 0; i < n; ++i) {
        out.push(i);
        std::ofstream{path, std::ios::trunc} << i + 1 << '\n';
    }
}

void push_then_wait(int n, std::string marker, coproc::sink<int>& out, std::stop_token token) {
    for (int i = 0; i < n; ++i) out.push(i);
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds{30};
    while (!token.stop_requested() && std::chrono::steady_clock::now() < end) {
        std::this_thread::sleep_for(std::chrono::milliseconds{2});
    }
    if (token.stop_requested()) std::ofstream{marker} << "stopped\n";
}

void push_then_crash(int n, coproc::sink<int>& out) {
    for (int i = 0; i < n; ++i) out.push(i);
    ::kill(::getpid(), SIGKILL);
    hang_forever();
}

void push_then_throw(int n, coproc::sink<int>& out) {
    for (int i = 0; i < n; ++i) out.push(i);
    throw std::runtime_error("failed after " + std::to_string(n) + " items");
}

void push_then_ignore_stop(int n, coproc::sink<int>& out) {
    for (int i = 0; i < n; ++i) out.push(i);
    hang_forever();
}

void push_until_cancelled(std::string marker, coproc::sink<int>& out) {
    try {
        for (int i = 0;; ++i) out.push(i);
    } catch (const coproc::cancelled_error&) {
        std::ofstream{marker} << "cancelled while pushing\n";
        throw;
    }
}

void push_slowly(int n, int milliseconds, coproc::sink<int>& out) {
    for (int i = 0; i < n; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds{milliseconds});
        out.push(i);
    }
}

void push_strings(int n, int size, coproc::sink<std::string>& out) {
    for (int i = 0; i < n; ++i) out.push(pattern(static_cast<std::size_t>(size), i));
}

namespace {

// All in one write: the parent reads them in one go, with no consumer
// taking items (and granting credit) in between.
void write_item_frames(std::uint64_t work_id, int count) {
    coproc::detail::byte_buffer frames;
    for (int i = 0; i < count; ++i) {
        const auto offset =
            coproc::detail::wire::begin_frame(frames, coproc::detail::wire::frame_kind::item, work_id);
        coproc::detail::encode_into(frames, i);
        coproc::detail::wire::finish_frame(frames, offset);
    }
    [[maybe_unused]] auto written = ::write(3, frames.data(), frames.size());
}

} // namespace

void send_items_by_hand(std::uint64_t work_id, int count, coproc::sink<int>&) {
    write_item_frames(work_id, count);
    hang_forever();
}

int send_item_for_plain_task(std::uint64_t work_id) {
    write_item_frames(work_id, 1);
    return hang_forever();
}

std::size_t allocate_mebibytes(int mebibytes) {
    std::vector<char> block(static_cast<std::size_t>(mebibytes) << 20);
    block.front() = 1;
    block.back() = 1;
    // Escapes, so that no compiler elides the allocation (Clang does).
    asm volatile("" : : "r"(block.data()) : "memory");
    return block.size();
}

std::uint64_t sum_shared(coproc::shared_buffer data) {
    std::uint64_t sum = 0;
    for (const std::byte value : data.bytes()) sum += std::to_integer<std::uint8_t>(value);
    return sum;
}

int increment_shared(coproc::shared_buffer data) {
    for (std::byte& value : data.bytes()) value = static_cast<std::byte>(std::to_integer<std::uint8_t>(value) + 1);
    return static_cast<int>(::getpid());
}

void invert_shared(coproc::shared_buffer in, coproc::shared_buffer out) {
    const auto from = in.bytes();
    const auto to = out.bytes();
    for (std::size_t i = 0; i < from.size() && i < to.size(); ++i) to[i] = ~from[i];
}

coproc::shared_buffer make_shared_pattern(std::size_t size, int seed) {
    coproc::shared_buffer made{size};
    const std::string bytes = pattern(size, seed);
    if (size > 0) std::memcpy(made.data(), bytes.data(), size); // an empty buffer's data() is null
    return made;
}

std::pair<std::uint64_t, int> shared_address(coproc::shared_buffer data) {
    return {reinterpret_cast<std::uintptr_t>(data.data()), std::to_integer<int>(data.bytes()[0])};
}

bool same_shared(coproc::shared_buffer a, coproc::shared_buffer b) {
    // One mapping, not two of the same memfd (which would share writes too).
    return a.size() > 0 && a == b && a.data() == b.data();
}

std::vector<coproc::shared_buffer> split_shared(coproc::shared_buffer data, int parts) {
    std::vector<coproc::shared_buffer> slices;
    const std::size_t each = data.size() / static_cast<std::size_t>(parts);
    for (int i = 0; i < parts; ++i) {
        coproc::shared_buffer slice{each};
        std::memcpy(slice.data(), data.data() + static_cast<std::size_t>(i) * each, each);
        slices.push_back(slice);
    }
    return slices;
}

std::uint64_t measure_shared(std::vector<coproc::shared_buffer> buffers) {
    std::uint64_t total = 0;
    for (const auto& buffer : buffers) total += buffer.size();
    return total * 1000 + buffers.size();
}

int crash_with_shared(coproc::shared_buffer data) {
    data.bytes()[0] = std::byte{0xee};
    ::kill(::getpid(), SIGKILL);
    return hang_forever();
}

std::uint64_t crash_once_with_shared(std::string marker, coproc::shared_buffer data) {
    if (!std::filesystem::exists(marker)) {
        std::ofstream{marker} << "crashed\n";
        ::kill(::getpid(), SIGKILL);
        hang_forever();
    }
    return sum_shared(data);
}

std::uint64_t wait_with_shared(coproc::shared_buffer data, std::stop_token token) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds{30};
    while (!token.stop_requested() && std::chrono::steady_clock::now() < end) {
        std::this_thread::sleep_for(std::chrono::milliseconds{2});
    }
    return data.size();
}

void push_shared(coproc::sink<coproc::shared_buffer>& out) { out.push(coproc::shared_buffer{4096}); }

coproc::shared_buffer send_result_claiming_descriptor(std::uint64_t work_id) {
    coproc::detail::byte_buffer frame;
    const auto offset = coproc::detail::wire::begin_frame(frame, coproc::detail::wire::frame_kind::result, work_id,
                                                          coproc::detail::wire::with_descriptors(0, 1));
    coproc::detail::encode_into(frame, std::uint64_t{4096}, std::uint32_t{0});
    coproc::detail::wire::finish_frame(frame, offset);
    [[maybe_unused]] auto written = ::write(3, frame.data(), frame.size());
    hang_forever();
    return {};
}

} // namespace pool_test

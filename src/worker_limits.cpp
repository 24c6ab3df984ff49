// See worker_limits.hpp.
#include "worker_limits.hpp"

#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <string_view>

// AddressSanitizer and ThreadSanitizer reserve terabytes of address space.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define COPROC_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define COPROC_SANITIZED 1
#endif
#endif

namespace coproc::detail {

namespace {

// The first line of `path`, or empty when it cannot be read.
std::string first_line(const std::string& path) {
    std::ifstream file{path};
    std::string line;
    std::getline(file, line);
    return line;
}

// ", now <limit>" for a resource limit, "unlimited" included.
std::string current_limit(int resource) {
    ::rlimit limit{};
    if (::getrlimit(resource, &limit) != 0) return {};
    return limit.rlim_cur == RLIM_INFINITY ? ", now unlimited" : ", now " + std::to_string(limit.rlim_cur);
}

// The path of `file` of `controller` ("pids", "memory") in this process's
// cgroup, under cgroup v1 (/sys/fs/cgroup/<controller>/<path>) or v2
// (/sys/fs/cgroup/<path>), or empty when it has none.
std::string cgroup_file(std::string_view controller, std::string_view file) {
    // Built with append, not operator+: GCC 12 warns about operator+ on
    // these strings (-Wrestrict, GCC bug 105329) once inlined here.
    const auto joined = [](std::initializer_list<std::string_view> parts) {
        std::string text;
        for (const std::string_view part : parts) text.append(part);
        return text;
    };
    std::ifstream membership{"/proc/self/cgroup"}; // lines "id:controllers:path"; "0::path" under v2
    std::string line;
    std::string unified;
    while (std::getline(membership, line)) {
        const auto first = line.find(':');
        const auto second = line.find(':', first + 1);
        if (first == std::string::npos || second == std::string::npos) continue;
        const std::string_view listed = std::string_view{line}.substr(first + 1, second - first - 1);
        const std::string controllers = joined({",", listed, ","});
        std::string_view path = std::string_view{line}.substr(second + 1);
        if (path == "/") path = {};
        if (controllers == ",,") {
            unified = joined({"/sys/fs/cgroup", path, "/", file});
            continue;
        }
        if (controllers.find(joined({",", controller, ","})) == std::string::npos) continue;
        const std::string candidate = joined({"/sys/fs/cgroup/", controller, path, "/", file});
        if (!first_line(candidate).empty()) return candidate;
    }
    return !unified.empty() && !first_line(unified).empty() ? unified : std::string{};
}

} // namespace

std::string describe_thread_failure(std::string_view thread, const std::system_error& error, std::string_view consequence) {
    std::string text = "coproc: worker " + std::to_string(::getpid()) + " cannot start its " + std::string(thread) + " thread (" +
                       error.what() + "): ";
    if (error.code() == std::errc::resource_unavailable_try_again) {
        text += "a limit on threads was reached: RLIMIT_NPROC (ulimit -u" + current_limit(RLIMIT_NPROC) +
                "; it counts the threads of all the user's processes" +
                (::geteuid() == 0 ? std::string(", and does not apply to root, as this worker is") : std::string()) +
                "), kernel.threads-max "
                "(" + first_line("/proc/sys/kernel/threads-max") + ") or a cgroup's pids.max";
        if (const std::string pids = cgroup_file("pids", "pids.max"); !pids.empty()) {
            text += " (" + pids + " is " + first_line(pids) + ", pids.current " +
                    first_line(cgroup_file("pids", "pids.current")) + ")";
        }
    } else if (error.code() == std::errc::not_enough_memory) {
        text += "there is no memory for the thread's stack: RLIMIT_AS (ulimit -v" + current_limit(RLIMIT_AS) +
                "), the cgroup's memory.max or vm.max_map_count";
        std::string memory = cgroup_file("memory", "memory.max"); // v2
        if (memory.empty()) memory = cgroup_file("memory", "memory.limit_in_bytes"); // v1
        if (!memory.empty()) text += " (" + memory + " is " + first_line(memory) + ")";
    } else {
        text += "the system refused a new thread";
    }
    text += "; " + std::string(consequence) + "\n";
    return text;
}

std::uint64_t apply_address_space_limit() {
    const char* variable = std::getenv("COPROC_ADDRESS_SPACE_LIMIT");
    if (variable == nullptr) return 0;
    const std::uint64_t limit = std::strtoull(variable, nullptr, 10);
    if (limit == 0) return 0;
#ifdef COPROC_SANITIZED
    std::fprintf(stderr, "coproc: worker %d ignores worker_address_space_limit: it runs under a sanitizer, which "
                         "reserves more address space than any limit would allow\n",
                 static_cast<int>(::getpid()));
    return 0;
#endif
    ::rlimit wanted{};
    ::getrlimit(RLIMIT_AS, &wanted);
    // Lower only: an unprivileged worker cannot raise its hard limit.
    const rlim_t value = static_cast<rlim_t>(limit);
    if (wanted.rlim_max != RLIM_INFINITY && value > wanted.rlim_max) {
        std::fprintf(stderr, "coproc: worker %d cannot set an address-space limit of %llu bytes: its hard RLIMIT_AS is %llu\n",
                     static_cast<int>(::getpid()), static_cast<unsigned long long>(limit),
                     static_cast<unsigned long long>(wanted.rlim_max));
        return 0;
    }
    wanted.rlim_cur = value;
    if (::setrlimit(RLIMIT_AS, &wanted) != 0) {
        std::fprintf(stderr, "coproc: worker %d cannot set RLIMIT_AS to %llu bytes: %s\n", static_cast<int>(::getpid()),
                     static_cast<unsigned long long>(limit), std::strerror(errno));
        return 0;
    }
    return limit;
}

int usable_cpus() noexcept {
    ::cpu_set_t set;
    CPU_ZERO(&set);
    if (::sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
    const long online = ::sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? static_cast<int>(online) : 1;
}

} // namespace coproc::detail

// Context switches of a process, all its threads, from /proc: what a
// benchmark divides by its task or message count to give the cost of one
// task in wake-ups, beside its time. Shared by coproc_bench and
// plain_socketpair; Linux only, like the rest of coproc.
//
//   voluntary     the thread blocked (recv, futex, io_uring_enter) and was
//                 switched out: in a round trip, roughly one per wake-up.
//   involuntary   the thread was preempted while runnable: on one core, the
//                 peer it just woke running in its place.
#pragma once

#include <dirent.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace bench {

struct switch_counts {
    long long voluntary = 0;
    long long involuntary = 0;

    switch_counts& operator+=(const switch_counts& other) {
        voluntary += other.voluntary;
        involuntary += other.involuntary;
        return *this;
    }
    friend switch_counts operator-(switch_counts a, const switch_counts& b) {
        a.voluntary -= b.voluntary;
        a.involuntary -= b.involuntary;
        return a;
    }
};

// The sum over every thread of `pid` (/proc/PID/task/*/status), threads that
// exited meanwhile excepted. Zero when the process is gone.
inline switch_counts threads_switches(int pid) {
    switch_counts total;
    const std::string tasks = "/proc/" + std::to_string(pid) + "/task";
    DIR* directory = ::opendir(tasks.c_str());
    if (directory == nullptr) return total;
    while (const dirent* entry = ::readdir(directory)) {
        if (entry->d_name[0] == '.') continue;
        std::ifstream status{tasks + "/" + entry->d_name + "/status"};
        std::string line;
        while (std::getline(status, line)) {
            if (line.rfind("voluntary_ctxt_switches:", 0) == 0) total.voluntary += std::stoll(line.substr(24));
            if (line.rfind("nonvoluntary_ctxt_switches:", 0) == 0) total.involuntary += std::stoll(line.substr(27));
        }
    }
    ::closedir(directory);
    return total;
}

// The children of this process (of any of its threads): the pool's workers,
// or the plain anchor's peer.
inline std::vector<int> child_pids() {
    std::vector<int> pids;
    const std::string tasks = "/proc/" + std::to_string(::getpid()) + "/task";
    DIR* directory = ::opendir(tasks.c_str());
    if (directory == nullptr) return pids;
    while (const dirent* entry = ::readdir(directory)) {
        if (entry->d_name[0] == '.') continue;
        std::ifstream children{tasks + "/" + entry->d_name + "/children"};
        int pid = 0;
        while (children >> pid) pids.push_back(pid);
    }
    ::closedir(directory);
    return pids;
}

// This process's switches and its children's, at one moment.
struct switch_snapshot {
    switch_counts parent;
    switch_counts children;

    static switch_snapshot now() {
        switch_snapshot snapshot;
        snapshot.parent = threads_switches(::getpid());
        for (const int pid : child_pids()) snapshot.children += threads_switches(pid);
        return snapshot;
    }
};

// `"parent_switches": [v, i], "worker_switches": [v, i]` per unit of work
// between two snapshots: a JSON fragment, without braces.
inline std::string switches_json(const switch_snapshot& before, const switch_snapshot& after, double units,
                                 const char* children_name) {
    const switch_counts parent = after.parent - before.parent;
    const switch_counts children = after.children - before.children;
    char text[256];
    std::snprintf(text, sizeof text, "\"parent_switches\": [%.3f, %.3f], \"%s_switches\": [%.3f, %.3f]",
                  static_cast<double>(parent.voluntary) / units, static_cast<double>(parent.involuntary) / units,
                  children_name, static_cast<double>(children.voluntary) / units,
                  static_cast<double>(children.involuntary) / units);
    return text;
}

} // namespace bench

#!/usr/bin/env python3
"""The process pool on both event-loop backends, side by side in one run:
coproc_bench's latency, throughput and echo workloads with
COPROC_BACKEND=io_uring and COPROC_BACKEND=epoll, interleaved round by round
(the order alternates), beside the plain socket-pair anchors of the same
rounds. Optionally pinned to one core (taskset -c 0; the workers inherit
it) as well as free.

usage: bench/backends.py --build build-bench [--rounds 5] [--quick]
                          [--placements free,pinned] [--results bench/RESULTS.md]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

from harness import machine, replace_section  # the same machine line as the full run

SECTION = "## The process pool on both backends (io_uring, epoll)"
WORKLOADS = [
    # (coproc workload, plain workload, metric, plain metric, unit, higher is better)
    ("latency", "latency", "p50_us", "p50_us", "us", False),
    ("latency", "latency", "p99_us", "p99_us", "us", False),
    ("throughput", "pipelined", "tasks_per_s", "messages_per_s", "tasks/s", True),
    ("echo", "bulk", "gib_per_s", "gib_per_s", "GiB/s", True),
    ("echo", "bulk", "repeat_gib_per_s", "repeat_gib_per_s", "GiB/s", True),
]


def run_json(command, env=None, timeout=600):
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_line():
    m = machine()
    return f"{m['cpu']}, {m['nproc']} CPUs, Linux {m['kernel']}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--placements", default="free,pinned")
    parser.add_argument("--results")
    options = parser.parse_args()
    coproc = os.path.join(options.build, "bench", "coproc_bench")
    plain = os.path.join(options.build, "bench", "plain_socketpair")
    quick = ["--quick"] if options.quick else []
    placements = options.placements.split(",")
    samples = {}  # (placement, system, workload) -> [result]
    for round_index in range(options.rounds):
        backends = ["io_uring", "epoll"] if round_index % 2 == 0 else ["epoll", "io_uring"]
        for placement in placements:
            prefix = ["taskset", "-c", "0"] if placement == "pinned" else []
            for workload in ("latency", "pipelined", "bulk"):
                result = run_json(prefix + [plain] + quick + [workload])
                samples.setdefault((placement, "plain", workload), []).append(result)
            for backend in backends:
                env = dict(os.environ, COPROC_BACKEND=backend)
                for workload in ("latency", "throughput", "echo"):
                    result = run_json(prefix + [coproc] + quick + [workload], env=env)
                    samples.setdefault((placement, backend, workload), []).append(result)
                    print(f"round {round_index + 1}/{options.rounds} {placement:6} {backend:8} {workload:10} "
                          f"{json.dumps(result)}", flush=True)

    def median(placement, system, workload, metric):
        values = [s[metric] for s in samples.get((placement, system, workload), []) if metric in s]
        return statistics.median(values) if values else None

    lines = []
    for placement in placements:
        lines += [f"**{placement}** ({'all processes on CPU 0 (taskset -c 0)' if placement == 'pinned' else 'free on both CPUs'}), medians of {options.rounds} rounds:", "",
                  "| figure | plain | io_uring | epoll | io_uring / plain | epoll / plain | epoll / io_uring |",
                  "|---|---|---|---|---|---|---|"]
        for workload, plain_workload, metric, plain_metric, unit, higher in WORKLOADS:
            p = median(placement, "plain", plain_workload, plain_metric)
            u = median(placement, "io_uring", workload, metric)
            e = median(placement, "epoll", workload, metric)

            def ratio(a, b):
                return f"{a / b:.2f}" if a is not None and b else "-"

            def fmt(v):
                return "-" if v is None else (f"{v:,.1f}" if v >= 10 else f"{v:.3f}")
            lines.append(f"| {workload} {metric} ({unit}, {'higher' if higher else 'lower'} is better) | {fmt(p)} | "
                         f"{fmt(u)} | {fmt(e)} | {ratio(u, p)} | {ratio(e, p)} | {ratio(e, u)} |")
        lines.append("")
    print("\n".join(lines))
    if options.results:
        command = f"bench/backends.py --build {options.build} --rounds {options.rounds}" + (" --quick" if options.quick else "")
        load = os.getloadavg()
        section = [SECTION, "",
                   f"Machine: {machine_line()}. Command: `{command}`. Load average at the end: "
                   f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}.", ""] + lines + [
                   "What the figures say: bench/README.md, \"The process pool on both backends\".", ""]
        replace_section(options.results, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

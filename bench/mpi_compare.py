#!/usr/bin/env python3
"""coproc's MPI workers (bench/mpi_bench.cpp) against mpi4py.futures
(bench/mpi4py_bench.py) on the same workloads, side by side in one run.

"Ranks" here are worker ranks: R worker ranks is `mpiexec -n R+1` (rank 0
submits, ranks 1..R serve), for both systems. Per R, three systems:

  coproc 1/rank   max_workers = 0, mpi::placement({.workers_per_rank = 1}):
                  one worker per agent rank, so one task at a time per rank,
                  as an mpi4py.futures worker rank runs. The fair comparison.
  coproc N/rank   workers_per_rank = 0 (the default): as many workers per
                  agent as its CPUs.
  mpi4py.futures  `python -m mpi4py.futures bench/mpi4py_bench.py`, Debian's
                  python3-mpi4py: its static pool of R worker ranks.

Workloads: no-op tasks (all submitted, then all awaited; tasks/s), map over
small ints with chunksize 1 and 100 (items/s), and, to show what those are
made of, the round trip of one no-op task at a time (p50, us). Counts differ
per system (coproc is given more work) so that each measurement lasts about a second;
the rates are what is compared. Rounds rotate the order of the systems;
every mpiexec run is bounded by --timeout. Reported: the median of the
rounds and the range.

    bench/mpi_compare.py --mpi-bench build/bench/mpi_bench [--ranks 1,2,3] [--rounds 3]
                         [--results bench/RESULTS.md] [--json out.json]
    bench/mpi_compare.py --smoke --mpi-bench build/bench/mpi_bench   (tiny counts, no timing checks)
"""
import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time

from harness import replace_section  # RESULTS.md sections, as the full run writes them

HERE = os.path.dirname(os.path.abspath(__file__))
SECTION = "## Beyond one machine (MPI)"
MPIEXEC_ARGS = "--oversubscribe --mca btl tcp,self --mca btl_tcp_if_include lo"
# (workload key, label): the columns, in order.
WORKLOADS = [("tasks", "no-op tasks/s"), ("map/1", "map chunksize 1, items/s"), ("map/100", "map chunksize 100, items/s")]
# The work each system gets: tasks, chunksize:items for map, sequential round trips.
COUNTS = {
    "full": {"coproc": (100_000, "1:100000,100:2000000", 2_000), "mpi4py": (5_000, "1:5000,100:200000", 500)},
    "smoke": {"coproc": (200, "1:200,100:2000", 50), "mpi4py": (100, "1:100,100:2000", 20)},
}
GOAL = 10.0  # coproc's tasks/s at least this many times mpi4py.futures'


def systems(args, counts):
    def workload_args(system):
        tasks, maps, latency = counts[system]
        return ["--tasks", str(tasks), "--map", maps, "--latency", str(latency)]
    found = [
        ("coproc 1/rank", [args.mpi_bench, "--workers-per-rank", "1"] + workload_args("coproc")),
        ("coproc N/rank", [args.mpi_bench, "--workers-per-rank", "0"] + workload_args("coproc")),
    ]
    if args.with_mpi4py:
        found.append(("mpi4py.futures", [args.python, "-m", "mpi4py.futures", os.path.join(HERE, "mpi4py_bench.py")]
                      + workload_args("mpi4py")))
    return found


def run_one(args, worker_ranks, command):
    """One mpiexec run: its JSON lines, keyed by workload. Raises on failure or timeout."""
    full = [args.mpiexec, "-n", str(worker_ranks + 1)] + shlex.split(args.mpiexec_args) + command
    env = dict(os.environ)
    if os.geteuid() == 0:  # Open MPI refuses root unless told twice
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # Its own session, so that a timeout takes down mpiexec, every rank and every worker.
    process = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise RuntimeError(f"timed out after {args.timeout} s: {' '.join(full)}")
    if process.returncode != 0:
        raise RuntimeError(f"exit status {process.returncode}: {' '.join(full)}\n{err.strip()}")
    results = {}
    for line in out.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        key = record["workload"] + (f"/{record['chunksize']}" if record["workload"] == "map" else "")
        results[key] = record
    missing = [key for key, _ in WORKLOADS + [("latency", "")] if key not in results]
    if missing:
        raise RuntimeError(f"no figure for {', '.join(missing)}: {' '.join(full)}\n{out}{err}")
    first = results["tasks"]
    if first["workers_seen"] != first["workers"]:
        raise RuntimeError(f"{first['workers_seen']} of {first['workers']} workers answered: {' '.join(full)}")
    return results


def fmt(value):
    return f"{value:,.0f}"


def with_range(values):
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def load_average():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def source_state():
    """The commit measured, and whether the working tree differed from it."""
    try:
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {commit}" + (" with uncommitted changes" if dirty else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mpi-bench", default=os.path.join("build", "bench", "mpi_bench"))
    parser.add_argument("--mpiexec", default="mpiexec")
    parser.add_argument("--mpiexec-args", default=MPIEXEC_ARGS, help=f"given to every mpiexec (default: {MPIEXEC_ARGS})")
    parser.add_argument("--python", default="/usr/bin/python3", help="a Python with mpi4py (Debian's python3-mpi4py)")
    parser.add_argument("--ranks", default=None, help="worker ranks to run, comma-separated (default 1,2,3; smoke 1,2)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3; smoke 1")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per mpiexec run")
    parser.add_argument("--smoke", action="store_true", help="tiny counts, one round, no timing checks")
    parser.add_argument("--results", help="write the section into this Markdown file (replacing an older one)")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args()
    ranks = [int(r) for r in (args.ranks or ("1,2" if args.smoke else "1,2,3")).split(",")]
    rounds = args.rounds or (1 if args.smoke else 3)
    counts = COUNTS["smoke" if args.smoke else "full"]

    probe = subprocess.run([args.python, "-c", "import mpi4py.futures"], capture_output=True)
    args.with_mpi4py = probe.returncode == 0
    if not args.with_mpi4py:
        if not args.smoke:
            sys.exit(f"mpi_compare: {args.python} has no mpi4py (Debian: apt-get install python3-mpi4py)")
        print(f"mpi_compare: {args.python} has no mpi4py: only coproc is checked", file=sys.stderr)
    load_before = load_average()

    samples = {}  # (worker ranks, system) -> [results of one run]
    candidates = systems(args, counts)
    for round_index in range(rounds):
        for worker_ranks in ranks:
            shift = round_index % len(candidates)
            for name, command in candidates[shift:] + candidates[:shift]:
                results = run_one(args, worker_ranks, command)
                samples.setdefault((worker_ranks, name), []).append(results)
                print(f"round {round_index + 1} ranks {worker_ranks} {name:15} "
                      + "  ".join(f"{key} {results[key]['per_s']:>12,.0f}/s" for key, _ in WORKLOADS)
                      + f"  round trip p50 {results['latency']['p50_us']:,.0f} us", file=sys.stderr, flush=True)
    load_after = load_average()

    names = [name for name, _ in candidates]
    table = ["| worker ranks | system | workers | " + " | ".join(label for _, label in WORKLOADS)
             + " | round trip p50 (us) |", "|---|---|---|" + "---|" * (len(WORKLOADS) + 1)]
    ratios = ["| worker ranks | coproc | " + " | ".join(f"{label.split(',')[0]}" for _, label in WORKLOADS)
              + " | round trip p50 |", "|---|---|" + "---|" * (len(WORKLOADS) + 1)]
    goals = ["| goal | worker ranks | measured: median ratio (range of the per-round ratios) | met |", "|---|---|---|---|"]
    for worker_ranks in ranks:
        medians = {}
        for name in names:
            runs = samples[(worker_ranks, name)]
            per_key = {key: [run[key]["per_s"] for run in runs] for key, _ in WORKLOADS}
            per_key["latency"] = [run["latency"]["p50_us"] for run in runs]
            medians[name] = {key: statistics.median(values) for key, values in per_key.items()}
            table.append(f"| {worker_ranks} | {name} | {runs[0]['tasks']['workers']} | "
                         + " | ".join(with_range(per_key[key]) for key, _ in WORKLOADS)
                         + f" | {with_range(per_key['latency'])} |")
        if not args.with_mpi4py:
            continue
        mpi4py = medians["mpi4py.futures"]
        for name in names[:2]:
            ratios.append(f"| {worker_ranks} | {name} | "
                          + " | ".join(f"{medians[name][key] / mpi4py[key]:.1f}x" for key, _ in WORKLOADS)
                          + f" | {mpi4py['latency'] / medians[name]['latency']:.1f}x shorter |")
        # Per round: coproc 1/rank's tasks/s over mpi4py's in the same round.
        fair = [c["tasks"]["per_s"] / m["tasks"]["per_s"]
                for c, m in zip(samples[(worker_ranks, "coproc 1/rank")], samples[(worker_ranks, "mpi4py.futures")])]
        ratio = medians["coproc 1/rank"]["tasks"] / mpi4py["tasks"]
        spread = f" ({min(fair):.1f}x-{max(fair):.1f}x)" if len(fair) > 1 else ""
        goals.append(f"| coproc 1/rank no-op tasks/s at least {GOAL:g}x mpi4py.futures' | {worker_ranks} | "
                     f"{ratio:.1f}x{spread} | {'yes' if ratio >= GOAL else '**no**'} |")

    output = table
    if args.with_mpi4py:
        output += ["", "coproc against mpi4py.futures (ratio of the medians):", ""] + ratios
    if args.with_mpi4py and not args.smoke:  # smoke counts are too small for the goal to mean anything
        output += [""] + goals
    print("\n".join(output))
    machine = (f"{os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}; date {time.strftime('%Y-%m-%d %H:%M')}; "
               f"{source_state()}; load average before {load_before}, after {load_after}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine, "command": sys.argv,
                       "samples": {f"{r}/{n}": runs for (r, n), runs in samples.items()}}, out, indent=1)
    if args.smoke:
        print(f"mpi smoke: {len(samples)} system/rank pairs ran, figures mean nothing")
    if args.results and not args.smoke:
        command = "bench/mpi_compare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        section = [SECTION, "", f"Machine: {machine}. Command: `{command}`; {rounds} rounds, the systems in rotated "
                   "order. Each mpiexec run: `mpiexec -n R+1 " + args.mpiexec_args + " ...` (R worker ranks). "
                   "Figures: median of the rounds (min-max).", "",
                   "coproc 1/rank: one worker per agent rank (as an mpi4py.futures worker rank, which runs one task "
                   "at a time): the fair comparison. coproc N/rank: as many workers per agent as its CPUs (the "
                   "default; each agent's CPUs are those mpiexec's binding leaves it, sched_getaffinity). Counts: coproc "
                   f"{counts['coproc'][0]:,} tasks, map {counts['coproc'][1]}, {counts['coproc'][2]:,} round trips; "
                   f"mpi4py.futures {counts['mpi4py'][0]:,} tasks, map {counts['mpi4py'][1]}, "
                   f"{counts['mpi4py'][2]:,} round trips (map: chunksize:items). Every process of every run shares the "
                   "machine's CPUs with the others and with whatever else runs there.", ""]
        section += output + ["", "How to run it and what the figures say: bench/README.md, \"Beyond one machine (MPI)\".", ""]
        replace_section(args.results, SECTION, section)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as failure:
        sys.exit(f"mpi_compare: {failure}")

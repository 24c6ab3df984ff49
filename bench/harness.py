#!/usr/bin/python3
"""Runs every benchmark workload for every system, interleaved, and writes
RESULTS.md, results.json and plot.png into the output directory.

    harness.py --build DIR --out DIR [--smoke] [--rounds N]

Systems: the plain socket-pair programs (the physical limit), coproc,
Python's ProcessPoolExecutor and loky's reusable executor (when joblib is
installed). Each (workload, system) pair runs --rounds times, in rotation,
and the median is reported. Latency and throughput run in two placements,
each beside the plain anchor in the same round: free on every core, and
all processes on one core (`taskset -c 0`; workers and the plain peer
inherit it), reported as the workloads `latency_one_core` and
`throughput_one_core`. --smoke runs tiny sizes once: it checks the
harness, not speed, and its figures mean nothing.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = "/usr/bin/python3"  # Debian's python3: the anchor users would have

# Context switches per task (per message for plain), all threads, from
# /proc: of the parent, and of the workers (plain: of its peer).
SWITCHES = [
    ("parent_voluntary_cs", "switches/task", False),
    ("parent_involuntary_cs", "switches/task", False),
    ("worker_voluntary_cs", "switches/task", False),
    ("worker_involuntary_cs", "switches/task", False),
]

# (workload, metric, unit, higher is better)
WORKLOADS = [
    ("latency", "p50_us", "us", False),
    ("latency", "p99_us", "us", False),
    *[("latency", metric, unit, higher) for metric, unit, higher in SWITCHES],
    ("latency_one_core", "p50_us", "us", False),
    ("latency_one_core", "p99_us", "us", False),
    *[("latency_one_core", metric, unit, higher) for metric, unit, higher in SWITCHES],
    ("throughput", "tasks_per_s", "tasks/s", True),
    *[("throughput", metric, unit, higher) for metric, unit, higher in SWITCHES],
    ("throughput_one_core", "tasks_per_s", "tasks/s", True),
    *[("throughput_one_core", metric, unit, higher) for metric, unit, higher in SWITCHES],
    ("map", "items_per_s", "items/s", True),
    ("echo", "gib_per_s", "GiB/s", True),
    ("echo", "repeat_gib_per_s", "GiB/s", True),
    ("shared_echo", "gib_per_s", "GiB/s", True),
    ("shared_echo", "repeat_gib_per_s", "GiB/s", True),
    ("startup", "first_result_ms", "ms", False),
    ("startup", "start_to_shutdown_ms", "ms", False),
    ("cpu", "speedup", "x", True),
    ("memory", "bytes_per_future", "bytes", False),
    ("mixed", "p50_ms", "ms", False),
    ("mixed", "p99_ms", "ms", False),
    ("mixed", "max_ms", "ms", False),
    ("instructions", "per_round_trip", "instructions", False),
    ("instructions", "worker_per_round_trip", "instructions", False),
]

# Where the processes may run: the workload's name suffix and the command prefix.
PLACEMENTS = {"": [], "_one_core": ["taskset", "-c", "0"]}
PLACED = ("latency", "throughput")

# memory_costs' figures (ms), and what each one is.
COST_FIELDS = {
    "fresh_4k_copy_ms": "copy into a new malloc block (4 KiB pages, faulted in and zeroed on first touch)",
    "fresh_huge_copy_ms": "copy into a new mapping advised MADV_HUGEPAGE",
    "reused_copy_ms": "copy into a buffer already touched",
    "memfd_write_ms": "write into a new memfd (shared memory, first use)",
    "socket_round_trip_ms": "to a peer process and back over a socket pair, buffers already touched",
}
# coproc_bench echo's pieces, timed alone.
ECHO_FIELDS = {
    "coproc_encode_ms": "coproc: serialize the std::string into a frame buffer (what an lvalue argument costs; "
                        "the echo moves its argument, which is sent in place)",
    "coproc_decode_ms": "coproc: deserialize it into a new std::string (one copy, into memory advised for huge pages)",
}

# The plain programs' counterpart of each workload.
PLAIN = {"latency": "latency", "throughput": "pipelined", "echo": "bulk", "shared_echo": "bulk"}
PLAIN_METRIC = {"tasks_per_s": "messages_per_s"}


def loky_available():
    return subprocess.run([PYTHON, "-c", "import joblib.externals.loky"], capture_output=True).returncode == 0


def run_json(command, timeout=900):
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def flatten_switches(result):
    """coproc_bench's and plain_socketpair's switch counts, [voluntary,
    involuntary] per task, as the metrics of SWITCHES (plain's peer in the
    worker's place)."""
    for side, key in (("parent", "parent_switches"), ("worker", "worker_switches"), ("worker", "peer_switches")):
        if key in result:
            result[f"{side}_voluntary_cs"], result[f"{side}_involuntary_cs"] = result[key]
    return result


def callgrind_total(path):
    with open(path) as profile:
        summary = [line for line in profile if line.startswith("summary:") or line.startswith("totals:")]
    return int(summary[-1].split()[1]) if summary else None


def callgrind_instructions(bench, smoke):
    """Instructions per no-op round trip, in the parent and in the workers
    (callgrind follows them: --trace-children): the difference of two runs
    with different round counts, divided by the difference, which cancels
    start-up and shutdown."""
    if shutil.which("valgrind") is None:
        return None
    parent, workers = [], []
    counts = (50, 150) if smoke else (500, 2500)
    for count in counts:
        prefix = os.path.join("/tmp", f"coproc-callgrind-{os.getpid()}-{count}")
        process = subprocess.Popen(["valgrind", "--tool=callgrind", "--trace-children=yes",
                                    f"--callgrind-out-file={prefix}.%p", bench, "roundtrips", str(count)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, stderr = process.communicate(timeout=900)
        if process.returncode != 0:
            raise RuntimeError(f"callgrind failed: {stderr[-2000:]}")
        directory, stem = os.path.split(prefix)
        worker_total = 0
        for name in os.listdir(directory):
            if not name.startswith(stem + "."):
                continue
            path = os.path.join(directory, name)
            total = callgrind_total(path)
            os.remove(path)
            if name == f"{stem}.{process.pid}":
                parent.append(total)
            elif total is None:
                raise RuntimeError(f"callgrind: a worker of {bench} left no profile (killed before it exited?)")
            else:
                worker_total += total
        workers.append(worker_total)
    span = counts[1] - counts[0]
    return {"per_round_trip": (parent[1] - parent[0]) / span, "worker_per_round_trip": (workers[1] - workers[0]) / span}


def replace_section(path, title, lines):
    """Writes `lines` as the section headed `title` (a "## ..." line, the
    first of `lines`) of the Markdown file at `path`: in place of that
    section if the file has it (up to the next "## "), else at its end."""
    text = open(path).read() if os.path.exists(path) else ""
    start = text.find(title)
    if start >= 0:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + "\n".join(lines) + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines)
    with open(path, "w") as out:
        out.write(text)


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": model,
            "date": datetime.date.today().isoformat()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    rounds = 1 if options.smoke else options.rounds
    quick = ["--quick"] if options.smoke else []
    coproc_bench = os.path.join(options.build, "bench", "coproc_bench")
    plain = os.path.join(options.build, "bench", "plain_socketpair")
    memory_costs = os.path.join(options.build, "bench", "memory_costs")
    python_bench = os.path.join(HERE, "python_bench.py")
    systems = ["plain", "coproc", "python"] + (["loky"] if loky_available() else [])
    if "loky" not in systems:
        print("loky: joblib is not installed (Debian package python3-joblib); its column is skipped")

    samples = {}  # (workload, system) -> list of result dicts

    def record(workload, system, result):
        samples.setdefault((workload, system), []).append(result)

    workload_names = ["latency", "throughput", "map", "echo", "shared_echo", "startup", "cpu", "memory", "mixed"]
    for round_index in range(rounds):
        for workload in workload_names:
            for suffix, prefix in (PLACEMENTS.items() if workload in PLACED else [("", [])]):
                for system in systems:
                    if system == "plain":
                        if workload not in PLAIN:
                            continue
                        result = run_json(prefix + [plain] + quick + [PLAIN[workload]])
                        for ours, theirs in PLAIN_METRIC.items():
                            if theirs in result:
                                result[ours] = result[theirs]
                    elif system == "coproc":
                        result = run_json(prefix + [coproc_bench] + quick + [workload])
                    else:
                        if workload in ("memory", "shared_echo"):  # no counterpart in Python's executors
                            continue
                        kind = "cpython" if system == "python" else "loky"
                        result = run_json(prefix + [PYTHON, python_bench] + quick + [kind, workload])
                    flatten_switches(result)
                    record(workload + suffix, system, result)
                    print(f"round {round_index + 1}/{rounds} {workload + suffix:19} {system:7} {json.dumps(result)}",
                          flush=True)
            if workload == "echo":
                # The pieces a large echo is made of, timed without coproc.
                result = run_json([memory_costs] + quick)
                record("memory_costs", "plain", result)
                print(f"round {round_index + 1}/{rounds} {'costs':10} {'plain':7} {json.dumps(result)}", flush=True)
    instructions = callgrind_instructions(coproc_bench, options.smoke)
    if instructions is not None:
        record("instructions", "coproc", instructions)
        print(f"instructions coproc {json.dumps(instructions)}")
    else:
        print("instructions: valgrind is not installed; skipped")

    # Medians per metric.
    table = {}  # "workload/metric" -> system -> median
    for workload, metric, unit, higher in WORKLOADS:
        for system in systems:
            values = [sample[metric] for sample in samples.get((workload, system), []) if metric in sample]
            if values:
                table.setdefault(f"{workload}/{metric}", {})[system] = statistics.median(values)
    costs = {}
    for field in COST_FIELDS:
        values = [sample[field] for sample in samples.get(("memory_costs", "plain"), []) if field in sample]
        if values:
            costs[field] = statistics.median(values)
    for field in ("encode_ms", "decode_ms"):
        values = [sample[field] for sample in samples.get(("echo", "coproc"), []) if field in sample]
        if values:
            costs["coproc_" + field] = statistics.median(values)
    report = {"machine": machine(), "smoke": options.smoke, "rounds": rounds, "systems": systems, "medians": table,
              "echo_costs": costs,
              "samples": {f"{w}/{s}": v for (w, s), v in samples.items()}}
    report["targets"] = targets(table)
    os.makedirs(options.out, exist_ok=True)
    with open(os.path.join(options.out, "results.json"), "w") as out:
        json.dump(report, out, indent=2)
    plot(table, systems, options.out)
    write_markdown(report, options.out)
    print(f"wrote {options.out}/RESULTS.md, results.json and plot.png")
    return 0


# The workload each metric name means when none is given.
DEFAULT_WORKLOAD = {}
for _workload, _metric, _, _ in WORKLOADS:
    DEFAULT_WORKLOAD.setdefault(_metric, _workload)


def get(table, metric, system, workload=None):
    return table.get(f"{workload or DEFAULT_WORKLOAD[metric]}/{metric}", {}).get(system)


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def targets(table):
    t = []

    def add(name, value, met, detail):
        t.append({"target": name, "value": value, "met": bool(met) if value is not None else None, "detail": detail})

    r = ratio(get(table, "p50_us", "coproc"), get(table, "p50_us", "plain"))
    add("round-trip p50 at most 1.5x the plain socketpair ping-pong", r, r is not None and r <= 1.5, "coproc/plain p50")
    r = ratio(get(table, "tasks_per_s", "coproc"), get(table, "tasks_per_s", "plain"))
    add("concurrent-submit throughput at least half the plain pipelined rate", r, r is not None and r >= 0.5, "coproc/plain")
    # Issue 15, in both placements.
    r = ratio(get(table, "p50_us", "coproc", "latency_one_core"), get(table, "p50_us", "plain", "latency_one_core"))
    add("one core: round-trip p50 at most 1.3x the plain ping-pong", r, r is not None and r <= 1.3, "coproc/plain p50")
    r = ratio(get(table, "p50_us", "coproc"), get(table, "p50_us", "plain"))
    add("free: round-trip p50 at most 1.2x the plain ping-pong", r, r is not None and r <= 1.2, "coproc/plain p50")
    r = ratio(get(table, "tasks_per_s", "coproc", "throughput_one_core"),
              get(table, "tasks_per_s", "plain", "throughput_one_core"))
    add("one core: throughput at least the plain pipelined rate", r, r is not None and r >= 1, "coproc/plain")
    r = ratio(get(table, "tasks_per_s", "coproc"), get(table, "tasks_per_s", "plain"))
    add("free: throughput at least the plain pipelined rate", r, r is not None and r >= 1, "coproc/plain")
    r = ratio(get(table, "tasks_per_s", "coproc"), get(table, "tasks_per_s", "python"))
    add("concurrent-submit throughput at least 20x Python's", r, r is not None and r >= 20, "coproc/python")
    r = ratio(get(table, "items_per_s", "coproc"), get(table, "items_per_s", "python"))
    add("map with chunksize 1000 at least 5x Python's", r, r is not None and r >= 5, "coproc/python")
    r = ratio(get(table, "gib_per_s", "coproc"), get(table, "gib_per_s", "plain"))
    add("64 MiB echo at least as fast as the plain bulk copy", r, r is not None and r >= 1, "coproc/plain")
    # Issue 15: shared buffers against the plain copy, both repeated (pages
    # already touched on both sides).
    r = ratio(get(table, "repeat_gib_per_s", "coproc", "shared_echo"), get(table, "repeat_gib_per_s", "plain", "shared_echo"))
    add("shared_echo repeated at least 3x the plain socket-pair copy", r, r is not None and r >= 3, "coproc/plain")
    v = get(table, "first_result_ms", "coproc")
    add("start to first result under 5 ms", v, v is not None and v < 5, "ms")
    v = get(table, "speedup", "coproc")
    add("CPU-heavy speedup on 2 workers at least 1.9x", v, v is not None and v >= 1.9, "x")
    v = get(table, "bytes_per_future", "coproc")
    add("under 512 bytes of parent memory per queued future", v, v is not None and v < 512, "bytes")
    v, python = get(table, "p99_ms", "coproc"), get(table, "p99_ms", "python")
    add("mixed: short tasks' p99 under 5 ms, and below Python's executor's", v,
        v is not None and python is not None and v < 5 and v < python,
        f"ms; Python {fmt(python)} ms; coproc's max {fmt(get(table, 'max_ms', 'coproc'))} ms")
    return t


def fmt(value):
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


PLACEMENT_NOTES = {
    "latency": "Free on both cores. `*_cs`: context switches per round trip, all threads, from /proc "
               "(voluntary: the thread blocked; involuntary: it was preempted); `worker` is plain's peer.",
    "latency_one_core": "All processes on one core (`taskset -c 0`), beside the plain ping-pong pinned the same way.",
    "throughput": "Free on both cores. `*_cs`: context switches per task (plain: per message).",
    "throughput_one_core": "All processes on one core (`taskset -c 0`), beside the plain pipelined rate pinned the same way.",
    "instructions": "Per no-op round trip, callgrind: the parent's, and the workers' (all threads) beside it.",
}


def write_markdown(report, out):
    table, systems, m = report["medians"], report["systems"], report["machine"]
    lines = ["# Benchmark results", ""]
    if report["smoke"]:
        lines += ["**Smoke run: tiny sizes, one round. These figures check the harness and mean nothing.**", ""]
    lines += [f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}; date {m['date']}; "
              f"medians of {report['rounds']} interleaved rounds. Command: `bench/run`.", "",
              "![latency and throughput per system](plot.png)", "",
              "Each workload's table gives every system's figure, and coproc's ratio to the plain "
              "socket-pair limit and to Python's executor (`-`: no such figure)."]
    for workload in dict.fromkeys(w for w, _, _, _ in WORKLOADS):
        metrics = [(metric, unit) for w, metric, unit, _ in WORKLOADS if w == workload and f"{w}/{metric}" in table]
        if not metrics:
            continue
        lines += ["", f"### {workload}", ""]
        if workload in PLACEMENT_NOTES:
            lines += [PLACEMENT_NOTES[workload], ""]
        lines += ["| metric | unit | " + " | ".join(systems) + " | coproc/limit | coproc/Python |",
                  "|---|---|" + "---|" * len(systems) + "---|---|"]
        for metric, unit in metrics:
            values = table[f"{workload}/{metric}"]
            row = [fmt(values.get(s)) for s in systems]
            limit = ratio(values.get("coproc"), values.get("plain"))
            python = ratio(values.get("coproc"), values.get("python"))
            lines.append(f"| {metric} | {unit} | " + " | ".join(row) + f" | {fmt(limit)} | {fmt(python)} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target in report["targets"]:
        met = "-" if target["met"] is None else ("yes" if target["met"] else "**no**")
        lines.append(f"| {target['target']} | {fmt(target['value'])} ({target['detail']}) | {met} |")
    costs = report.get("echo_costs", {})
    if costs:
        size = "64 MiB" if not report["smoke"] else "the smoke size"
        lines += ["", f"## What moving {size} costs here", "",
                  "The pieces of the echo, each timed alone (medians; `memory_costs` and `coproc_bench echo`).", "",
                  "| piece | ms |", "|---|---|"]
        for field, meaning in list(COST_FIELDS.items()) + list(ECHO_FIELDS.items()):
            if field in costs:
                lines.append(f"| {meaning} | {fmt(costs[field])} |")
    lines += ["", "Why a target is missed, and what would close the gap: see bench/README.md.", ""]
    # The sections from the runtime's TCP echo on come from other commands
    # (bench/echo_compare.py, `bench/run --echo`; bench/backends.py,
    # `bench/run --backends`; bench/http_bench.py, `bench/run --http`); a
    # full run keeps them as they were.
    path = os.path.join(out, "RESULTS.md")
    kept = ""
    if os.path.exists(path):
        with open(path) as previous:
            text = previous.read()
        starts = [i for i in (text.find("## Runtime: TCP echo"), text.find("<!-- http: written by bench/http_bench.py -->"),
                              text.find("## The process pool on both backends")) if i >= 0]
        if starts:
            kept = text[min(starts):]
    with open(path, "w") as md:
        md.write("\n".join(lines) + ("\n" + kept if kept else ""))


def plot(table, systems, out):
    if shutil.which("gnuplot") is None:
        print("plot: gnuplot is not installed (Debian package gnuplot-nox); no plot")
        return
    data = os.path.join(out, "plot.dat")
    with open(data, "w") as f:
        f.write("system p50_us tasks_per_s\n")
        for s in systems:
            f.write(f"{s} {get(table, 'p50_us', s) or 0} {get(table, 'tasks_per_s', s) or 0}\n")
    script = f"""
set terminal pngcairo size 1000,420 noenhanced
set output '{os.path.join(out, "plot.png")}'
set multiplot layout 1,2
set style data histograms
set style fill solid 0.8
set boxwidth 0.8
set grid ytics
set logscale y
set title 'round-trip latency p50, free placement (us, lower is better)'
plot '{data}' using 2:xtic(1) title ''
set title 'concurrent no-op throughput, free placement (tasks/s, higher is better)'
plot '{data}' using 3:xtic(1) title ''
unset multiplot
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True, timeout=120)
    os.remove(data)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""TCP echo on the loopback: coproc's event loop on io_uring and on epoll,
standalone Asio (epoll reactor) and a plain liburing program, side by side
in one run.

Each variant is a one-thread server on 127.0.0.1 at a free port; the load is
bench/echo_client.cpp (one thread, 64 connections, 64-byte messages, closed
loop, bounded in time). Rounds interleave the variants, in a rotated order,
so that whatever else the machine does falls on all of them alike. Two
placements: "pinned" (server on CPU 0, client on CPU 1, by taskset) and
"free" (the scheduler places both). Every server is started with a lifetime
bound (it dies by SIGALRM) and killed at the end of its turn.

    bench/echo_compare.py --build build-bench [--seconds 3] [--rounds 3]
                          [--results bench/RESULTS.md] [--json out.json]
"""
import argparse
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time

from harness import replace_section  # RESULTS.md sections, as the full run writes them

VARIANTS = [
    ("coproc io_uring", ["echo_server_coproc", "io_uring"]),
    ("coproc epoll", ["echo_server_coproc", "epoll"]),
    ("Asio (epoll)", ["echo_server_asio"]),
    ("liburing (plain)", ["echo_server_liburing"]),
]
SECTION = "## Runtime: TCP echo, io_uring vs epoll vs Asio vs liburing"


def start_server(command, lifetime):
    server = subprocess.Popen(command + [str(lifetime)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    ready, _, _ = select.select([server.stdout], [], [], 10)
    line = server.stdout.readline().decode() if ready else ""
    if not line.startswith("port "):
        stop_server(server)
        raise RuntimeError(f"{' '.join(command)}: no port announced ({server.stderr.read().decode().strip()})")
    return server, int(line.split()[1])


def cpu_seconds(pid):
    """User plus system CPU time of a live process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def stop_server(server):
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    if server.stdout:
        server.stdout.close()
    if server.stderr:
        server.stderr.close()


def measure(build, variant_command, client_prefix, server_prefix, args):
    bench = os.path.join(build, "bench")
    command = server_prefix + [os.path.join(bench, variant_command[0])] + variant_command[1:]
    lifetime = int(args.seconds + args.warmup + 30)
    server, port = start_server(command, lifetime)
    try:
        client = client_prefix + [os.path.join(bench, "echo_client"), str(port), str(args.connections),
                                  str(args.size), str(args.seconds), str(args.warmup)]
        cpu_before, began = cpu_seconds(server.pid), time.monotonic()
        done = subprocess.run(client, capture_output=True, text=True, timeout=args.seconds + args.warmup + 30)
        cpu_after, ended = cpu_seconds(server.pid), time.monotonic()
        if done.returncode != 0:
            raise RuntimeError(f"echo_client against {' '.join(command)}: {done.stderr.strip()}")
        result = json.loads(done.stdout)
        if cpu_before is not None and cpu_after is not None:
            # share of one CPU the server used while the client ran (connect to close)
            result["server_cpu"] = (cpu_after - cpu_before) / (ended - began)
        return result
    finally:
        stop_server(server)


def fmt(value, digits=0):
    return "-" if value is None else f"{value:,.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default="build-bench")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--results", help="write the section into this Markdown file (replacing an older one)")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args()

    placements = [("free", [], [])]
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        placements.insert(0, ("pinned", ["taskset", "-c", "1"], ["taskset", "-c", "0"]))
    samples = {}  # (placement, variant) -> list of client results
    for round_index in range(args.rounds):
        order = VARIANTS[round_index % len(VARIANTS):] + VARIANTS[:round_index % len(VARIANTS)]
        for placement, client_prefix, server_prefix in placements:
            for name, command in order:
                result = measure(args.build, command, client_prefix, server_prefix, args)
                samples.setdefault((placement, name), []).append(result)
                print(f"round {round_index + 1} {placement:6} {name:17} {result['rps']:>10,.0f} req/s  "
                      f"p50 {result['p50_us']:8.1f} us  p99 {result['p99_us']:8.1f} us", file=sys.stderr, flush=True)

    medians = {}
    for key, results in samples.items():
        medians[key] = {metric: statistics.median(r[metric] for r in results) for metric in ("rps", "p50_us", "p99_us", "server_cpu", "client_cpu")
                        if all(metric in r for r in results)}

    lines = ["| placement | server | requests/s | p50 (us) | p99 (us) | req/s vs Asio | req/s vs liburing | server CPU | client CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for placement, _, _ in placements:
        asio = medians[(placement, "Asio (epoll)")]["rps"]
        uring = medians[(placement, "liburing (plain)")]["rps"]
        for name, _ in VARIANTS:
            m = medians[(placement, name)]
            lines.append(f"| {placement} | {name} | {fmt(m['rps'])} | {fmt(m['p50_us'], 1)} | {fmt(m['p99_us'], 1)} "
                         f"| {m['rps'] / asio:.3f} | {m['rps'] / uring:.3f} | {fmt(m.get('server_cpu'), 2)} | {fmt(m.get('client_cpu'), 2)} |")

    goals = ["| goal | placement | measured | met |", "|---|---|---|---|"]
    for placement, _, _ in placements:
        get = lambda name, metric: medians[(placement, name)][metric]  # noqa: E731
        checks = [
            ("coproc io_uring req/s at least Asio's", get("coproc io_uring", "rps") / get("Asio (epoll)", "rps"), 1.0),
            ("coproc io_uring req/s within 10% of plain liburing",
             get("coproc io_uring", "rps") / get("liburing (plain)", "rps"), 0.9),
            ("coproc epoll req/s within 10% of Asio", get("coproc epoll", "rps") / get("Asio (epoll)", "rps"), 0.9),
        ]
        for goal, value, floor in checks:
            goals.append(f"| {goal} | {placement} | {value:.3f} | {'yes' if value >= floor else '**no**'} |")
        p99 = [("coproc io_uring p99 at most Asio's", "coproc io_uring", "Asio (epoll)", 1.0),
               ("coproc io_uring p99 within 10% of plain liburing", "coproc io_uring", "liburing (plain)", 1.1),
               ("coproc epoll p99 within 10% of Asio", "coproc epoll", "Asio (epoll)", 1.1)]
        for goal, a, b, ceiling in p99:
            value = get(a, "p99_us") / get(b, "p99_us")
            goals.append(f"| {goal} | {placement} | {value:.3f} (ratio of p99s) | {'yes' if value <= ceiling else '**no**'} |")

    machine = (f"{os.cpu_count()} CPUs, Linux {platform.release()}; date {time.strftime('%Y-%m-%d')}; "
               f"medians of {args.rounds} interleaved rounds of {args.seconds:g} s each (after {args.warmup:g} s warm-up), "
               f"{args.connections} connections, {args.size}-byte messages, one-thread servers and a one-thread epoll client")
    command = "bench/echo_compare.py " + " ".join(sys.argv[1:])
    print("\n".join(lines + [""] + goals))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine, "samples": {f"{p}/{n}": r for (p, n), r in samples.items()}}, out, indent=1)
    if args.results:
        section = [SECTION, "", f"Machine: {machine}. Command: `{command}` (or `bench/run --echo`).", "",
                   "pinned: server on CPU 0, client on CPU 1 (taskset); free: the scheduler places both. "
                   "Server and client CPU: the share of one CPU each process used during the measurement "
                   "(near 1.00: that process is the limit).", ""]
        section += lines + [""] + goals + ["", "What the figures say: bench/README.md, \"TCP echo on the loopback\".", ""]
        replace_section(args.results, SECTION, section)


if __name__ == "__main__":
    main()

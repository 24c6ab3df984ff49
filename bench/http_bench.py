#!/usr/bin/env python3
"""The http workload: examples/http_server (work in a coproc process pool, on
the server's thread) against bench/http_threads (the same server, work on an
asio::thread_pool), driven by wrk on 127.0.0.1, every run bounded.

Per round, for each server in turn (the order alternates between rounds):
  fast        wrk on /fast alone;
  fast+work   wrk on /fast while another wrk keeps /work?n=N busy with as
              many connections as the server has workers, and a few more;
  fast+crash  (coproc only) wrk on /fast while another wrk sends /crash
              without pause: each /crash kills a worker, which is replaced.
Then once: one /crash to http_threads, which takes the whole server down.

Writes http.json and replaces the "## http" section of RESULTS.md in --out
(appending it if there is none); the rest of RESULTS.md is bench/harness.py's.
"""
import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

SECTION_START = "<!-- http: written by bench/http_bench.py -->"
SECTION_END = "<!-- end of http -->"


def start_server(program, workers):
    proc = subprocess.Popen([program, "--port", "0", "--workers", str(workers)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 10
    line = proc.stdout.readline()  # "listening on 127.0.0.1:PORT"
    match = re.search(r":(\d+)$", line.strip())
    if not match or time.monotonic() > deadline:
        stop_server(proc)
        raise RuntimeError(f"{program} did not start: {line!r}")
    return proc, int(match.group(1))


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def get(port, path, timeout=10):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
        return answer.status, answer.read().decode()


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def to_ms(text):
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(match.group(1)) * UNITS[match.group(2)]


def wrk_command(port, path, connections, seconds):
    return ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "2s", "--latency",
            f"http://127.0.0.1:{port}{path}"]


def parse_wrk(text):
    result = {}
    match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    result["rps"] = float(match.group(1)) if match else 0.0
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        result[f"p{pct}_ms"] = to_ms(match.group(1)) if match else None
    match = re.search(r"(\d+) requests in", text)
    result["requests"] = int(match.group(1)) if match else 0
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    result["non_2xx"] = int(match.group(1)) if match else 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    result["socket_errors"] = sum(int(g) for g in match.groups()) if match else 0
    return result


def run_wrk(port, path, connections, seconds):
    out = subprocess.run(wrk_command(port, path, connections, seconds), capture_output=True, text=True,
                         timeout=seconds + 30, check=True).stdout
    return parse_wrk(out)


def fast_while(port, path, connections, seconds, load_connections):
    """wrk on /fast while another wrk keeps `path` busy, started 1 s before
    and ending 1 s after."""
    load = subprocess.Popen(wrk_command(port, path, load_connections, seconds + 2), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(1)
        fast = run_wrk(port, "/fast", connections, seconds)
        load_out, _ = load.communicate(timeout=seconds + 30)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait(timeout=5)
    return fast, parse_wrk(load_out)


def machine():
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_before": " ".join(load)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n", type=int, default=200000, help="/work?n=N: primes below N")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections on /fast")
    options = parser.parse_args()
    if options.smoke:
        options.rounds, options.seconds, options.n = 1, 1, 20000
    programs = {"coproc": os.path.join(options.build, "examples", "http_server"),
                "threads": os.path.join(options.build, "bench", "http_threads")}
    work_connections = options.workers + 2  # the workers always busy, a little queue
    report = {"machine": machine(), "options": vars(options), "rounds": []}
    print(f"http: {report['machine']}", flush=True)

    for round_index in range(options.rounds):
        order = list(programs) if round_index % 2 == 0 else list(reversed(programs))
        this_round = {}
        for system in order:
            proc, port = start_server(programs[system], options.workers)
            figures = {}
            try:
                status, count = get(port, f"/work?n={options.n}")  # starts the workers
                assert status == 200, (system, status, count)
                figures["fast"] = run_wrk(port, "/fast", options.connections, options.seconds)
                figures["fast_under_work"], figures["work"] = fast_while(
                    port, f"/work?n={options.n}", options.connections, options.seconds, work_connections)
                if system == "coproc":
                    figures["fast_under_crash"], figures["crash"] = fast_while(
                        port, "/crash", options.connections, options.seconds, work_connections)
                    status, text = get(port, "/stats")
                    figures["stats_after"] = dict(line.split() for line in text.strip().splitlines())
                    status, _ = get(port, "/fast")
                    figures["fast_after_storm"] = status
            finally:
                figures["exit"] = stop_server(proc)
            this_round[system] = figures
            print(f"round {round_index + 1} {system}: " + json.dumps(figures), flush=True)
        report["rounds"].append(this_round)

    # One /crash to the thread-pool server.
    proc, port = start_server(programs["threads"], options.workers)
    try:
        try:
            get(port, "/crash", timeout=5)
            answered = "answered"
        except Exception as error:  # noqa: BLE001 - the connection dies with the server
            answered = type(error).__name__
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        alive = proc.poll() is None
        report["threads_crash"] = {"request": answered, "server_alive": alive,
                                   "exit": proc.returncode}
    finally:
        stop_server(proc)
    print("threads /crash: " + json.dumps(report["threads_crash"]), flush=True)

    with open("/proc/loadavg") as f:
        report["machine"]["loadavg_after"] = " ".join(f.read().split()[:3])
    with open(os.path.join(options.out, "http.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_section(report, options.out)


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}-{fmt(max(values))})"


def fmt(value):
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def write_section(report, out):
    rounds, m, o = report["rounds"], report["machine"], report["options"]

    def column(system, run, metric):
        return [r[system][run][metric] for r in rounds if system in r and run in r[system]]

    lines = [SECTION_START, "## http", ""]
    if o["smoke"]:
        lines += ["**Smoke run: one short round. These figures check the harness and mean nothing.**", ""]
    lines += [
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}; date {m['date']}; load average "
        f"before the run {m['loadavg_before']}, after it {m.get('loadavg_after', '-')} (other sessions share "
        f"the machine). Command: `bench/run --http` "
        f"(`bench/http_bench.py`, {o['rounds']} rounds, the two servers alternating within each round).",
        "",
        f"Servers: `examples/http_server` (coproc: {o['workers']} worker processes, the pool driven on the "
        f"server's thread) and `bench/http_threads` (the same HTTP code, work on an `asio::thread_pool` of "
        f"{o['workers']} threads). Load: Debian's wrk 4.1.0, one thread, on 127.0.0.1, on the same 2 cores "
        f"as the server; /fast with {o['connections']} connections for {o['seconds']} s; /work?n={o['n']} "
        f"(primes below n) with {o['workers'] + 2} connections from 1 s before to 1 s after; /crash the same.",
        "",
        "Figures are the median of the rounds, (min-max) across rounds.",
        "",
        "| run | server | /fast req/s | /fast p50 ms | /fast p99 ms | load req/s | load p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, load, label in (("fast", None, "/fast alone"), ("fast_under_work", "work", "/fast while /work runs"),
                             ("fast_under_crash", "crash", "/fast during a /crash storm")):
        for system in ("coproc", "threads"):
            if not column(system, run, "rps"):
                continue
            load_rps = spread(column(system, load, "rps")) if load else "-"
            load_p99 = spread(column(system, load, "p99_ms")) if load else "-"
            lines.append(f"| {label} | {system} | {spread(column(system, run, 'rps'))} | "
                         f"{spread(column(system, run, 'p50_ms'))} | {spread(column(system, run, 'p99_ms'))} | "
                         f"{load_rps} | {load_p99} |")
    errors = {s: sum(r[s][run]["socket_errors"] + r[s][run]["non_2xx"] for r in rounds
                     for run in ("fast", "fast_under_work", "fast_under_crash") if run in r[s])
              for s in ("coproc", "threads")}
    crashes = column("coproc", "crash", "non_2xx")
    lines += ["", f"/fast errors (non-2xx or socket errors), all rounds: coproc {errors['coproc']}, "
              f"threads {errors['threads']}."]
    if crashes:
        stats = [r["coproc"]["stats_after"] for r in rounds]
        lines += [f"Crash storm (coproc): {', '.join(str(c) for c in crashes)} /crash answered 500 per round "
                  f"(each a worker killed by SIGSEGV and replaced); after it the pool had "
                  f"{', '.join(s.get('workers_alive', '?') for s in stats)} workers alive and /fast answered "
                  f"{', '.join(str(r['coproc']['fast_after_storm']) for r in rounds)}."]
    tc = report.get("threads_crash")
    if tc:
        fate = ("still running" if tc["server_alive"] else
                f"dead (exit status {tc['exit']}{', SIGSEGV' if tc['exit'] == -signal.SIGSEGV else ''})")
        lines += [f"http_threads after one /crash: the request got {tc['request']}; the server was {fate}."]
    lines += ["", "What these figures mean: bench/README.md, \"The http workload\".", SECTION_END, ""]
    section = "\n".join(lines)

    path = os.path.join(out, "RESULTS.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if SECTION_START in text and SECTION_END in text:
        before = text[:text.index(SECTION_START)]
        after = text[text.index(SECTION_END) + len(SECTION_END):].lstrip("\n")
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {out}/http.json and the http section of {out}/RESULTS.md")


if __name__ == "__main__":
    sys.exit(main())

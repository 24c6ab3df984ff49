#!/usr/bin/python3
"""The Python anchors: concurrent.futures.ProcessPoolExecutor with 2 workers
(defaults otherwise), or loky's reusable executor from joblib, on the same
workloads as coproc_bench. One workload per run; prints one JSON object.

    python_bench.py [--quick] {cpython,loky} WORKLOAD
"""
import json
import os
import sys
import threading
import time


def noop():
    return None


def identity(x):
    return x


def echo(data):
    return data


def count_primes(bounds):
    start, stop = bounds
    count = 0
    for n in range(max(start, 2), stop):
        d = 2
        prime = True
        while d * d <= n:
            if n % d == 0:
                prime = False
                break
            d += 1
        count += prime
    return count


def spin(seconds):
    """A CPU-bound task: arithmetic until this thread has used `seconds` of
    CPU time (coproc_bench.cpp's spin does the same). Returns the rounds done
    and the worker's pid."""
    end = time.thread_time() + seconds
    state = 1
    rounds = 0
    while True:
        for _ in range(100):
            state = (state * 1103515245 + 12345) & 0xFFFFFFFF
        rounds += 1
        if time.thread_time() >= end:
            return rounds, os.getpid()


def pause_then_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def mixed(executor, long_s, short_count, period):
    """One long task, then short_count short ones, one every period seconds,
    submitted on schedule by a thread whether or not the earlier ones have
    finished. Returns the short tasks' submit-to-result times (ms), the long
    task's (s), the latest a submit came after its due time (ms), the short
    tasks slower than 100 ms (when submitted, how long, whether on the long
    task's worker) and how many short tasks ran on the long task's worker."""
    # Both workers running before the clock starts, as in coproc_bench.
    warm = [executor.submit(pause_then_pid, 0.05) for _ in range(2)]
    for future in warm:
        future.result()
    short_ms = [None] * short_count
    submitted_ms = [None] * short_count
    pids = [None] * short_count
    all_done = threading.Event()
    lock = threading.Lock()
    left = [short_count]
    late = [0.0]
    failures = []

    def record(future, index, submitted):
        # Runs in the executor's thread that sets the result, or in the
        # submitting thread when the task had already finished.
        short_ms[index] = (time.perf_counter() - submitted) * 1e3
        if future.exception() is not None:
            failures.append(future.exception())
        else:
            pids[index] = future.result()[1]
        with lock:
            left[0] -= 1
            if left[0] == 0:
                all_done.set()

    def submitter(start):
        for index in range(short_count):
            due = start + period * (index + 1)
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            submitted = time.perf_counter()
            late[0] = max(late[0], (submitted - due) * 1e3)
            submitted_ms[index] = (submitted - start) * 1e3
            future = executor.submit(spin, 0.001)
            future.add_done_callback(lambda f, index=index, submitted=submitted: record(f, index, submitted))

    start = time.perf_counter()
    long_task = executor.submit(spin, long_s)
    thread = threading.Thread(target=submitter, args=(start,))
    thread.start()
    thread.join()
    long_pid = long_task.result()[1]
    long_task_s = time.perf_counter() - start
    all_done.wait()
    if failures:
        raise failures[0]
    slow = [{"submitted_ms": submitted_ms[i], "ms": short_ms[i], "on_long_worker": pids[i] == long_pid}
            for i in range(short_count) if short_ms[i] > 100]
    return short_ms, long_task_s, late[0], slow, sum(pid == long_pid for pid in pids)


def make_executor(kind):
    if kind == "cpython":
        from concurrent.futures import ProcessPoolExecutor
        return ProcessPoolExecutor(max_workers=2)
    from joblib.externals.loky import get_reusable_executor
    return get_reusable_executor(max_workers=2)


def percentile(values, p):
    values = sorted(values)
    return values[int(p * (len(values) - 1))]


def main(argv):
    quick = "--quick" in argv
    args = [a for a in argv[1:] if a != "--quick"]
    kind, workload = args[0], args[1]
    result = {}
    if workload == "startup":
        firsts, totals = [], []
        for _ in range(2 if quick else 10):
            start = time.perf_counter()
            executor = make_executor(kind)
            executor.submit(noop).result()
            firsts.append((time.perf_counter() - start) * 1e3)
            executor.shutdown(wait=True)
            totals.append((time.perf_counter() - start) * 1e3)
        result = {"first_result_ms": percentile(firsts, 0.5), "start_to_shutdown_ms": percentile(totals, 0.5)}
        print(json.dumps(result))
        return 0

    executor = make_executor(kind)
    executor.submit(noop).result()
    executor.submit(noop).result()
    if workload == "latency":
        rounds = 200 if quick else 5000
        micros = []
        for _ in range(rounds):
            start = time.perf_counter()
            executor.submit(noop).result()
            micros.append((time.perf_counter() - start) * 1e6)
        result = {"p50_us": percentile(micros, 0.5), "p99_us": percentile(micros, 0.99)}
    elif workload == "throughput":
        tasks = 2000 if quick else 50000
        start = time.perf_counter()
        futures = [executor.submit(noop) for _ in range(tasks)]
        for future in futures:
            future.result()
        result = {"tasks_per_s": tasks / (time.perf_counter() - start)}
    elif workload == "map":
        items = 100_000 if quick else 10_000_000
        inputs = range(items)
        start = time.perf_counter()
        total = 0
        for _ in executor.map(identity, inputs, chunksize=1000):
            total += 1
        result = {"items_per_s": items / (time.perf_counter() - start)}
    elif workload == "echo":
        size = (1 << 20) if quick else (64 << 20)
        data = b"x" * size
        start = time.perf_counter()
        back = executor.submit(echo, data).result()
        assert len(back) == size
        result = {"gib_per_s": size / (time.perf_counter() - start) / (1 << 30)}
    elif workload == "cpu":
        limit = 50_000 if quick else 300_000
        ranges = [(limit * i // 64, limit * (i + 1) // 64) for i in range(64)]
        start = time.perf_counter()
        inline = [count_primes(r) for r in ranges]
        inline_s = time.perf_counter() - start
        start = time.perf_counter()
        pooled = list(executor.map(count_primes, ranges))
        pool_s = time.perf_counter() - start
        result = {"speedup": inline_s / pool_s, "inline_s": inline_s, "pool_s": pool_s, "match": pooled == inline}
    elif workload == "mixed":
        long_s, short_count = (0.2, 40) if quick else (2.0, 400)  # short tasks: 200 per second
        short_ms, long_task_s, late_ms, slow, on_long_worker = mixed(executor, long_s, short_count, 0.005)
        result = {"p50_ms": percentile(short_ms, 0.5), "p99_ms": percentile(short_ms, 0.99),
                  "max_ms": percentile(short_ms, 1.0), "short_tasks": short_count, "long_task_s": long_task_s,
                  "over_100ms": slow, "short_on_long_worker": on_long_worker, "submit_late_max_ms": late_ms}
    else:
        print(f"unknown workload {workload}", file=sys.stderr)
        return 2
    if kind == "cpython":
        executor.shutdown(wait=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

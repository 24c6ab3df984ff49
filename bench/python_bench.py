#!/usr/bin/python3
"""The Python anchors: concurrent.futures.ProcessPoolExecutor with 2 workers
(defaults otherwise), or loky's reusable executor from joblib, on the same
workloads as coproc_bench. One workload per run; prints one JSON object.

    python_bench.py [--quick] {cpython,loky} WORKLOAD
"""
import json
import sys
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
    else:
        print(f"unknown workload {workload}", file=sys.stderr)
        return 2
    if kind == "cpython":
        executor.shutdown(wait=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

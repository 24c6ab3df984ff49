"""mpi4py.futures' side of the MPI benchmark (bench/mpi_compare.py runs it
beside bench/mpi_bench.cpp), on the same workloads. Run with Debian's
python3-mpi4py, at least 2 ranks:

    mpiexec -n R+1 /usr/bin/python3 -m mpi4py.futures bench/mpi4py_bench.py \
        [--tasks N] [--map C:M[,C:M...]] [--latency L]

Ranks 1..R are mpi4py.futures' static worker pool (each runs one task at a
time); rank 0 runs this script with an MPIPoolExecutor over them, starts all
of them, then measures, each once:
  tasks   N no-op submits, all made before the first result is waited for,
          then all waited for: tasks/s from the first submit to the last result
  map     executor.map(identity, range(M), chunksize=C), for each C:M given
          (default 1:2000,100:20000): items/s
  latency L no-op submits one at a time, each waited for before the next:
          p50 and p99 of the round trip (us)
Prints one JSON object per measurement, one per line, as mpi_bench does.

With a single rank mpi4py.futures has no worker rank (it would run the
tasks on threads of rank 0): the script says so and exits with status 2.
"""
import argparse
import json
import os
import sys
import time

from mpi4py import MPI
from mpi4py.futures import MPIPoolExecutor


def noop():
    pass


def identity(x):
    return x


def hold_then_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--map", default="1:2000,100:20000", help="chunksize:items pairs, comma-separated")
    parser.add_argument("--latency", type=int, default=500)
    args = parser.parse_args()
    maps = [tuple(int(n) for n in pair.split(":")) for pair in args.map.split(",") if pair]
    worker_ranks = MPI.COMM_WORLD.Get_size() - 1
    if worker_ranks < 1:
        print("mpi4py_bench: needs at least 2 ranks (rank 0 plus worker ranks): run it under mpiexec -n 2 or more",
              file=sys.stderr)
        return 2
    common = {"system": "mpi4py.futures", "worker_ranks": worker_ranks, "workers_per_rank": 1,
              "workers": worker_ranks, "host": MPI.Get_processor_name(),
              "mpi4py": __import__("mpi4py").__version__}
    with MPIPoolExecutor() as executor:
        # Every worker rank answering before any clock starts (the first
        # submit also sets the pool up).
        common["workers_seen"] = len(set(executor.map(hold_then_pid, [0.1] * worker_ranks)))

        start = time.perf_counter()
        futures = [executor.submit(noop) for _ in range(args.tasks)]
        for future in futures:
            future.result()
        seconds = time.perf_counter() - start
        print(json.dumps({**common, "workload": "tasks", "count": args.tasks, "seconds": round(seconds, 6),
                          "per_s": round(args.tasks / seconds, 1)}), flush=True)

        status = 0
        for chunksize, items in maps:
            inputs = list(range(items))
            start = time.perf_counter()
            results = list(executor.map(identity, inputs, chunksize=chunksize))
            seconds = time.perf_counter() - start
            if results != inputs:
                print(f"mpi4py_bench: map with chunksize {chunksize} gave wrong results", file=sys.stderr)
                status = 1
                continue
            print(json.dumps({**common, "workload": "map", "chunksize": chunksize, "count": items,
                              "seconds": round(seconds, 6), "per_s": round(items / seconds, 1)}), flush=True)
        micros = []
        for _ in range(args.latency):
            start = time.perf_counter()
            executor.submit(noop).result()
            micros.append((time.perf_counter() - start) * 1e6)
        micros.sort()
        print(json.dumps({**common, "workload": "latency", "count": args.latency,
                          "p50_us": round(micros[len(micros) // 2], 1),
                          "p99_us": round(micros[int(0.99 * (len(micros) - 1))], 1)}), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

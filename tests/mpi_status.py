#!/usr/bin/env python3
"""Runs an MPI test job and passes on rank 0's own exit status.

Under `mpiexec --enable-recovery` the job's exit status is 0 even when
rank 0's test program fails, so the program (doctest_main) writes its
status to the file named by COPROC_TEST_STATUS_FILE, and this script
exits with it: 1 if the file is missing (rank 0 never reached its end),
1 if the job outlives TIMEOUT seconds (it is killed, its process group
with it). The temporary file goes on every exit.

usage: mpi_status.py TIMEOUT COMMAND...
"""
import os
import signal
import subprocess
import sys
import tempfile


def main() -> int:
    timeout = float(sys.argv[1])
    command = sys.argv[2:]
    with tempfile.TemporaryDirectory(prefix="coproc-mpi-status-") as directory:
        path = os.path.join(directory, "status")
        environment = dict(os.environ, COPROC_TEST_STATUS_FILE=path)
        job = subprocess.Popen(command, env=environment, start_new_session=True)
        try:
            job.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            print(f"mpi_status.py: the job ran longer than {timeout:g} s and was killed", file=sys.stderr)
            return 1
        if not os.path.exists(path):
            print(f"mpi_status.py: rank 0 wrote no status (mpiexec exited {job.returncode})", file=sys.stderr)
            return 1
        with open(path, encoding="ascii") as status:
            rank_0 = int(status.read().strip() or "1")
        # mpiexec's own status says nothing here: under --enable-recovery
        # it is 0 whatever the ranks did, or not 0 when one ended without
        # MPI_Finalize, as coproc's ranks do after a rank was lost.
        print(f"mpi_status.py: rank 0's test program exited {rank_0}, mpiexec {job.returncode}")
        return rank_0


if __name__ == "__main__":
    sys.exit(main())

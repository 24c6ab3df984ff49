#!/usr/bin/env python3
"""Runs test_mpi across two network namespaces, so that rank 0 reaches the
agent of rank 2 only over a veth pair, as it would reach another host:

  NS1 (198.18.0.1, host coproc-ns1): mpiexec, rank 0, rank 1
  NS2 (198.18.0.2, host coproc-ns2): rank 2, started by tests/netns_rsh.sh

Steps: a probe job shows where each rank runs (host name and network
namespace); test_mpi runs with COPROC_TEST_MPI_DISTINCT_HOSTS=1 and must
leave no process in the namespaces; with rank 0's address unreachable from
NS2, the probe job must fail. Every wait is bounded, and the namespaces,
veths and temporary files go on every exit (signals included).
Exit 77 (skipped) only when not root or `ip netns` cannot be used.

usage: mpi_netns.py MPIEXEC TEST_MPI [DOCTEST_OPTIONS...]
"""
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

SKIPPED = 77
PID = os.getpid()
# 198.18.0.0/15 is reserved for benchmarking: never routed, so it cannot
# clash with a real network of this machine.
NETWORK = "198.18.0.0/24"
ADDRESSES = ["198.18.0.1", "198.18.0.2"]
HOSTNAMES = ["coproc-ns1", "coproc-ns2"]
NS_PREFIX = "coproc-mpi-"
TMP_PREFIX = "coproc-mpi-netns-"
NAMESPACES = [f"{NS_PREFIX}{PID}-1", f"{NS_PREFIX}{PID}-2"]
VETHS = [f"cpmpi{PID}a", f"cpmpi{PID}b"]  # at most 15 characters
RSH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netns_rsh.sh")
PROBE = 'echo "rank=$OMPI_COMM_WORLD_RANK host=$(hostname) net=$(readlink /proc/self/ns/net)"'
STEP_SECONDS = 10
PROBE_SECONDS = 20  # it takes under a second
TEST_SECONDS = 110  # about 5 s; with the rest, well under meson's 180 s


class Failure(Exception):
    pass


class Skip(Exception):
    pass


class Interrupted(Exception):
    pass


def log(message):
    print("mpi_netns: " + message, flush=True)


def run(*command, seconds=STEP_SECONDS):
    """A short command (ip, mostly): its stdout; Failure when it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        raise Failure(f"timed out after {seconds} s: {' '.join(command)}")
    if done.returncode != 0:
        raise Failure(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def pids_in(namespace):
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=STEP_SECONDS)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def describe(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = "(gone)"
    return f"{pid} {command}"


def leftovers(seconds):
    """The processes still in the namespaces after a job ended, once they had
    a few seconds to exit."""
    deadline = time.monotonic() + seconds
    while True:
        left = [describe(pid) for namespace in NAMESPACES for pid in pids_in(namespace)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def kill_all_in(namespace):
    """Every process in the namespace is this run's: kill until none is left."""
    deadline = time.monotonic() + STEP_SECONDS
    while pids := pids_in(namespace):
        if time.monotonic() > deadline:
            raise Failure(f"processes survive SIGKILL in {namespace}: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def namespaces_now():
    return [line.split()[0] for line in run("ip", "netns", "list").splitlines() if line.strip()]


def link_exists(name):
    """In this (the root) namespace."""
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True, timeout=STEP_SECONDS).returncode == 0


def remove(namespaces, veths):
    """Processes first: `ip netns del` alone would leave them running."""
    present = namespaces_now()
    for namespace in namespaces:
        if namespace in present:
            kill_all_in(namespace)
            run("ip", "netns", "del", namespace)  # takes its end of the veth with it
    for veth in veths:  # in the root namespace only if setup stopped half-way
        if link_exists(veth):
            run("ip", "link", "del", veth)


def remove_stale():
    """What an earlier run left when it was killed (SIGKILL cannot be trapped)."""
    def dead(pid):
        return not os.path.exists(f"/proc/{pid}")
    for namespace in namespaces_now():
        found = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)-\d", namespace)
        if found and dead(found.group(1)):
            log(f"removing {namespace}, left by a run that no longer exists")
            remove([namespace], [])
    for name in os.listdir(tempfile.gettempdir()):
        found = re.fullmatch(re.escape(TMP_PREFIX) + r"(\d+)-\w+", name)
        if found and dead(found.group(1)):
            log(f"removing {name}, left by a run that no longer exists")
            shutil.rmtree(os.path.join(tempfile.gettempdir(), name))


def set_up():
    try:
        run("ip", "netns", "add", NAMESPACES[0])
    except (Failure, OSError) as e:
        raise Skip(f"cannot create a network namespace: {e}")
    run("ip", "netns", "add", NAMESPACES[1])
    # Both ends are created inside their namespaces, never in this one.
    run("ip", "link", "add", VETHS[0], "netns", NAMESPACES[0], "type", "veth", "peer", "name", VETHS[1], "netns", NAMESPACES[1])
    for namespace, veth, address in zip(NAMESPACES, VETHS, ADDRESSES):
        run("ip", "-n", namespace, "link", "set", "lo", "up")  # Open MPI also talks to itself
        run("ip", "-n", namespace, "addr", "add", address + "/24", "dev", veth)
        run("ip", "-n", namespace, "link", "set", veth, "up")
        log(f"{namespace}: lo up, {veth} {address}/24")


def mpiexec_command(mpiexec, hostfile, program):
    # The first namespace, under its own host name, like the second one gets
    # from netns_rsh.sh.
    return ["ip", "netns", "exec", NAMESPACES[0], "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', HOSTNAMES[0],
            mpiexec, "-n", "3", "--hostfile", hostfile,
            "--mca", "plm_rsh_agent", RSH,
            # Only the veth network: no shared memory between ranks, and
            # neither the launch (oob) nor MPI (btl) may use another interface.
            "--mca", "btl", "tcp,self",
            "--mca", "btl_tcp_if_include", NETWORK,
            "--mca", "oob_tcp_if_include", NETWORK,
            *program]


def run_job(command, env, seconds, output=None):
    """(exit code or None on timeout, processes it left in the namespaces,
    now killed). Its output goes to the file `output`, or to ours. A file,
    not a pipe: a process it left behind cannot keep us waiting for EOF.
    Not in a session of its own: meson's SIGTERM reaches mpiexec too."""
    log("$ " + shlex.join(command))
    started = time.monotonic()
    with open(output, "w") if output else contextlib.nullcontext() as sink:
        job = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT if sink else None)
        try:
            code = job.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            log(f"TIMEOUT: no exit after {seconds} s; stopping the job")
            job.terminate()  # mpiexec may still say what it waited for
            try:
                job.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            code = None
    # (On a signal, main's cleanup kills everything in the namespaces.)
    log(f"{'timed out' if code is None else f'exit {code}'} after {time.monotonic() - started:.1f} s")
    left = leftovers(5 if code is not None else 0)
    for namespace in NAMESPACES:
        kill_all_in(namespace)
    if job.poll() is None:  # mpiexec runs in the first namespace: not here in practice
        job.kill()
    job.wait(timeout=STEP_SECONDS)
    return code, left


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


def veth_bytes():
    """(received, sent) by NS2's end of the veth: all that crosses the link."""
    stats = json.loads(run("ip", "-n", NAMESPACES[1], "-j", "-s", "link", "show", "dev", VETHS[1]))[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


def check_probe(mpiexec, hostfile, probe_output, env):
    code, left = run_job(mpiexec_command(mpiexec, hostfile, ["sh", "-c", PROBE]), env, PROBE_SECONDS, probe_output)
    output = read(probe_output)
    print(output, end="", flush=True)
    if code != 0:
        raise Failure(f"the probe job {'timed out' if code is None else 'failed'}: the launch across namespaces does not work (see its output above)")
    if left:
        raise Failure(f"the probe job left processes behind: {left}")
    names = {os.stat(f"/run/netns/{namespace}").st_ino: namespace for namespace in NAMESPACES}
    seen = {}
    for line in output.splitlines():
        found = re.fullmatch(r"rank=(\d+) host=(\S+) net=net:\[(\d+)\]", line.strip())
        if found:
            where = names.get(int(found.group(3)), "netns inode " + found.group(3))
            seen[int(found.group(1))] = f"{found.group(2)} in {where}"
    expected = {0: f"{HOSTNAMES[0]} in {NAMESPACES[0]}", 1: f"{HOSTNAMES[0]} in {NAMESPACES[0]}", 2: f"{HOSTNAMES[1]} in {NAMESPACES[1]}"}
    for rank in sorted(expected.keys() | seen.keys()):
        if seen.get(rank) != expected.get(rank):
            raise Failure(f"rank {rank} ran on {seen.get(rank, 'nothing')}, expected {expected.get(rank, 'nothing')}")
    log(f"ranks 0 and 1 run in {NAMESPACES[0]} ({HOSTNAMES[0]}), rank 2 in {NAMESPACES[1]} ({HOSTNAMES[1]})")


def check_test_mpi(mpiexec, test_mpi, doctest_options, hostfile, env):
    before = veth_bytes()
    test_env = dict(env, COPROC_TEST_MPI_DISTINCT_HOSTS="1")
    code, left = run_job(mpiexec_command(mpiexec, hostfile, [test_mpi, *doctest_options]), test_env, TEST_SECONDS)
    if code != 0:
        raise Failure(f"test_mpi across namespaces {'timed out' if code is None else f'failed (exit {code})'}: see its output above")
    if left:
        raise Failure(f"test_mpi left processes behind (killed now): {left}")
    after = veth_bytes()
    received, sent = after[0] - before[0], after[1] - before[1]
    log(f"the veth carried {received} bytes to rank 2's namespace and {sent} bytes back")
    # The probe showed rank 2 in NS2, so test_mpi passing means its frames
    # crossed; the count shows they did: the distinct-hosts case sends a
    # 1 MiB result from rank 2's host.
    if received == 0 or sent < (1 << 20):
        raise Failure(f"too little crossed the veth ({sent} bytes back, at least 1 MiB expected): "
                      "rank 2 was not reached over the network")


def check_unreachable(mpiexec, hostfile, probe_output, env):
    # Negative check: with rank 0's address unreachable from rank 2's
    # namespace (the veth stays up, so Open MPI still finds its interface),
    # the same launch must fail: nothing reaches rank 0 but through the
    # network of that namespace. A hang would count as a failure too.
    run("ip", "-n", NAMESPACES[1], "route", "add", "unreachable", ADDRESSES[0] + "/32")
    code, _ = run_job(mpiexec_command(mpiexec, hostfile, ["sh", "-c", PROBE]), env, PROBE_SECONDS, probe_output)
    output = read(probe_output)
    if code == 0:
        print(output, end="", flush=True)
        raise Failure(f"the probe job succeeded with {ADDRESSES[0]} unreachable from {NAMESPACES[1]}: the namespaces are not separated")
    reason = next((line.strip() for line in output.splitlines() if line.strip() and not line.startswith("-")), "no output")
    log(f"with {ADDRESSES[0]} unreachable from {NAMESPACES[1]} the job fails, as it must: {reason}")


def interrupt(number, _frame):
    # Unwinds to main's finally, which removes everything.
    raise Interrupted(signal.Signals(number).name)


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    mpiexec, test_mpi, doctest_options = sys.argv[1], os.path.abspath(sys.argv[2]), sys.argv[3:]
    if os.geteuid() != 0:
        log("SKIP: network namespaces need root")
        return SKIPPED
    if shutil.which("ip") is None:
        log("SKIP: no `ip` (iproute2)")
        return SKIPPED
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, interrupt)
    status = 1
    temporary = None
    try:
        if not os.access(RSH, os.X_OK):
            raise Failure(f"{RSH} is not executable (chmod +x)")
        remove_stale()
        temporary = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{PID}-")
        hostfile = os.path.join(temporary, "hostfile")
        with open(hostfile, "w") as f:
            f.write(f"{ADDRESSES[0]} slots=2\n{ADDRESSES[1]} slots=1\n")
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   # Open MPI's session directories, and whatever else the job
                   # writes there, go with the temporary directory.
                   TMPDIR=temporary,
                   COPROC_NETNS_HOSTS=" ".join(f"{a}={n}:{h}" for a, n, h in zip(ADDRESSES, NAMESPACES, HOSTNAMES)))
        log(f"temporary directory {temporary}")
        set_up()
        check_probe(mpiexec, hostfile, os.path.join(temporary, "probe.out"), env)
        check_test_mpi(mpiexec, test_mpi, doctest_options, hostfile, env)
        check_unreachable(mpiexec, hostfile, os.path.join(temporary, "unreachable.out"), env)
        status = 0
    except Skip as e:
        log(f"SKIP: {e}")
        status = SKIPPED
    except Failure as e:
        log(f"FAIL: {e}")
    except Interrupted as e:
        log(f"FAIL: interrupted by {e}")
    except Exception:  # a bug here, or a tool that misbehaved: fail, but clean up
        log("FAIL: unexpected error")
        traceback.print_exc()
        sys.stdout.flush()
    finally:
        # meson allows 0.5 s after its SIGTERM: no second signal may cut this short.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        try:
            remove(NAMESPACES, VETHS)
            if temporary is not None:
                shutil.rmtree(temporary)
            left = [n for n in namespaces_now() if n in NAMESPACES] + [v for v in VETHS if link_exists(v)]
            if left or (temporary is not None and os.path.exists(temporary)):
                raise Failure(f"left behind: {left} {temporary if temporary and os.path.exists(temporary) else ''}")
            log("removed the namespaces, veths and temporary files")
        except Exception as e:  # a failed cleanup fails the test, whatever came before
            log(f"FAIL: cleanup: {e}")
            status = 1
    log({0: "PASS", SKIPPED: "SKIPPED"}.get(status, "FAIL"))
    return status


if __name__ == "__main__":
    sys.exit(main())

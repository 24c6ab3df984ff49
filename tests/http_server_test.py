#!/usr/bin/env python3
"""Drives examples/http_server with curl: every endpoint, keep-alive, a
crash, a client that disconnects, a full queue and SIGTERM. The server
listens on 127.0.0.1 on a free port it picks itself (--port 0) and prints.
Every step is bounded in time; at the end no worker process may be left.

usage: http_server_test.py [LAUNCHER...] PATH_TO_http_server
(a launcher such as tests/seccomp_exec runs the server under it)
"""
import os
import select
import signal
import subprocess
import sys
import time

SERVER = sys.argv[1:]  # the server's command, launcher included
STEP_SECONDS = 20
LONG = 10**12  # a /work that would run for hours: only a cancel ends it


def fail(message):
    print("FAIL: " + message, flush=True)
    sys.exit(1)


def curl(url, *options, seconds=STEP_SECONDS):
    """(exit code, HTTP status or 0, body)"""
    command = ["curl", "-s", "--max-time", str(seconds), "-o", "-", "-w", "\n%{http_code}", *options, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 5)
    body, _, status = done.stdout.rpartition("\n")
    return done.returncode, int(status or 0), body


def stats(base):
    code, status, body = curl(base + "/stats")
    if status != 200:
        fail(f"/stats answered {status} (curl exit {code})")
    return {name: int(value) for name, value in (line.split() for line in body.splitlines())}


def wait_for(what, predicate, seconds=STEP_SECONDS):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            fail("timed out waiting for " + what)
        time.sleep(0.05)


def children(pid):
    found = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                found.update(int(child) for child in listing.read().split())
    except FileNotFoundError:
        pass
    return found


def is_worker(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"coproc-worker" in cmdline.read()
    except (FileNotFoundError, ProcessLookupError):
        return False


def main():
    server = subprocess.Popen(SERVER + ["--port", "0", "--workers", "1", "--max-pending", "1"],
                              stdout=subprocess.PIPE, text=True)
    workers = set()
    background = []
    try:
        ready, _, _ = select.select([server.stdout], [], [], STEP_SECONDS)
        if not ready:
            fail("the server did not say where it listens")
        line = server.stdout.readline().strip()
        if not line.startswith("listening on 127.0.0.1:"):
            fail("unexpected first line: " + line)
        base = "http://" + line.split()[-1]
        print("server at " + base, flush=True)

        # /fast, and keep-alive: two requests on one connection.
        code, status, body = curl(base + "/fast")
        if (status, body) != (200, "fast\n"):
            fail(f"/fast: {status} {body!r}")
        both = subprocess.run(["curl", "-sv", "--max-time", str(STEP_SECONDS), base + "/fast", base + "/fast"],
                              capture_output=True, text=True, timeout=STEP_SECONDS + 5)
        if both.stdout != "fast\nfast\n" or "Re-using existing connection" not in both.stderr:
            fail("keep-alive: the second request did not reuse the connection")
        print("ok: /fast, keep-alive", flush=True)

        # /work in a worker.
        code, status, body = curl(base + "/work?n=100000")
        if (status, body) != (200, "9592\n"):
            fail(f"/work?n=100000: {status} {body!r}")
        workers |= children(server.pid)
        print("ok: /work", flush=True)

        # /crash: 500, and the server serves on.
        code, status, body = curl(base + "/crash")
        if status != 500 or "died" not in body:
            fail(f"/crash: {status} {body!r}")
        code, status, body = curl(base + "/work?n=1000")
        if (status, body) != (200, "168\n"):
            fail(f"/work after the crash: {status} {body!r}")
        workers |= children(server.pid)
        print("ok: /crash answered 500 and the server serves on", flush=True)

        # A client that disconnects cancels its task.
        before = stats(base)["cancelled"]
        code, status, body = curl(base + f"/work?n={LONG}", seconds=1)
        if code != 28:
            fail(f"the long request should have timed out in curl, exit {code}")
        wait_for("the disconnected client's task to be cancelled",
                 lambda: stats(base)["cancelled"] == before + 1 and stats(base)["running"] == 0)
        print("ok: a disconnect cancels the task", flush=True)

        # A full queue answers 503: one task runs, one waits, the third is refused.
        for _ in range(2):
            background.append(subprocess.Popen(["curl", "-s", "--max-time", str(STEP_SECONDS), base + f"/work?n={LONG}"],
                                               stdout=subprocess.DEVNULL))
            time.sleep(0.3)
        wait_for("one running and one queued task",
                 lambda: (lambda s: (s["running"], s["queued"]) == (1, 1))(stats(base)))
        workers |= children(server.pid)
        code, status, body = curl(base + "/work?n=1000")
        if status != 503:
            fail(f"a full queue answered {status} {body!r}")
        before = stats(base)["cancelled"]
        for client in background:
            client.terminate()
            client.wait(timeout=STEP_SECONDS)
        background.clear()
        wait_for("both tasks to be cancelled",
                 lambda: (lambda s: (s["cancelled"], s["running"], s["queued"]) == (before + 2, 0, 0))(stats(base)))
        print("ok: a full queue answers 503", flush=True)

        # SIGTERM: the request in flight is answered, new connections are
        # refused, and the server exits with 0.
        in_flight = subprocess.Popen(["curl", "-s", "--max-time", str(STEP_SECONDS), base + "/work?n=2000000"],
                                     stdout=subprocess.PIPE, text=True)
        wait_for("the request to be running", lambda: stats(base)["running"] == 1)
        workers |= children(server.pid)
        server.send_signal(signal.SIGTERM)
        output, _ = in_flight.communicate(timeout=STEP_SECONDS + 5)
        if output != "148933\n":
            fail(f"the request in flight at SIGTERM got {output!r}")
        code, status, body = curl(base + "/fast", seconds=2)
        if code != 7:
            fail(f"a connection after SIGTERM was not refused (curl exit {code}, status {status})")
        try:
            exit_code = server.wait(timeout=STEP_SECONDS)
        except subprocess.TimeoutExpired:
            fail("the server did not exit after SIGTERM")
        if exit_code != 0:
            fail(f"the server exited with {exit_code}")
        print("ok: SIGTERM finished the request in flight and the server exited with 0", flush=True)

        left = [pid for pid in workers if is_worker(pid)]
        if left:
            fail(f"worker processes left: {left}")
        print(f"ok: none of the {len(workers)} workers seen is left", flush=True)
    finally:
        for client in background:
            client.kill()
        if server.poll() is None:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()

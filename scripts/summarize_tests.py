#!/usr/bin/env python3
"""Prints one closing line for a meson test run: 'N passed, N failed'.

Counts doctest test cases (from each test program's own summary line) and
each example program as one test. A test program that failed without a
doctest summary (a crash, a timeout) counts as one failure.

Before that line, each failed test program gets one 'failed test:' line
with its name and meson's verdict, followed by up to 12 lines of what it
printed that say why ('failure:' lines): the doctest case and check that
failed, or the last lines of a crash. .ci/run repeats these at the end of
its output, where a truncated log still shows them.
"""
import json
import re
import sys

SUMMARY = re.compile(r"test cases:\s*(\d+)\s*\|\s*(\d+) passed\s*\|\s*(\d+) failed")


def why(entry, limit=12):
    """The lines of a failed test's output that say why it failed."""
    text = (entry.get("stdout") or "") + "\n" + (entry.get("stderr") or "")
    lines = [line.rstrip() for line in text.splitlines() if line.strip() and not line.startswith("=====")]
    picked = []
    for index, line in enumerate(lines):
        if line.startswith("TEST CASE:") or "ERROR:" in line:
            picked.extend(lines[index:index + 4])
        if len(picked) >= limit:
            break
    if not picked:
        picked = lines[-limit:]  # a crash or a timeout: its last words
    seen = []
    for line in picked:
        if line not in seen:
            seen.append(line)
    return seen[:limit]


def main(path):
    passed = failed = 0
    reports = []
    with open(path) as log:
        for line in log:
            entry = json.loads(line)
            ok = entry.get("result") == "OK"
            match = SUMMARY.search(entry.get("stdout") or "")
            if match:
                passed += int(match.group(2))
                failed += int(match.group(3))
                if not ok and int(match.group(3)) == 0:
                    failed += 1  # died after its summary (sanitizer report at exit)
            elif ok:
                passed += 1
            else:
                failed += 1
            if not ok or (match and int(match.group(3)) > 0):
                reports.append((entry, why(entry)))
    for entry, lines in reports:
        print(f"failed test: {entry.get('name')} ({entry.get('result')}, {entry.get('duration', 0):.1f} s)")
        for line in lines:
            print(f"failure:   {line[:300]}")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

#!/usr/bin/env python3
"""Prints one closing line for a meson test run: 'N passed, N failed'.

Counts doctest test cases (from each test program's own summary line) and
each example program as one test. A test program that failed without a
doctest summary (a crash, a timeout) counts as one failure.
"""
import json
import re
import sys

SUMMARY = re.compile(r"test cases:\s*(\d+)\s*\|\s*(\d+) passed\s*\|\s*(\d+) failed")


def main(path):
    passed = failed = 0
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
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

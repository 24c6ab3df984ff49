#!/usr/bin/env python3
"""Compiles one source file that must fail, and checks the compiler's message.

usage: check_compile_error.py EXPECTED_TEXT SOURCE -- COMPILER [ARGS...]
Passes when compilation fails and its output contains EXPECTED_TEXT.
"""
import subprocess
import sys


def main(argv):
    expected, source = argv[1], argv[2]
    compiler = argv[argv.index("--") + 1:]
    run = subprocess.run(compiler + ["-std=c++20", "-fsyntax-only", source], capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    if run.returncode == 0:
        print(f"{source} compiled, but it must not")
        return 1
    if expected not in output:
        print(f"{source} failed to compile without the message {expected!r}:\n{output[:4000]}")
        return 1
    print(f"{source}: rejected at compile time with {expected!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

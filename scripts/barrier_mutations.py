"""The barrier-deletion study: does the CUDA emulation catch a missing barrier?

Every `__syncthreads();` in the CUDA kernels (csrc/cuda/*.cuh) is deleted, one at a time, and
every `__syncthreads_or(x)` (a vote: a barrier and an OR over the block) is replaced by the
thread's own `x`. For each mutant, the kernels are copied with the one change, the emulated ops
are compiled from the copy (DMMD_EMU_CSRC) and tests/test_cuda_emulated.py runs on them (64-thread
blocks; the race detector's own tests left out): first two cases of each test, then, if those
pass, all of them, stopping at the first failure. A mutant is
caught when a test fails, and the report says by what: the race detector, the comparison across
thread schedules, a divergent barrier, or a wrong value against the reference.

    python scripts/barrier_mutations.py [--json runs/barrier_mutations.json] [--only 3,5]

Slow (a build and up to a full emulated test run per mutant: 27 min for all 17 on a 2-core
machine, 2026-12-01); not part of CI. README ("CUDA kernels") gives the last measured table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "csrc", "cuda")
BARRIER = re.compile(r"__syncthreads\(\);|__syncthreads_or\(([^()]*)\)")
# The race detector's own tests use kernels written for them, not csrc's.
DESELECT = "not race_detector and not order_dependent and not gpu_block_size"
TESTS = os.path.join("tests", "test_cuda_emulated.py")


@dataclass
class Mutant:
    file: str      # relative to the repository
    line: int
    function: str  # the enclosing function, as far as a regex can tell
    original: str
    replacement: str
    caught_by: str = ""  # "" until run; "not caught" when every test passed
    failure: str = ""    # the first failing test and its message's first line
    seconds: float = 0.0


def find_mutants() -> list[Mutant]:
    mutants = []
    for name in sorted(os.listdir(KERNELS)):
        if not name.endswith(".cuh"):
            continue
        path = os.path.join(KERNELS, name)
        lines = open(path).read().split("\n")
        function = "?"
        for number, line in enumerate(lines, 1):
            # A function starts at a __device__ / __global__ line, or a kernel's name under one.
            if re.match(r"^(__device__|__global__)", line) or re.match(r"^    \w+_kernel\(", line):
                names = [n for n in re.findall(r"(\w+)\(", line) if n != "__launch_bounds__"]
                if names:
                    function = names[0]
            for m in BARRIER.finditer(line):
                vote = m.group(1)
                replacement = ";" if vote is None else f"({vote})"
                mutants.append(Mutant(os.path.relpath(path, ROOT), number, function, m.group(0), replacement))
    return mutants


def apply(mutant: Mutant, csrc: str) -> None:
    """Copies csrc/ to `csrc` with the one mutation."""
    shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
    path = os.path.join(os.path.dirname(csrc), mutant.file)
    lines = open(path).read().split("\n")
    line = lines[mutant.line - 1]
    at = line.index(mutant.original)
    lines[mutant.line - 1] = line[:at] + mutant.replacement + line[at + len(mutant.original):]
    open(path, "w").write("\n".join(lines))


def classify(output: str) -> tuple[str, str]:
    """What caught a mutant, from pytest's output."""
    first = next((ln for ln in output.splitlines() if ln.startswith("FAILED ")), "")
    if not first:
        return "error", output.strip().splitlines()[-1] if output.strip() else ""
    race = re.search(r"race in [^\n]*", output)
    if race:
        return "race detector", f"{first[len('FAILED '):].split(' - ')[0]}: {race.group(0)[:300]}"
    if "under schedule" in output:
        kind = "schedules"
    elif "divergent" in output:
        kind = "divergent barrier"
    else:
        kind = "wrong value"
    return kind, first[len("FAILED "):][:300]


def pytest(python: str, env: dict, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def quick_cases(python: str) -> list[str]:
    """The first and the last case of every emulated test function: a quick first pass that most
    mutants fail."""
    proc = pytest(python, dict(os.environ), ["--collect-only", "-k", DESELECT, TESTS])
    by_test: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        if "::" in line:
            by_test.setdefault(line.split("[")[0], []).append(line.strip())
    return [case for cases in by_test.values() for case in dict.fromkeys((cases[0], cases[-1]))]


def run(mutant: Mutant, python: str, quick: list[str]) -> None:
    """Builds and tests one mutant: the quick pass, then (if it passed) every test."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="dmmd-mutant-") as tmp:
        csrc = os.path.join(tmp, "csrc")
        apply(mutant, csrc)
        env = dict(os.environ, DMMD_EMU_CSRC=csrc)
        proc = pytest(python, env, quick)
        if proc.returncode == 0:
            proc = pytest(python, env, ["-k", DESELECT, TESTS])
    mutant.seconds = round(time.time() - start, 1)
    if proc.returncode == 0:
        mutant.caught_by = "not caught"
    elif proc.returncode == 1:
        mutant.caught_by, mutant.failure = classify(proc.stdout + proc.stderr)
    else:
        mutant.caught_by, mutant.failure = "error", (proc.stdout + proc.stderr).strip()[-300:]


def table(mutants: list[Mutant]) -> str:
    rows = ["| # | where | function | mutation | caught by | seconds |", "|---|---|---|---|---|---|"]
    for i, m in enumerate(mutants, 1):
        rows.append(f"| {i} | {m.file}:{m.line} | {m.function} | `{m.original}` -> `{m.replacement}` "
                    f"| {m.caught_by} | {m.seconds} |")
    caught = sum(m.caught_by not in ("not caught", "error", "") for m in mutants)
    rows.append(f"\n{caught} of {len(mutants)} mutants caught.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("--only", default="", help="comma-separated mutant numbers (1-based) to run")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args(argv)
    mutants = find_mutants()
    if args.list:
        print(table(mutants))
        return 0
    chosen = [int(x) for x in args.only.split(",") if x.strip()] or list(range(1, len(mutants) + 1))
    for i in chosen:
        if not 1 <= i <= len(mutants):
            print(f"--only: mutant {i} is not in 1..{len(mutants)}", file=sys.stderr)
            return 2
    quick = quick_cases(sys.executable)
    for i in chosen:
        m = mutants[i - 1]
        run(m, sys.executable, quick)
        print(f"[{i}/{len(mutants)}] {m.file}:{m.line} {m.function}: {m.caught_by} ({m.seconds} s) {m.failure}",
              flush=True)
    picked = [mutants[i - 1] for i in chosen]
    print(table(picked))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump([asdict(m) for m in picked], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

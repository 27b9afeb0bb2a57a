"""Turn pytest-benchmark JSON into a markdown table of times and ratios.

Usage: python bench/report.py results.json [more.json ...] [--baseline eager] [--wide | --gpu]
Each group (one op, size, dtype, setting) gets a row per implementation with its median
time and its speed-up over the baseline implementation measured in the same run; with
``--wide``, one row per group with the eager, compile and dmmd medians and dmmd's speed-up
over each (the README's table); with ``--gpu``, that table plus dmmd's achieved bandwidth and
its share of the card's copy bandwidth (bench/bench_gpu.py records both). Groups that measured
the fused linear losses also get a table of time and peak memory, fused against unfused.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict


def impl_name(bench: dict) -> str:
    params = bench.get("params") or {}
    if "impl" in params:
        return str(params["impl"])
    m = re.search(r"\[(.*)\]", bench["name"])
    return m.group(1).split("-")[-1] if m else bench["name"]


def medians(data: dict) -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"] or bench["name"]][impl_name(bench)] = bench["stats"]["median"]
    return groups


def fmt_ms(seconds: float) -> str:
    """Milliseconds with three significant digits at any scale (0.173, 14.9, 11640)."""
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def wide_table(groups: dict[str, dict[str, float]]) -> str:
    lines = ["| case | eager (ms) | compile (ms) | dmmd (ms) | dmmd vs eager | dmmd vs compile |",
             "|---|---:|---:|---:|---:|---:|"]
    for group in sorted(groups):
        t = groups[group]
        if not {"eager", "compile", "dmmd"} <= t.keys():
            continue
        lines.append(f"| {group} | {fmt_ms(t['eager'])} | {fmt_ms(t['compile'])} | {fmt_ms(t['dmmd'])} | "
                     f"{t['eager'] / t['dmmd']:.1f}x | {t['compile'] / t['dmmd']:.1f}x |")
    return "\n".join(lines)


def from_jsonl(path: str) -> dict:
    """bench_gpu.py's JSON-lines log (DMMD_BENCH_GPU_LOG) in the shape of a pytest-benchmark file."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return {"datetime": "", "machine_info": {"torch": rows[0]["torch"] if rows else "?"},
            "benchmarks": [{"group": r["group"], "name": f"[{r['impl']}]", "params": {"impl": r["impl"]},
                            "stats": {"median": r["median"]}, "extra_info": r["extra_info"]} for r in rows]}


def gpu_table(data: dict) -> str:
    """The wide table of bench/bench_gpu.py results, with dmmd's GB/s and share of copy bandwidth,
    and for the nucleus ops the time of their unstaged kernels (DMMD_ROW_STAGING=0) in the same run."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"] or bench["name"]][impl_name(bench)] = bench

    def ms(b):
        return f"{b['stats']['median'] * 1e3:.2f}" if b else "n/a"

    def ratio(b, ours):
        return f"{b['stats']['median'] / ours['stats']['median']:.1f}x" if b else "n/a"

    lines = ["| case | eager (ms) | compile (ms) | dmmd (ms) | dmmd vs eager | dmmd vs compile | dmmd GB/s "
             "| share of copy | dmmd unstaged (ms) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    device, copy = "?", None
    for group in sorted(groups):
        t = groups[group]
        ours = t.get("dmmd")
        if ours is None:
            continue
        info = ours.get("extra_info", {})
        device, copy = info.get("device", device), info.get("copy_gbps", copy)
        lines.append(f"| {group} | {ms(t.get('eager'))} | {ms(t.get('compile'))} | {ms(ours)} | "
                     f"{ratio(t.get('eager'), ours)} | {ratio(t.get('compile'), ours)} | "
                     f"{info.get('gbps', float('nan')):.0f} | {info.get('share_of_copy', float('nan')):.0%} | "
                     f"{ms(t.get('dmmd_unstaged')) if 'dmmd_unstaged' in t else ''} |")
    copy_s = f"{copy:.0f} GB/s" if copy else "?"
    when = data.get("datetime") or ""
    header = (f"Measured {when[:10] + ' ' if when else ''}on {device}, device-to-device copy {copy_s}, "
              f"torch {data.get('machine_info', {}).get('torch', '?')}.")
    return header + "\n\n" + "\n".join(lines)


def fused_table(data: dict) -> str:
    """The fused linear losses against the unfused path (and Liger's fused cross-entropy where it
    ran): median time and peak step memory, with the fused op's ratios to the unfused path."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"] or bench["name"]][impl_name(bench)] = bench
    lines = ["| case | unfused (ms) | fused (ms) | time fused / unfused | unfused peak (MiB) | fused peak (MiB) "
             "| memory fused / unfused | Liger fused CE (ms, MiB) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for group in sorted(groups):
        t = groups[group]
        if not {"unfused", "fused"} <= t.keys():
            continue
        (tu, tf), (mu, mf) = ([b["stats"]["median"] for b in (t["unfused"], t["fused"])],
                              [b.get("extra_info", {}).get("peak_step_bytes") for b in (t["unfused"], t["fused"])])
        mem = (f"{mu / 2**20:.0f} | {mf / 2**20:.0f} | {mf / mu:.1%}" if mu and mf else "n/a | n/a | n/a")
        liger = t.get("liger_ce")
        liger_s = "not run"
        if liger:
            peak = liger.get("extra_info", {}).get("peak_step_bytes")
            liger_s = f"{liger['stats']['median'] * 1e3:.0f}, " + (f"{peak / 2**20:.0f}" if peak else "n/a")
        lines.append(f"| {group} | {fmt_ms(tu)} | {fmt_ms(tf)} | {tf / tu:.2f}x | {mem} | {liger_s} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def table(data: dict, baseline: str = "eager") -> str:
    groups = medians(data)
    lines = ["| case | impl | median (ms) | speed-up vs " + baseline + " |", "|---|---|---:|---:|"]
    for group in sorted(groups):
        times = groups[group]
        base = times.get(baseline)
        for impl, t in sorted(times.items(), key=lambda kv: -kv[1]):
            ratio = f"{base / t:.2f}x" if base else "n/a"
            lines.append(f"| {group} | {impl} | {t * 1e3:.1f} | {ratio} |")
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    header = (f"Measured {data.get('datetime', '?')[:10]} on {cpu.get('brand_raw', '?')} "
              f"({cpu.get('count', '?')} cores, {machine.get('torch_threads', '?')} torch threads), "
              f"torch {machine.get('torch', '?')}.")
    return header + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="files written by pytest --benchmark-json")
    ap.add_argument("--baseline", default="eager")
    ap.add_argument("--wide", action="store_true", help="one row per case: eager, compile, dmmd")
    ap.add_argument("--gpu", action="store_true", help="the wide table with dmmd's GB/s (bench_gpu.py)")
    args = ap.parse_args(argv)
    runs = []
    for path in args.json:
        if path.endswith(".jsonl"):
            runs.append(from_jsonl(path))
            continue
        with open(path) as f:
            runs.append(json.load(f))
    if args.gpu:
        for data in runs:
            print(gpu_table(data))
    elif args.wide:
        groups: dict[str, dict[str, float]] = {}
        for data in runs:
            groups.update(medians(data))  # a later file's group replaces an earlier one's
        print(wide_table(groups))
    else:
        for data in runs:
            print(table(data, args.baseline))
    for data in runs:  # the fused linear losses, wherever they were measured
        fused = fused_table(data)
        if fused:
            print("\n" + fused)
    return 0


if __name__ == "__main__":
    sys.exit(main())

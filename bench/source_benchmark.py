"""The benchmark of exact sources (not a pytest-benchmark module: a script).

    python bench/source_benchmark.py [--sources chain4x6 parity2x5 ...] [--processes masked uniform]
        [--ks 2 4] [--seeds 0 1 2] [--distill JSON] [--distill-steps N] [--distill-batch B] [--threads 1] [--out DIR]

For each source and process a teacher (trained once, cached), and for each k and seed a D-MMD
student with dmmd distill's defaults (or the --distill overrides: a lever), with its TV along
training; prints the markdown table (student against the teacher at k and 4k steps, mean ± std
over the seeds) and adds its rows to OUT/results_<tag>.json (tag: 'defaults' or a hash of
--distill; a row of the same source, process and k replaces the earlier one) and the table of all
of them to OUT/table_<tag>.md, the curves of its own rows to OUT/curves_<tag>.png.
Every stage is cached under OUT by a hash of its settings: re-running resumes, a changed setting
recomputes only what it changes. See dmmd/apps/source_bench.py for the sources.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dmmd.apps.source_bench import SOURCES, BenchConfig, markdown_table, plot, run_bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/source_bench")
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--processes", nargs="+", default=["masked", "uniform"], choices=["masked", "uniform"])
    ap.add_argument("--ks", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=100_000, help="draws per sampler for the final TV")
    ap.add_argument("--curve-samples", type=int, default=100_000, help="draws per reading along training")
    ap.add_argument("--curve-points", type=int, default=4, help="readings along training (the last at the end)")
    ap.add_argument("--distill-steps", type=int, default=2000)
    ap.add_argument("--distill-batch", type=int, default=256)
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--teacher-width", type=int, default=64)
    ap.add_argument("--teacher-depth", type=int, default=2)
    ap.add_argument("--distill", default="{}", help='DistillConfig fields as JSON, e.g. \'{"noise_per": "token"}\'')
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(sources=tuple(args.sources), processes=tuple(args.processes), ks=tuple(args.ks),
                      seeds=tuple(args.seeds), samples=args.samples, curve_samples=args.curve_samples,
                      curve_points=args.curve_points, distill_steps=args.distill_steps,
                      distill_batch=args.distill_batch,
                      teacher_steps=args.teacher_steps, teacher_width=args.teacher_width,
                      teacher_depth=args.teacher_depth, distill=json.loads(args.distill), device=args.device,
                      out=args.out)
    t0 = time.perf_counter()
    rows = run_bench(cfg, progress=False, log=lambda line: print(line, flush=True))
    table = markdown_table(rows)
    tag = cfg.tag()
    with open(cfg.results_path()) as f:  # this run's rows and earlier runs'
        every_row = json.load(f)["rows"]
    with open(os.path.join(cfg.out, f"table_{tag}.md"), "w") as f:
        f.write(markdown_table(every_row) + "\n")
    plot(rows, os.path.join(cfg.out, f"curves_{tag}.png"))
    print(f"\n{table}\n\n({time.perf_counter() - t0:.0f} s, torch {torch.__version__}, {args.device}, "
          f"{args.threads} threads, distill {args.distill})")


if __name__ == "__main__":
    main()

"""The D-MMD image study (not a pytest-benchmark module: a script).

    python bench/distill_images.py [--out runs/image_study] [--processes masked uniform]
        [--parts main noise temperature] [--ks 2 4 8] [--student-seeds 0 1 2] [--samples 2000]
        [--threads N] [--report]

Trains a masked and a uniform teacher on scikit-learn's 8x8 digits (or --data), samples them
with 1-64 steps, distills k = 2, 4, 8 students with `dmmd distill`'s defaults, and writes FID
by steps (Table 1's shape), the no-noise ablation (Table 6), the distillation-temperature sweep,
one PNG grid per sampler (OUT/grids) and OUT/fid_by_steps.png. With --student-seeds the main
students are distilled once per seed (same teacher, same draws) and the table adds their mean ±
std against the teacher at k and 4k steps. Every stage resumes; several
invocations with different --processes / --parts can share one OUT side by side once the FID
classifier is there (the README's run: `dmmd reference train --data digits --out
OUT/classifier` first, then `--processes masked --parts main temperature` beside `--processes
uniform --parts main` followed by `--processes masked --parts noise`, each with --threads 1).
--report only gathers what has finished.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dmmd.apps.image_study import ImageStudyConfig, report, run_image_study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/image_study")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--processes", nargs="+", default=["masked", "uniform"], choices=["masked", "uniform"])
    ap.add_argument("--parts", nargs="+", default=["main", "noise", "temperature"],
                    choices=["main", "noise", "temperature"])
    ap.add_argument("--ks", nargs="+", type=int, default=[2, 4, 8], help="student step counts")
    ap.add_argument("--student-seeds", nargs="+", type=int, default=None,
                    help="distillation seeds of the main students (default: the study's seed, 0)")
    ap.add_argument("--samples", type=int, default=2000, help="draws per sampler (default 2000)")
    ap.add_argument("--teacher-steps", type=int, default=4000)
    ap.add_argument("--distill-steps", type=int, default=3000)
    ap.add_argument("--distill", default="{}", help="DistillConfig fields as JSON")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--report", action="store_true", help="only gather what has finished")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ImageStudyConfig(out=args.out, data=args.data, processes=tuple(args.processes), parts=tuple(args.parts),
                           ks=tuple(args.ks),
                           student_seeds=tuple(args.student_seeds) if args.student_seeds else None,
                           samples=args.samples, teacher_steps=args.teacher_steps, distill_steps=args.distill_steps,
                           distill=json.loads(args.distill), device=args.device)
    t0 = time.perf_counter()
    if not args.report:
        run_image_study(cfg)
    report(cfg)
    with open(os.path.join(cfg.out, "table.md")) as f:
        print("\n" + f.read())
    print(f"({time.perf_counter() - t0:.0f} s, torch {torch.__version__}, {args.device}, {args.threads} threads)")


if __name__ == "__main__":
    main()

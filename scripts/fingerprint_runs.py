"""Fingerprints of short runs, to prove a restructure changes no behaviour: a 30-step teacher per
process, 30-step distillations of each (masked: unfused and fused; uniform: unfused, fused and
Appendix D's posterior form) and a student's draws; one SHA-256 per stage over its weights
(every tensor of its checkpoint, in name order) and its samples. With ``--demo DIR``: every
checkpoint under a finished demo's directory and its results (timings left out). Run it at two
commits and compare the lines:

    python scripts/fingerprint_runs.py --out /tmp/fp > before.txt   # at the old commit
    python scripts/fingerprint_runs.py --out /tmp/fp2 > after.txt   # at the new one
    diff before.txt after.txt

Uses one thread so the float reductions are the same from run to run."""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os

import torch

from dmmd.diffusion.sampling import sample
from dmmd.training.checkpoint import load_tensors
from dmmd.training.distill import DistillConfig, distill, load_student, student_fn
from dmmd.training.teacher import TeacherConfig, train_teacher

TEACHER = dict(data="markov", vocab_size=5, length=8, width=32, depth=1, heads=2, batch_size=16, steps=30,
               warmup=2, eval_every=0, save_every=30, seed=3)
STUDENTS = {"masked": [{}, {"fused_losses": True}], "uniform": [{}, {"fused_losses": True}, {"form": "posterior"}]}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def checkpoint_digest(checkpoint: str, names: tuple[str, ...]) -> str:
    return digest({f"{n}.{k}": v for n in names for k, v in load_tensors(checkpoint, n).items()})


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def demo_fingerprints(out: str) -> None:
    from safetensors.torch import load_file

    for path in sorted(glob.glob(os.path.join(out, "**", "*.safetensors"), recursive=True)):
        print(f"{os.path.relpath(path, out)}: {digest(load_file(path))}")
    with open(os.path.join(out, "results.json")) as f:
        parts = _untimed(json.load(f)["parts"])
    print(f"results: {hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="a fresh directory for the runs")
    ap.add_argument("--demo", help="fingerprint this finished demo directory instead")
    args = ap.parse_args()
    if args.demo:
        return demo_fingerprints(args.demo)
    if not args.out:
        ap.error("--out or --demo is required")
    out = args.out
    torch.set_num_threads(1)
    for process, students in STUDENTS.items():
        tdir = os.path.join(out, f"teacher_{process}")
        train_teacher(TeacherConfig.from_dict({**TEACHER, "process": process, "out": tdir}), progress=False)
        print(f"teacher {process}: {checkpoint_digest(os.path.join(tdir, 'checkpoint'), ('model', 'ema'))}")
        for i, extra in enumerate(students):
            sdir = os.path.join(out, f"student_{process}_{i}")
            cfg = DistillConfig.from_dict({"teacher": os.path.join(tdir, "checkpoint"), "student_steps": 2,
                                           "steps": 30, "batch_size": 16, "save_every": 30, "seed": 1,
                                           "out": sdir, **extra})
            distill(cfg, progress=False)
            ckpt = os.path.join(sdir, "checkpoint")
            student, proc, _ = load_student(ckpt)
            x = sample(student_fn(student, 7), proc, 64, TEACHER["length"], 2, seed=5)
            print(f"student {process} {extra or 'defaults'}: weights "
                  f"{checkpoint_digest(ckpt, ('generator', 'aux', 'ema'))} samples {digest({'x': x})}")


if __name__ == "__main__":
    main()

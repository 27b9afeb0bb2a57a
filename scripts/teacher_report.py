"""Report on a trained teacher: its validation ELBO bound (bits per token, EMA and raw
weights) and samples at a few step counts (decoded for byte text).

    python scripts/teacher_report.py runs/teacher_text/checkpoint --steps 16 128 --num 2
"""
from __future__ import annotations

import argparse
import json

import torch

from dmmd.data import ByteText, make_source
from dmmd.diffusion.sampling import sample
from dmmd.training.teacher import TeacherConfig, load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--num", type=int, default=2)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    report = {}
    for weights in ("ema", "raw"):
        model, process, state = load_teacher(args.checkpoint, use_ema=weights == "ema")
        cfg = TeacherConfig.from_dict(state["config"])
        source = make_source(cfg.source)
        gen = torch.Generator().manual_seed(777)
        with torch.no_grad():
            bits = torch.cat([process.nll_bound_bits(lambda z, t, m=model: torch.softmax(m(z, t), -1),
                                                     source.sample(cfg.run.batch_size, gen, split="val"),
                                                     steps=128, generator=gen)
                              for _ in range(args.val_batches)])
        report[f"val_bits_per_token_{weights}"] = round(float(bits.mean()), 4)
        report[f"val_bits_stderr_{weights}"] = round(float(bits.std() / len(bits) ** 0.5), 4)
        if weights == "ema":
            report["step"] = state["step"]
            for k in args.steps:
                x = sample(lambda z, t, m=model: m(z, t), process, args.num, cfg.source.length, k,
                           seed=args.seed)
                report[f"samples_{k}_steps"] = [ByteText.decode(r) if cfg.source.data == "text" else r.tolist()
                                                for r in x]
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()

"""Where a masked D-MMD student loses to its teacher, on the study's exact Markov source (a
script, not a pytest-benchmark module; the README's "Diagnosis" quotes it).

    python bench/masked_diagnosis.py [--k 4] [--seed 0] [--out runs/masked_diagnosis]
        [--set '{"noise_into": "embedding"}']

Trains (or resumes) the study's masked teacher and one k-step student with ``dmmd distill``'s
defaults (``--set``: DistillConfig fields to change), then measures, all as total variation
(TV) to the data distribution over every sequence:

- the training curve: the student's TV (EMA and raw weights, 20000 samples) every ``--every``
  steps (the run stops there and resumes, which replays exactly the steps it would have taken);
- per step: the sampler with one coarse step ``j`` (of ``k``) taken by the student, or by the
  teacher, and every other stretch of time taken by the teacher in fine steps: how much each
  coarse step alone costs;
- the share of samples that contain an impossible transition, and their exact NLL.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dmmd.apps.markov_study import StudyConfig, _distill_config, _teacher_config
from dmmd.data import make_source
from dmmd.diffusion.sampling import sample
from dmmd.metrics import total_variation
from dmmd.training.distill import distill, load_student, student_fn
from dmmd.training.teacher import load_teacher, train_teacher


@torch.no_grad()
def sample_plan(plan, process, length: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Masked sampling along ``plan``, a list of ``(model_fn, t, s)`` steps from t = 1 to 0:
    each step draws x from the model and reveals each masked token with probability
    ``(alpha_s - alpha_t) / (1 - alpha_t)``."""
    z = torch.full((n, length), process.mask_id, dtype=torch.long)
    for fn, t, s in plan:
        probs = torch.softmax(fn(z, torch.full((n,), t)).double(), -1)
        x = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).view(n, length)
        a_t, a_s = float(process.alpha(torch.tensor(t))), float(process.alpha(torch.tensor(s)))
        reveal = (torch.rand(n, length, generator=gen) < (a_s - a_t) / (1 - a_t)) & (z == process.mask_id)
        z = torch.where(reveal, x, z)
    return z


def fine(fn, t_hi: float, t_lo: float, m: int) -> list:
    return [(fn, t_hi - (t_hi - t_lo) * i / m, t_hi - (t_hi - t_lo) * (i + 1) / m) for i in range(m)]


def one_coarse_step(coarse_fn, teacher_fn, k: int, j: int) -> list:
    """Coarse step ``j`` of ``k`` by ``coarse_fn``; the time before it and after it in fine
    teacher steps (4 before, 16 after)."""
    hi, lo = 1 - j / k, 1 - (j + 1) / k
    before = fine(teacher_fn, 1.0, hi, 4) if j else []
    after = fine(teacher_fn, lo, 0.0, 16) if lo > 0 else []
    return before + [(coarse_fn, hi, lo)] + after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="distillation seed")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--every", type=int, default=500, help="training-curve interval (0: no curve)")
    ap.add_argument("--samples", type=int, default=50_000, help="samples per per-step TV")
    ap.add_argument("--set", default="{}", help="DistillConfig fields to change, as JSON")
    ap.add_argument("--out", default="runs/masked_diagnosis")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    study = StudyConfig(out=args.out, distill_steps=args.steps, distill=json.loads(args.set), processes=("masked",))
    tcfg = _teacher_config(study, "masked")
    train_teacher(tcfg, progress=False)
    teacher, process, _ = load_teacher(os.path.join(tcfg.run.out, "checkpoint"))
    source = make_source(tcfg.source)
    cfg = _distill_config(study, "masked", args.k, args.seed)
    length, k = source.length, args.k
    result = {"k": k, "seed": args.seed, "set": json.loads(args.set), "curve": []}

    t0 = time.perf_counter()
    stops = list(range(args.every, args.steps, args.every)) if args.every else []
    for stop in [*stops, args.steps]:
        distill(cfg, progress=False, stop_at=stop)
        if args.every:
            row = {"step": stop}
            for name, ema in (("ema", True), ("raw", False)):
                st, _, _ = load_student(os.path.join(cfg.run.out, "checkpoint"), use_ema=ema)
                x = sample(student_fn(st, 5), process, 20_000, length, k, seed=3, batch_size=10_000)
                row[name] = round(total_variation(x, source).value, 3)
            result["curve"].append(row)
            print("curve", row, flush=True)
    result["distill_seconds"] = round(time.perf_counter() - t0)

    student, _, _ = load_student(os.path.join(cfg.run.out, "checkpoint"))
    s_fn, t_fn = student_fn(student, 7), (lambda z, t: teacher(z, t))
    gen = torch.Generator().manual_seed(123)

    def tv(plan) -> float:
        x = torch.cat([sample_plan(plan, process, length, 10_000, gen) for _ in range(args.samples // 10_000)])
        return round(total_variation(x, source).value, 4)

    def share_and_nll(plan) -> dict:
        x = torch.cat([sample_plan(plan, process, length, 10_000, gen) for _ in range(args.samples // 10_000)])
        lp = source.log_prob(x)
        ok = torch.isfinite(lp)
        return {"impossible": round(float((~ok).double().mean()), 4), "nll_possible": round(float(-lp[ok].mean()), 3)}

    result["per_step"] = {
        "teacher": [tv(one_coarse_step(t_fn, t_fn, k, j)) for j in range(k)],
        "student": [tv(one_coarse_step(s_fn, t_fn, k, j)) for j in range(k)]}
    result["all_fine_teacher"] = tv(fine(t_fn, 1.0, 0.0, 64))
    result["samples"] = {"teacher_k": share_and_nll(fine(t_fn, 1.0, 0.0, k)),
                         "teacher_64": share_and_nll(fine(t_fn, 1.0, 0.0, 64)),
                         "student_k": share_and_nll(fine(s_fn, 1.0, 0.0, k))}
    p = source.all_sequences()[1]
    result["data_entropy_nats"] = round(float(-(p[p > 0] * p[p > 0].log()).sum()), 3)
    print(json.dumps(result, indent=1))
    with open(os.path.join(args.out, f"diagnosis_k{k}_seed{args.seed}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

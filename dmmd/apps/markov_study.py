"""The distillation study on a source with an exactly known distribution (issue: D-MMD must
beat its teacher at the same number of steps).

For each process (masked, uniform): train a teacher on :class:`dmmd.data.sources.MarkovSource`, then
for each ``k`` distill a D-MMD student and measure the total variation to the data distribution
(:func:`dmmd.metrics.total_variation`, over every sequence) of the teacher sampled with ``k``
and ``4k`` steps and of the student sampled with ``k`` steps. Every stage resumes from its
checkpoint under ``out``. ``bench/distill_markov.py`` runs the full study; a short one is a test.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from dmmd.data import make_source
from dmmd.diffusion.sampling import sample
from dmmd.metrics import total_variation
from dmmd.options import Options, check_keys, option
from dmmd.training.distill import DistillConfig, distill, load_student, student_fn
from dmmd.training.teacher import TeacherConfig, load_teacher, train_teacher

# DistillConfig keys the study sets itself (refused in ``distill``, by name)
STUDY_OWNED = {"teacher": "is the study's own teacher", "student_steps": "is set per student by ks",
               "batch_size": "is a study option: distill_batch", "steps": "is a study option: distill_steps",
               "seed": "is a study option: seed", "out": "is set under the study's out"}


@dataclass
class StudyConfig(Options):
    """The exact-source study: teachers, students and the TV sample sizes."""

    processes: tuple[str, ...] = option(("masked", "uniform"), "diffusion processes to study")
    ks: tuple[int, ...] = option((2, 4), "student step counts")
    samples: int = option(100_000, "draws per sampler for the TV estimate")
    vocab_size: int = option(4, "V of the Markov source")
    length: int = option(6, "L of the Markov source")
    fanout: int = option(2, "successors per state of the Markov source")
    teacher_steps: int = option(1500, "teacher training steps")
    teacher_width: int = option(64, "teacher width")
    teacher_batch: int = option(256, "teacher batch size")
    distill_steps: int = option(4000, "D-MMD steps per student")
    distill_batch: int = option(256, "D-MMD batch size")
    distill: dict = option({"beta1": 0.0, "aux_per_gen": 2, "lr_gen": 3e-4, "lr_aux": 1e-3, "ema": 0.99,
                            "warmup": 20}, "further DistillConfig fields")
    seed: int = option(0, "seed of every stage")
    out: str = option("runs/markov_study", "output directory; every stage resumes")


def _teacher_config(cfg: StudyConfig, process: str) -> TeacherConfig:
    return TeacherConfig.from_dict(dict(
        data="markov", vocab_size=cfg.vocab_size, length=cfg.length, markov_fanout=cfg.fanout, process=process,
        schedule="linear", width=cfg.teacher_width, depth=2, heads=2, batch_size=cfg.teacher_batch,
        steps=cfg.teacher_steps, lr=2e-3, warmup=50, ema=0.99, eval_every=0, save_every=cfg.teacher_steps,
        seed=cfg.seed, out=os.path.join(cfg.out, f"teacher_{process}")))


def _distill_config(cfg: StudyConfig, kind: str, k: int) -> DistillConfig:
    check_keys(cfg.distill, DistillConfig.leaf_names(), "distill", owned=STUDY_OWNED)
    return DistillConfig.from_dict({
        "teacher": os.path.join(cfg.out, f"teacher_{kind}", "checkpoint"), "student_steps": k,
        "batch_size": cfg.distill_batch, "steps": cfg.distill_steps, "seed": cfg.seed,
        "save_every": max(1, cfg.distill_steps // 4), "out": os.path.join(cfg.out, f"student_{kind}_k{k}"),
        # masked diffusion may train the auxiliary model on x_hat_eta(z_t) (lower variance);
        # uniform must use the hard sample (section 3.2)
        "soft_target": kind == "masked", **cfg.distill})


def _tv(model_fn, process, source, cfg: StudyConfig, steps: int) -> dict:
    x = sample(model_fn, process, cfg.samples, cfg.length, steps, seed=cfg.seed + 1, batch_size=25_000)
    d = total_variation(x, source)
    return {"tv": d.value, "tv_stderr": d.stderr}


def run_study(cfg: StudyConfig, *, progress: bool = True, log=print) -> list[dict]:
    """Run (or resume) the study; returns one row per (process, k) and writes ``out/results.json``."""
    for kind in cfg.processes:  # refuse a bad distill dict before any work
        for k in cfg.ks:
            _distill_config(cfg, kind, k)
    rows = []
    for kind in cfg.processes:
        tcfg = _teacher_config(cfg, kind)
        t0 = time.perf_counter()
        train_teacher(tcfg, progress=progress)
        teacher, process, _ = load_teacher(os.path.join(tcfg.run.out, "checkpoint"))
        source = make_source(tcfg.source)
        teacher_fn = lambda z, t, m=teacher: m(z, t)  # noqa: E731
        log(f"{kind}: teacher ready ({time.perf_counter() - t0:.0f} s)")
        for k in cfg.ks:
            dcfg = _distill_config(cfg, kind, k)
            t0 = time.perf_counter()
            result = distill(dcfg, progress=progress)
            seconds = time.perf_counter() - t0
            student, _, _ = load_student(result["checkpoint"])
            row = {"process": kind, "k": k, "distill_seconds": round(seconds, 1),
                   "teacher_k": _tv(teacher_fn, process, source, cfg, k),
                   "teacher_4k": _tv(teacher_fn, process, source, cfg, 4 * k),
                   "student_k": _tv(student_fn(student, cfg.seed + 2), process, source, cfg, k)}
            row["reduction"] = 1 - row["student_k"]["tv"] / row["teacher_k"]["tv"]
            log(format_row(row))
            rows.append(row)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump({"config": cfg.to_dict(), "rows": rows}, f, indent=1)
    return rows


def format_row(row: dict) -> str:
    f = lambda d: f"{d['tv']:.3f} ± {d['tv_stderr']:.3f}"  # noqa: E731
    return (f"| {row['process']} | {row['k']} | {f(row['teacher_k'])} | {f(row['student_k'])} | "
            f"{100 * row['reduction']:.0f}% | {f(row['teacher_4k'])} |")


def markdown_table(rows: list[dict]) -> str:
    head = ("| process | k | teacher, k steps (TV) | D-MMD student, k steps (TV) | TV reduction | "
            "teacher, 4k steps (TV) |\n|---|---|---|---|---|---|")
    return "\n".join([head, *(format_row(r) for r in rows)])



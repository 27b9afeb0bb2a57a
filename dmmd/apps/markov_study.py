"""The distillation study on a source with an exactly known distribution (issue: D-MMD must
beat its teacher at the same number of steps).

For each process (masked, uniform): train a teacher on :class:`dmmd.data.sources.MarkovSource`, then
for each ``k`` and each distillation seed distill a D-MMD student with ``dmmd distill``'s
defaults for that process, and measure the total variation to the data distribution
(:func:`dmmd.metrics.total_variation`, over every sequence) of the teacher sampled with ``k``
and ``4k`` steps and of the student sampled with ``k`` steps: the mean and the spread over the
seeds (for the teacher, over as many sampling seeds). Every stage resumes from its checkpoint
under ``out``. ``bench/distill_markov.py`` runs the full study; a short one is a test.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from functools import partial

from dmmd.apps.draws import draw
from dmmd.apps.stages import place, shared_stage
from dmmd.data import make_source
from dmmd.metrics import total_variation
from dmmd.options import Options, check_keys, option
from dmmd.training.checkpoint import write_json_atomic
from dmmd.training.distill import DistillConfig, distill, load_student
from dmmd.training.teacher import TeacherConfig, load_teacher, train_teacher

# DistillConfig keys the study sets itself (refused in ``distill``, by name)
STUDY_OWNED = {"teacher": "is the study's own teacher", "student_steps": "is set per student by ks",
               "batch_size": "is a study option: distill_batch", "steps": "is a study option: distill_steps",
               "seed": "is a study option: seeds", "out": "is set under the study's out",
               "device": "is a study option: device"}


@dataclass
class StudyConfig(Options):
    """The exact-source study: teachers, students and the TV sample sizes."""

    processes: tuple[str, ...] = option(("masked", "uniform"), "diffusion processes to study")
    ks: tuple[int, ...] = option((2, 4), "student step counts")
    seeds: tuple[int, ...] = option((0, 1, 2), "distillation seeds: one student per (process, k, seed)")
    samples: int = option(100_000, "draws per sampler for the TV estimate")
    vocab_size: int = option(4, "V of the Markov source")
    length: int = option(6, "L of the Markov source")
    fanout: int = option(2, "successors per state of the Markov source")
    teacher_steps: int = option(1500, "teacher training steps")
    teacher_width: int = option(64, "teacher width")
    teacher_depth: int = option(2, "teacher depth (transformer blocks); students copy the teacher")
    teacher_batch: int = option(256, "teacher batch size")
    distill_steps: int = option(4000, "D-MMD steps per student")
    distill_batch: int = option(256, "D-MMD batch size")
    distill: dict = option({}, "DistillConfig fields to change (none: dmmd distill's per-process defaults)")
    seed: int = option(0, "seed of the teachers and the TV samples")
    device: str = option("cpu", "cpu or cuda: where teachers and students train and sample")
    out: str = option("runs/markov_study", "output directory; every stage resumes")


def _teacher_config(cfg: StudyConfig, process: str) -> TeacherConfig:
    return place(TeacherConfig.from_dict(dict(
        data="markov", vocab_size=cfg.vocab_size, length=cfg.length, markov_fanout=cfg.fanout, process=process,
        schedule="linear", width=cfg.teacher_width, depth=cfg.teacher_depth, heads=2, batch_size=cfg.teacher_batch,
        steps=cfg.teacher_steps, lr=2e-3, warmup=50, ema=0.99, eval_every=0, save_every=cfg.teacher_steps,
        seed=cfg.seed, device=cfg.device, out="")), cfg.out, f"teacher_{process}")


def _distill_config(cfg: StudyConfig, kind: str, k: int, seed: int) -> DistillConfig:
    check_keys(cfg.distill, DistillConfig.leaf_names(), "distill", owned=STUDY_OWNED)
    return place(DistillConfig.from_dict({
        "teacher": os.path.join(_teacher_config(cfg, kind).run.out, "checkpoint"), "student_steps": k,
        "batch_size": cfg.distill_batch, "steps": cfg.distill_steps, "seed": seed,
        "save_every": max(1, cfg.distill_steps // 4), "device": cfg.device,
        "out": "", **cfg.distill}), cfg.out, f"student_{kind}_k{k}_seed{seed}")


def _tv(model, noise_seed: int, process, source, cfg: StudyConfig, steps: int, seed: int) -> dict:
    x = draw(model, process, cfg.samples, cfg.length, steps, seed=seed, noise_seed=noise_seed, batch_size=25_000,
             device=cfg.device)
    d = total_variation(x, source)
    return {"tv": d.value, "tv_stderr": d.stderr}


def summarize(runs: list[dict]) -> dict:
    """Mean, standard deviation, min and max of ``tv`` over runs (one per seed)."""
    tvs = [r["tv"] for r in runs]
    return {"tv": statistics.fmean(tvs), "tv_std": statistics.stdev(tvs) if len(tvs) > 1 else 0.0,
            "tv_min": min(tvs), "tv_max": max(tvs), "runs": runs}


def run_study(cfg: StudyConfig, *, progress: bool = True, log=print) -> list[dict]:
    """Run (or resume) the study; returns one row per (process, k) and writes ``out/results.json``."""
    if not cfg.seeds:
        raise ValueError("seeds must name at least one distillation seed")
    for kind in cfg.processes:  # refuse a bad distill dict before any work
        for k in cfg.ks:
            _distill_config(cfg, kind, k, cfg.seeds[0]).validate(kind)
    rows = []
    start = time.perf_counter()
    for kind in cfg.processes:
        tcfg = _teacher_config(cfg, kind)
        t0 = time.perf_counter()
        shared_stage(partial(train_teacher, tcfg, progress=progress), log=log)
        teacher, process, _ = load_teacher(os.path.join(tcfg.run.out, "checkpoint"), device=cfg.device)
        source = make_source(tcfg.source)
        log(f"{kind}: teacher ready ({time.perf_counter() - t0:.0f} s)")
        for k in cfg.ks:
            students, seconds = [], 0.0
            for seed in cfg.seeds:
                result = distill(_distill_config(cfg, kind, k, seed), progress=progress)
                seconds += result["train_seconds"]  # all of the training, resumed or not
                student, _, _ = load_student(result["checkpoint"], device=cfg.device)
                students.append(_tv(student, seed + 2, process, source, cfg, k, cfg.seed + 1 + seed))
            samplings = [cfg.seed + 1 + seed for seed in cfg.seeds]
            row = {"process": kind, "k": k, "seeds": list(cfg.seeds), "distill_seconds": round(seconds, 1),
                   "teacher_k": summarize([_tv(teacher, 0, process, source, cfg, k, s) for s in samplings]),
                   "teacher_4k": summarize([_tv(teacher, 0, process, source, cfg, 4 * k, s) for s in samplings]),
                   "student_k": summarize(students)}
            row["reduction"] = 1 - row["student_k"]["tv"] / row["teacher_k"]["tv"]
            log(format_row(row))
            rows.append(row)
    write_json_atomic(os.path.join(cfg.out, "results.json"),
                      {"config": cfg.to_dict(), "rows": rows, "seconds": round(time.perf_counter() - start)})
    return rows


def format_row(row: dict) -> str:
    def f(d: dict) -> str:
        return f"{d['tv']:.3f} ± {d['tv_std']:.3f} ({d['tv_min']:.3f}-{d['tv_max']:.3f})"
    return (f"| {row['process']} | {row['k']} | {f(row['teacher_k'])} | {f(row['student_k'])} | "
            f"{100 * row['reduction']:.0f}% | {f(row['teacher_4k'])} |")


def markdown_table(rows: list[dict]) -> str:
    head = ("| process | k | teacher, k steps (TV) | D-MMD student, k steps (TV) | TV reduction | "
            "teacher, 4k steps (TV) |\n|---|---|---|---|---|---|")
    return "\n".join([head, *(format_row(r) for r in rows)])

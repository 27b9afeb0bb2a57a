"""D-MMD on images (pixels as tokens): FID by number of steps in the shape of the paper's
Table 1, its Table 6 ablation (masked students without noise input) and a sweep over the
teacher temperature used in distillation (its Figure 6).

For each process (masked, uniform): train a teacher on the image data (default: scikit-learn's
8x8 digits), sample it with 1, 2, ... 64 steps, distill a D-MMD student for each ``k`` with
``dmmd distill``'s defaults and sample it with ``k`` steps. Every sampler's FID (features: the
classifier ``dmmd reference train`` trains on the same data, :mod:`dmmd.training.classifier`;
statistics of ``samples`` draws against every training image, bootstrap standard error) and a
PNG grid of its first draws are written as it finishes; every stage resumes. ``parts`` picks
what runs: ``main`` (teachers and students), ``noise`` (masked students at ``noise_ks`` with no
noise input), ``temperature`` (masked students at ``temperature_k`` distilled with each of
``temperatures``). With ``student_seeds`` the main students are distilled once per seed (the
teacher and every draw keep ``seed``), and the report adds their mean and spread against the
teacher at k and 4k steps. :func:`report` gathers whatever has finished into tables and the plot;
``bench/distill_images.py`` runs the study.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import partial

import torch

from dmmd.apps.draws import draw
from dmmd.apps.stages import cached, keyed_file, place, shared_stage
from dmmd.apps.verdicts import reaches, summarize
from dmmd.data import make_source
from dmmd.data.images import save_grid
from dmmd.extras import require
from dmmd.metrics.evaluate import ImageFID
from dmmd.models.image_classifier import CONFIG_FILE, is_classifier
from dmmd.options import Options, check_keys, option
from dmmd.training.checkpoint import write_json_atomic
from dmmd.training.distill import DistillConfig, distill, load_student
from dmmd.training.reference import CLASSIFIER_DEFAULTS, reference_config, train_reference
from dmmd.training.teacher import TeacherConfig, load_teacher, train_teacher

PARTS = ("main", "noise", "temperature")
# DistillConfig keys the study sets itself (refused in ``distill``, by name)
STUDY_OWNED = {"teacher": "is the study's own teacher", "student_steps": "is set per student by ks (--ks)",
               "batch_size": "is set by distill_batch (--distill-batch)",
               "steps": "is set by distill_steps (--distill-steps)", "seed": "is set by seed (--seed)",
               "out": "is set under out (--out)", "device": "is set by device (--device)"}
GRID = 64  # draws shown in each sampler's PNG grid


@dataclass
class ImageStudyConfig(Options):
    """The image study: teachers, students, FID and pictures (every stage resumes under ``out``)."""

    data: str = option("digits", "image data: digits, or a .npy/.npz, PNG folder or CIFAR-10 batches")
    levels: int = option(256, "tokens per channel value of image files")
    processes: tuple[str, ...] = option(("masked", "uniform"), "diffusion processes")
    parts: tuple[str, ...] = option(PARTS, "main: teachers and students; noise: masked students without noise "
                                           "input; temperature: masked students by distillation temperature")
    ks: tuple[int, ...] = option((2, 4, 8), "student step counts")
    teacher_grid: tuple[int, ...] = option((1, 2, 4, 8, 16, 32, 64), "teacher step counts")
    noise_ks: tuple[int, ...] = option((2, 4), "noise part: k of the masked students without noise input")
    temperature_k: int = option(4, "temperature part: k of the masked students")
    temperatures: tuple[float, ...] = option((0.8, 0.9), "temperature part: teacher temperatures in distillation "
                                                         "(1.0 is the main student)")
    samples: int = option(2000, "draws per sampler for the FID")
    classifier_steps: int = option(CLASSIFIER_DEFAULTS["steps"], "training steps of the FID classifier")
    teacher_width: int = option(64, "teacher width")
    teacher_depth: int = option(2, "teacher depth")
    teacher_heads: int = option(2, "teacher attention heads")
    teacher_steps: int = option(4000, "teacher training steps")
    teacher_batch: int = option(64, "teacher batch size")
    distill_steps: int = option(3000, "D-MMD steps per student")
    masked_ks: tuple[int, ...] | None = option(None, "the masked students' step counts (none: ks)")
    masked_distill_steps: int | None = option(None, "D-MMD steps per masked student (none: distill_steps)")
    distill_batch: int = option(64, "D-MMD batch size")
    distill: dict = option({}, "DistillConfig fields to change (none: dmmd distill's per-process defaults)")
    seed: int = option(0, "seed of the teachers, the students and the draws")
    student_seeds: tuple[int, ...] | None = option(None, "distillation seeds of the main students, each a student "
                                                         "(none: seed alone); teachers and draws keep seed")
    device: str = option("cpu", "cpu or cuda")
    out: str = option("runs/image_study", "output directory; every stage resumes")

    def validate(self) -> None:
        for part in self.parts:
            if part not in PARTS:
                raise ValueError(f"parts must be among {PARTS}, got {part!r}")
        for name in ("ks", "teacher_grid", "noise_ks", "masked_ks"):
            if any(k < 1 for k in getattr(self, name) or ()):
                raise ValueError(f"{name} must hold step counts >= 1, got {getattr(self, name)}")
        if self.masked_distill_steps is not None and self.masked_distill_steps < 1:
            raise ValueError(f"masked_distill_steps must be >= 1, got {self.masked_distill_steps}")
        if self.student_seeds is not None and (not self.student_seeds
                                               or len(set(self.student_seeds)) != len(self.student_seeds)):
            raise ValueError(f"student_seeds must be distinct seeds, got {self.student_seeds}")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2, got {self.samples}")
        check_keys(self.distill, DistillConfig.leaf_names(), "distill", owned=STUDY_OWNED)
        for process in self.processes:  # each teacher's and student's options, named, before any work
            teacher_config(self, process).validate()
            for name, k, changes in students(self, process):
                distill_config(self, process, name, k, changes).validate(process)


def teacher_config(cfg: ImageStudyConfig, process: str) -> TeacherConfig:
    """``process``'s teacher, in ``out/teacher_{process}-<key>`` (:mod:`dmmd.apps.stages`)."""
    return place(TeacherConfig.from_dict(dict(
        data=cfg.data, levels=cfg.levels, process=process, schedule="linear", width=cfg.teacher_width,
        depth=cfg.teacher_depth, heads=cfg.teacher_heads, batch_size=cfg.teacher_batch, steps=cfg.teacher_steps,
        lr=2e-3, warmup=100, ema=0.999, eval_every=0, save_every=1000, seed=cfg.seed, device=cfg.device,
        out="")), cfg.out, f"teacher_{process}")


def ks_of(cfg: ImageStudyConfig, process: str) -> tuple[int, ...]:
    """``process``'s student step counts."""
    return cfg.masked_ks if process == "masked" and cfg.masked_ks is not None else cfg.ks


def steps_of(cfg: ImageStudyConfig, process: str) -> int:
    """D-MMD steps of ``process``'s students."""
    return cfg.masked_distill_steps if process == "masked" and cfg.masked_distill_steps is not None \
        else cfg.distill_steps


def seeds_of(cfg: ImageStudyConfig) -> tuple[int, ...]:
    """The main students' distillation seeds."""
    return cfg.student_seeds if cfg.student_seeds is not None else (cfg.seed,)


def main_student(cfg: ImageStudyConfig, process: str, k: int, seed: int) -> tuple[str, int, dict]:
    """(name, k, DistillConfig changes) of the main student of ``process`` at ``k`` distilled
    with ``seed`` (the study's own seed keeps the plain name)."""
    if seed == cfg.seed:
        return f"student_{process}_k{k}", k, {}
    return f"student_{process}_k{k}_seed{seed}", k, {"seed": seed}


def students(cfg: ImageStudyConfig, process: str) -> list[tuple[str, int, dict]]:
    """(name, k, DistillConfig changes) of every student the chosen parts distill for ``process``."""
    out = []
    if "main" in cfg.parts:
        out += [main_student(cfg, process, k, s) for k in ks_of(cfg, process) for s in seeds_of(cfg)]
    if process == "masked" and "noise" in cfg.parts:
        out += [(f"student_masked_k{k}_no_noise", k, {"noise_dim": 0}) for k in cfg.noise_ks]
    if process == "masked" and "temperature" in cfg.parts:
        out += [(f"student_masked_k{cfg.temperature_k}_T{t:g}", cfg.temperature_k, {"temperature": t})
                for t in cfg.temperatures]
    return out


def distill_config(cfg: ImageStudyConfig, process: str, name: str, k: int, changes: dict) -> DistillConfig:
    """A student of ``process``'s teacher, in ``out/{name}-<key>``."""
    return place(DistillConfig.from_dict({
        "teacher": os.path.join(teacher_config(cfg, process).run.out, "checkpoint"), "student_steps": k,
        "batch_size": cfg.distill_batch, "steps": steps_of(cfg, process), "seed": cfg.seed,
        "save_every": max(1, steps_of(cfg, process) // 4), "device": cfg.device, "out": "", **cfg.distill,
        **changes}),
        cfg.out, name)


def classifier_config(cfg: ImageStudyConfig):
    """The FID classifier, in ``out/classifier-<key>``."""
    return place(reference_config({"data": cfg.data, "levels": cfg.levels, "seed": cfg.seed, "out": "",
                                   "steps": cfg.classifier_steps}), cfg.out, "classifier")


def fid_file(cfg: ImageStudyConfig, stage_dir: str, name: str) -> str:
    """Where a sampler's FID is kept: in its model's directory, named by what scores it (the
    classifier, the number of draws, the seed)."""
    return keyed_file(stage_dir, name, {"classifier": classifier_config(cfg).run.out, "samples": cfg.samples,
                                        "seed": cfg.seed})


class Scorer:
    """FID of token images against every training image, under the data's feature classifier
    (trained on first use, resumable, under ``out/classifier-<key>``). With ``train=False`` the
    finished classifier is only read: what jobs running side by side do, since training (or
    resuming) takes the classifier's output directory for itself."""

    def __init__(self, cfg: ImageStudyConfig, *, progress: bool, train: bool = True):
        self.source = make_source(teacher_config(cfg, "masked").source)
        if train:
            result = train_reference(classifier_config(cfg), progress=progress)
            self.accuracy, path = result["val_accuracy"], result["model"]
            data = self.source.to_images(self.source.split("val")[:GRID])
            save_grid(data, os.path.join(cfg.out, "grids", "data.png"))
        else:
            path = os.path.join(classifier_config(cfg).run.out, "model")
            if not is_classifier(path):
                raise RuntimeError(f"the FID classifier {path} is not trained yet (train it first: Scorer(train=True))")
            with open(os.path.join(path, CONFIG_FILE)) as f:
                self.accuracy = json.load(f)["val_accuracy"]
        self.fid = ImageFID(path, self.source)

    def __call__(self, x: torch.Tensor, seed: int) -> dict:
        d = self.fid(x, seed=seed)
        return {"fid": d.value, "fid_stderr": d.stderr, "samples": d.samples}


def _score_teacher(cfg: ImageStudyConfig, scorer: Scorer, teacher, proc, process: str, steps: int) -> dict:
    x = draw(teacher, proc, cfg.samples, scorer.source.length, steps, seed=cfg.seed + 1, noise_seed=cfg.seed + 2,
             device=cfg.device)
    save_grid(scorer.source.to_images(x[:GRID]), os.path.join(cfg.out, "grids", f"teacher_{process}_{steps}.png"))
    return {"steps": steps, **scorer(x, cfg.seed)}


def _score_student(cfg: ImageStudyConfig, scorer: Scorer, dcfg: DistillConfig, proc, name: str,
                   progress: bool) -> dict:
    result = distill(dcfg, progress=progress)
    seconds = result["train_seconds"]  # all of the training, resumed or not
    student, _, _ = load_student(result["checkpoint"], device=cfg.device)
    k = dcfg.student_steps
    x = draw(student, proc, cfg.samples, scorer.source.length, k, seed=cfg.seed + 1, noise_seed=cfg.seed + 2,
             device=cfg.device)
    save_grid(scorer.source.to_images(x[:GRID]), os.path.join(cfg.out, "grids", f"{name}.png"))
    return {"steps": k, "distill_seconds": round(seconds, 1), **scorer(x, cfg.seed)}


def run_image_study(cfg: ImageStudyConfig, *, progress: bool = True, log=print) -> dict:
    """Run (or resume) the chosen parts, then :func:`report`."""
    cfg.validate()
    scorer = Scorer(cfg, progress=progress)
    log(f"FID classifier: held-out accuracy {scorer.accuracy:.3f}")
    for process in cfg.processes:
        run_process(cfg, process, scorer, progress=progress, log=log)
    return report(cfg)


def run_process(cfg: ImageStudyConfig, process: str, scorer: Scorer, *, progress: bool = True, log=print) -> None:
    """One process's teacher, its FID by steps and its students (each stage resumed); what
    :func:`run_image_study` runs per process, and what may run beside another process's."""
    tcfg = teacher_config(cfg, process)
    t0 = time.perf_counter()
    shared_stage(partial(train_teacher, tcfg, progress=progress), log=log)
    teacher, proc, _ = load_teacher(os.path.join(tcfg.run.out, "checkpoint"), device=cfg.device)
    log(f"{process}: teacher ready ({time.perf_counter() - t0:.0f} s)")
    if "main" in cfg.parts:
        for steps in cfg.teacher_grid:
            row = cached(fid_file(cfg, tcfg.run.out, f"fid_{steps}_steps"),
                          partial(_score_teacher, cfg, scorer, teacher, proc, process, steps))
            log(f"{process} teacher, {steps} steps: FID {row['fid']:.2f} ± {row['fid_stderr']:.2f}")
    for name, k, changes in students(cfg, process):
        dcfg = distill_config(cfg, process, name, k, changes)
        row = cached(fid_file(cfg, dcfg.run.out, "fid"),
                      partial(_score_student, cfg, scorer, dcfg, proc, name, progress))
        log(f"{name}: FID {row['fid']:.2f} ± {row['fid_stderr']:.2f}")


def _read(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def report(cfg: ImageStudyConfig) -> dict:
    """Tables (markdown) and the FID-by-steps plot from whatever has finished under ``out``;
    writes ``results.json``, ``table.md`` and ``fid_by_steps.png`` there."""
    res = {"teacher": {}, "student": {}, "no_noise": {}, "temperature": {}, "seeds": {}}

    def student(process: str, name: str, k: int, changes: dict) -> dict | None:
        return _read(fid_file(cfg, distill_config(cfg, process, name, k, changes).run.out, "fid"))

    for process in ("masked", "uniform"):
        tdir = teacher_config(cfg, process).run.out
        res["teacher"][process] = {s: r for s in cfg.teacher_grid
                                   if (r := _read(fid_file(cfg, tdir, f"fid_{s}_steps")))}
        res["student"][process] = {k: r for k in ks_of(cfg, process)
                                   if (r := student(process, f"student_{process}_k{k}", k, {}))}
    if len(seeds_of(cfg)) > 1:
        res["seeds"] = {f"{process} {k}": row for process in ("masked", "uniform") for k in ks_of(cfg, process)
                        if (row := seeds_row(cfg, res, process, k, [student(process, *main_student(cfg, process, k, s))
                                                                     for s in seeds_of(cfg)]))}
    res["no_noise"] = {k: r for k in cfg.noise_ks
                       if (r := student("masked", f"student_masked_k{k}_no_noise", k, {"noise_dim": 0}))}
    res["temperature"] = {t: r for t in cfg.temperatures if (r := student(
        "masked", f"student_masked_k{cfg.temperature_k}_T{t:g}", cfg.temperature_k, {"temperature": t}))}
    main = res["student"]["masked"].get(cfg.temperature_k)
    if main and res["temperature"]:
        res["temperature"][1.0] = main
    tables = markdown_tables(cfg, res)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(tables + "\n")
    write_json_atomic(os.path.join(cfg.out, "results.json"), {"config": cfg.to_dict(), **results_json(res)})
    if any(res["teacher"].values()):
        plot(cfg, res, os.path.join(cfg.out, "fid_by_steps.png"))
    for process in ("masked", "uniform"):
        for k in res["student"][process]:
            side_by_side(cfg, process, k)
    return res


def seeds_row(cfg: ImageStudyConfig, res: dict, process: str, k: int, fids: list[dict | None]) -> dict | None:
    """The students of ``process`` at ``k`` over the distillation seeds (mean ± std of their
    FIDs) against the teacher at k and 4k steps, once every seed's student has finished."""
    teacher = res["teacher"][process]
    if any(r is None for r in fids):
        return None
    values = [r["fid"] for r in fids]
    row = {"process": process, "k": k, "fids": values, "student_k": summarize(values)}
    for steps, tag in ((k, "k"), (4 * k, "4k")):
        if steps in teacher:
            row[f"teacher_{tag}"] = t = {"mean": teacher[steps]["fid"], "stderr": teacher[steps]["fid_stderr"]}
            row[f"vs_teacher_{tag}"] = row["student_k"]["mean"] / t["mean"]
            row[f"verdict_{tag}"] = reaches(row["student_k"], t)
    return row


def results_json(res: dict) -> dict:
    """:func:`report`'s results with string keys, as ``results.json`` holds them."""
    return {k: {str(a): b for a, b in v.items()} for k, v in res.items()}


def side_by_side(cfg: ImageStudyConfig, process: str, k: int) -> None:
    """``grids/side_by_side_{process}_k{k}.png``: held-out data, the teacher at ``k`` steps, the
    student at ``k`` and the teacher at its most steps, left to right, each under its title
    (where all four grids exist)."""
    grids = os.path.join(cfg.out, "grids")
    many = max(cfg.teacher_grid)
    names = ["data", f"teacher_{process}_{k}", f"student_{process}_k{k}", f"teacher_{process}_{many}"]
    titles = ["data (held out)", f"teacher, {k} steps", f"D-MMD student, {k} steps", f"teacher, {many} steps"]
    paths = [os.path.join(grids, n + ".png") for n in names]
    if not all(os.path.exists(p) for p in paths):
        return
    image = require("PIL.Image", "the side-by-side grids")
    draw = require("PIL.ImageDraw", "the side-by-side grids")
    panels = [image.open(p).convert("RGB") for p in paths]
    gap, top = 16, 24
    canvas = image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1),
                               top + max(p.height for p in panels)), "white")
    pen = draw.Draw(canvas)
    x = 0
    for panel, title in zip(panels, titles, strict=True):
        canvas.paste(panel, (x, top))
        pen.text((x + 4, 6), title, fill="black")
        x += panel.width + gap
    canvas.save(os.path.join(grids, f"side_by_side_{process}_k{k}.png"))


def _cell(r: dict | None) -> str:
    return "" if r is None else f"{r['fid']:.2f} ± {r['fid_stderr']:.2f}"


def _estimate(d: dict | None) -> str:
    return "" if d is None else f"{d['mean']:.2f} ± {d['std' if 'std' in d else 'stderr']:.2f}"


def _seeds_line(r: dict) -> str:
    ratios = [f"{r[name]:.2f}" if name in r else "" for name in ("vs_teacher_k", "vs_teacher_4k")]
    return (f"| {r['process']} | {r['k']} | {_estimate(r.get('teacher_k'))} | {_estimate(r['student_k'])} | "
            f"{_estimate(r.get('teacher_4k'))} | {ratios[0]} | {ratios[1]} | {r.get('verdict_4k', '')} |")


def markdown_tables(cfg: ImageStudyConfig, res: dict) -> str:
    steps = sorted(set(cfg.teacher_grid) | set(cfg.ks) | set(cfg.masked_ks or ()))
    lines = ["| FID (± bootstrap s.e.) | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---" * (len(steps) + 1) + "|"]
    for process in ("masked", "uniform"):
        for who in ("teacher", "student"):
            rows = res[who][process]
            if rows:
                label = f"{process} {'teacher' if who == 'teacher' else 'D-MMD student'}"
                lines.append(f"| {label} | " + " | ".join(_cell(rows.get(s)) for s in steps) + " |")
    out = "\n".join(lines)
    if res["no_noise"]:
        out += ("\n\n| masked student, k | pyramid noise (default) | no noise input |\n|---|---|---|\n"
                + "\n".join(f"| {k} | {_cell(res['student']['masked'].get(k))} | {_cell(r)} |"
                            for k, r in sorted(res["no_noise"].items())))
    if res["seeds"]:
        out += (f"\n\n| process | k | teacher, k steps | student, k steps (mean ± std over seeds {seeds_of(cfg)}) | "
                "teacher, 4k steps | student / teacher k | student / teacher 4k | vs 4k |\n"
                "|---|---|---|---|---|---|---|---|\n"
                + "\n".join(_seeds_line(r) for r in res["seeds"].values()))
    if res["temperature"]:
        out += (f"\n\n| teacher temperature in distillation | masked student, k = {cfg.temperature_k} |\n|---|---|\n"
                + "\n".join(f"| {t:g} | {_cell(r)} |" for t, r in sorted(res["temperature"].items())))
    return out


def plot(cfg: ImageStudyConfig, res: dict, path: str) -> None:
    matplotlib = require("matplotlib", "the image study's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for process, colour in (("masked", "tab:blue"), ("uniform", "tab:orange")):
        t = sorted(res["teacher"][process].items())
        if t:
            ax.errorbar([s for s, _ in t], [r["fid"] for _, r in t], [r["fid_stderr"] for _, r in t], color=colour,
                        marker="o", label=f"{process} teacher")
        s = sorted(res["student"][process].items())
        if s:
            ax.errorbar([k for k, _ in s], [r["fid"] for _, r in s], [r["fid_stderr"] for _, r in s], color=colour,
                        marker="*", markersize=12, linestyle="none", label=f"{process} D-MMD student")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(set(cfg.teacher_grid) | set(cfg.ks) | set(cfg.masked_ks or ()))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID (classifier features)")
    ax.set_title(f"{cfg.data}: FID by number of steps ({cfg.samples} draws each)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["ImageStudyConfig", "report", "results_json", "run_image_study", "students", "teacher_config"]

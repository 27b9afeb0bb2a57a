"""The demo's sequence part: D-MMD on a Markov chain over words, whose probability of every
sample is known exactly.

The source is :class:`dmmd.data.sources.MarkovSource` with ``vocab_size`` words (rendered as
English words) and a few successors per word, so a sample reads like a sentence and a wrong
word is visible. Stages, each resumed from what an earlier run left under ``out``:

1. ``teacher-<key>/``: a diffusion teacher on the chain (:func:`dmmd.training.teacher.train_teacher`);
2. ``student_k{k}-<key>/``: a D-MMD student per ``k`` with ``dmmd distill``'s defaults for the process;
3. ``samples/{name}-<key>.json``: ``num_samples`` draws (tokens and words) from the teacher at
   every step count of ``teacher_ks``, from each student at its ``k`` and from the chain itself;
4. ``eval/{name}-<key>.json``: :func:`dmmd.metrics.exact.chain_quality` of each: the share of
   samples with an impossible transition, their exact NLL per token and their entropy (diversity).

Each ``<key>`` is a hash of what produced the stage (:mod:`dmmd.apps.stages`): a changed setting
recomputes what it changes and what depends on it.

:func:`markdown_table`, :func:`verdicts` and :func:`plot` (``words_by_steps.png``) present the rows.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dmmd.apps.draws import draw
from dmmd.apps.stages import cached, keyed_file, place
from dmmd.apps.verdicts import against_teacher
from dmmd.data import make_source
from dmmd.extras import require
from dmmd.metrics.exact import chain_quality
from dmmd.options import Options, check_keys, option
from dmmd.training.checkpoint import write_json_atomic
from dmmd.training.distill import DistillConfig, distill, load_student
from dmmd.training.teacher import TeacherConfig, load_teacher, train_teacher

# DistillConfig keys this part sets itself (refused in ``distill``, by name)
OWNED = {"teacher": "is the demo's own teacher", "student_steps": "is set per student by --ks",
         "batch_size": "is a demo option: use --distill-batch", "steps": "is a demo option: use --distill-steps",
         "seed": "is a demo option: use --seed", "out": "is set under --out",
         "device": "is a demo option: use --device"}


@dataclass
class WordsDemoConfig(Options):
    """The sequence part of ``dmmd demo`` (its defaults are the demo's)."""

    out: str = option("runs/demo/words", "output directory; every stage resumes from what is there")
    device: str = option("cpu", "cpu or cuda")
    seed: int = option(0, "seed of every stage")
    process: str = option("uniform", "diffusion process: uniform or masked")
    vocab_size: int = option(32, "words of the Markov chain (at most 64 render as words)")
    length: int = option(16, "words per sequence")
    fanout: int = option(3, "successors per word")
    self_loops: bool = option(False, "whether a word may follow itself")
    teacher_width: int = option(64, "teacher width")
    teacher_depth: int = option(2, "teacher transformer blocks")
    teacher_steps: int = option(10000, "teacher training steps")
    teacher_batch: int = option(64, "teacher batch size")
    teacher_lr: float = option(2e-3, "teacher peak learning rate")
    ks: tuple[int, ...] = option((4, 8), "student step counts k (one student each)")
    distill_steps: int = option(1500, "D-MMD steps per student")
    distill_batch: int = option(64, "D-MMD batch size")
    distill: dict = option({}, "further DistillConfig fields (none: dmmd distill's defaults for the process)")
    teacher_ks: tuple[int, ...] = option((2, 4, 8, 16, 32, 64, 128), "step counts the teacher is sampled with")
    num_samples: int = option(1000, "draws per sampler")

    def validate(self) -> None:
        if self.process not in ("masked", "uniform"):
            raise ValueError(f"process must be masked or uniform, got {self.process!r}")
        for name in ("vocab_size", "length", "fanout", "teacher_steps", "distill_steps", "num_samples"):
            if getattr(self, name) < (2 if name in ("vocab_size", "length", "num_samples") else 1):
                raise ValueError(f"{name} is too small: {getattr(self, name)}")
        for name in ("ks", "teacher_ks"):
            ks = getattr(self, name)
            if not ks or any(int(k) != k or k < 1 for k in ks):
                raise ValueError(f"{name} must be positive integers, got {ks}")
        teacher_config(self).validate()
        for k in self.ks:
            distill_config(self, k).validate(self.process)


def teacher_config(cfg: WordsDemoConfig) -> TeacherConfig:
    """The teacher, in ``out/teacher-<key>`` (:mod:`dmmd.apps.stages`)."""
    return place(TeacherConfig.from_dict(dict(
        data="markov", vocab_size=cfg.vocab_size, length=cfg.length, markov_fanout=cfg.fanout,
        markov_self_loops=cfg.self_loops, process=cfg.process,
        schedule="linear", width=cfg.teacher_width, depth=cfg.teacher_depth, heads=2, batch_size=cfg.teacher_batch,
        steps=cfg.teacher_steps, lr=cfg.teacher_lr, warmup=min(100, cfg.teacher_steps // 10), ema=0.999,
        eval_every=0, save_every=max(1, cfg.teacher_steps // 5), seed=cfg.seed, device=cfg.device,
        out="")), cfg.out, "teacher")


def distill_config(cfg: WordsDemoConfig, k: int) -> DistillConfig:
    check_keys(cfg.distill, DistillConfig.leaf_names(), "distill", owned=OWNED)
    return place(DistillConfig.from_dict({
        "teacher": os.path.join(teacher_config(cfg).run.out, "checkpoint"), "student_steps": k,
        "batch_size": cfg.distill_batch, "steps": cfg.distill_steps, "save_every": max(1, cfg.distill_steps // 4),
        "seed": cfg.seed, "out": "", "device": cfg.device, **cfg.distill}), cfg.out, f"student_k{k}")


def samplers(cfg: WordsDemoConfig) -> list[dict]:
    rows = [{"name": f"teacher_{k}", "model": "teacher", "steps": k} for k in cfg.teacher_ks]
    rows += [{"name": f"student_{k}", "model": "D-MMD student", "steps": k} for k in cfg.ks]
    return rows + [{"name": "data", "model": "data", "steps": None}]


def run_words(cfg: WordsDemoConfig, *, progress: bool = True, log=print) -> list[dict]:
    """Run (or resume) every stage; returns one row per sampler (also in ``eval/``)."""
    cfg.validate()
    teacher = train_teacher(teacher_config(cfg), progress=progress)
    log(f"words teacher: {teacher['step']} steps")
    for k in cfg.ks:
        distill(distill_config(cfg, k), progress=progress)
    source = make_source(teacher_config(cfg).source)
    model, process, _ = load_teacher(teacher["checkpoint"], device=cfg.device)
    rows = []
    for spec in tqdm(samplers(cfg), desc="words: evaluate", disable=not progress):
        path = keyed_file(os.path.join(cfg.out, "eval"), spec["name"], _sampler_key(cfg, spec))
        rows.append(cached(path, lambda spec=spec: {
            **spec, **chain_quality(_samples(cfg, spec, (model, process), source), source)}))
    return rows


def _sampler_key(cfg: WordsDemoConfig, spec: dict) -> dict:
    """What a sampler's draws depend on: the model's directory (its settings' hash with it) or
    the data's config, the step count, the number of draws and the seed."""
    if spec["model"] == "teacher":
        model = teacher_config(cfg).run.out
    elif spec["model"] == "data":
        model = teacher_config(cfg).source.to_dict()
    else:
        model = distill_config(cfg, spec["steps"]).run.out
    return {"model": model, "steps": spec["steps"], "num_samples": cfg.num_samples, "seed": cfg.seed}


def _samples(cfg: WordsDemoConfig, spec: dict, teacher, source) -> torch.Tensor:
    """A sampler's draws, kept in ``samples/{name}-<key>.json`` with their words."""
    path = keyed_file(os.path.join(cfg.out, "samples"), spec["name"], _sampler_key(cfg, spec))
    if os.path.exists(path):
        with open(path) as f:
            return torch.tensor(json.load(f)["tokens"], dtype=torch.long)
    seed = cfg.seed + 1000 + (spec["steps"] or 0)
    if spec["model"] == "data":
        x = source.sample(cfg.num_samples, torch.Generator().manual_seed(seed))
    else:
        if spec["model"] == "teacher":
            model, process = teacher
        else:
            model, process, _ = load_student(os.path.join(distill_config(cfg, spec["steps"]).run.out, "checkpoint"),
                                             device=cfg.device)
        x = draw(model, process, cfg.num_samples, cfg.length, spec["steps"], seed=seed, noise_seed=seed,
                 device=cfg.device)
    words = source.to_words(x) if cfg.vocab_size <= 64 else None
    write_json_atomic(path, {**spec, "tokens": x.tolist(), **({"words": words} if words else {})})
    return x


def _pct(r: dict) -> str:
    return f"{100 * r['impossible']:.1f}% ± {100 * r['impossible_stderr']:.1f}"


def verdicts(rows: list[dict]) -> list[str]:
    """One sentence per student: its share of samples with an impossible transition against the
    teacher's (:func:`dmmd.apps.verdicts.against_teacher`), and its diversity against the data's."""
    teacher = {r["steps"]: (r["impossible"], r["impossible_stderr"]) for r in rows if r["model"] == "teacher"}
    data = next((r for r in rows if r["model"] == "data"), None)
    out = []
    for r in (r for r in rows if r["model"] == "D-MMD student"):
        line = f"words, k={r['steps']}: student {_pct(r)} impossible" + against_teacher(
            r["steps"], (r["impossible"], r["impossible_stderr"]), teacher,
            lambda e: _pct({"impossible": e[0], "impossible_stderr": e[1]}))
        if data is not None:
            line += f"; diversity {r['entropy']:.2f} nats/word (data {data['entropy']:.2f}"
            # a fifth below the data's: the student trades diversity for possible pairs
            line += ": less diverse than the data)" if r["entropy"] < 0.8 * data["entropy"] else ")"
        out.append(line + ".")
    return out


def markdown_table(rows: list[dict], cfg: WordsDemoConfig) -> str:
    loops = "" if cfg.self_loops else " (never itself)"
    head = (f"Markov chain over {cfg.vocab_size} words, {cfg.length} words per sample, {cfg.fanout} successors "
            f"per word{loops}; {cfg.process} teacher, {cfg.teacher_steps} steps; students {cfg.distill_steps} "
            f"D-MMD steps; {cfg.num_samples} samples per sampler, exact metrics.")
    lines = [head, "", "| model | steps | impossible samples ↓ | exact NLL, nats/word (possible samples) | "
                       "diversity: next-word entropy, nats |", "|---|---|---|---|---|"]
    for r in rows:
        nll = ("" if math.isnan(r["nll"]) else f"{r['nll']:.3f} (one sample)" if math.isnan(r["nll_stderr"])
               else f"{r['nll']:.3f} ± {r['nll_stderr']:.3f}")
        lines.append(f"| {r['model']} | {r['steps'] or ''} | {_pct(r)} | {nll} | {r['entropy']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, cfg: WordsDemoConfig) -> None:
    """Impossible share, exact NLL and entropy against steps: the teacher's curves, the students'
    points and the data's level."""
    matplotlib = require("matplotlib", "the demo's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("impossible", "impossible_stderr", "samples with an impossible transition", 100),
              ("nll", "nll_stderr", "exact NLL, nats/word (possible samples)", 1),
              ("entropy", None, "entropy, nats/word (diversity)", 1))
    data = next((r for r in rows if r["model"] == "data"), None)
    ticks = sorted({r["steps"] for r in rows if r["steps"]})
    for ax, (key, err, label, scale) in zip(axes, panels, strict=True):
        for model, style in (("teacher", dict(fmt="o-", color="tab:blue")),
                             ("D-MMD student", dict(fmt="*", color="tab:red", markersize=12))):
            # (no NLL where every sample is impossible)
            rs = sorted((r for r in rows if r["model"] == model and not math.isnan(r[key])), key=lambda r: r["steps"])
            ax.errorbar([r["steps"] for r in rs], [scale * r[key] for r in rs],
                        yerr=[scale * r[err] for r in rs] if err else None, capsize=3, label=model, **style)
        if data is not None:
            ax.axhline(scale * data[key], color="gray", ls="--", lw=1, label="data")
        ax.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("denoising steps")
        ax.set_ylabel(label + (" (%)" if scale == 100 else ""))
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"D-MMD on a Markov chain over {cfg.vocab_size} words ({cfg.process} teacher)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def jobs(cfg: WordsDemoConfig) -> list[None]:
    """The part's independent jobs (:mod:`dmmd.apps.demo`): one, the whole part."""
    return [None]


def run_job(cfg: WordsDemoConfig, job: None, *, progress: bool = True, log=print) -> None:
    run_words(cfg, progress=progress, log=log)


def report(cfg: WordsDemoConfig, *, progress: bool = True, log=print) -> tuple[list[dict], str, list[str]]:
    """The part's rows (for results.json), its markdown table and its verdict lines, with its
    plot written (every stage resumed)."""
    rows = run_words(cfg, progress=progress, log=log)
    plot(rows, os.path.join(cfg.out, "words_by_steps.png"), cfg)
    return rows, markdown_table(rows, cfg), verdicts(rows)


__all__ = ["WordsDemoConfig", "markdown_table", "plot", "run_words", "verdicts"]

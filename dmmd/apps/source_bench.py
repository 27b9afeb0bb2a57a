"""The benchmark of exact sources: does a k-step D-MMD student reach its teacher at 4k steps, on
every source, for both processes? (The instrument for choosing ``dmmd distill``'s defaults.)

Each source of :data:`SOURCES` knows its distribution exactly and small enough to enumerate, so
the total variation (TV) of any sampler to the data is computed over every sequence
(:func:`dmmd.metrics.total_variation`). They differ in what makes few-step sampling hard:
vocabulary, length (tokens revealed per step), how deterministic the transitions are,
impossible transitions or none, and constraints between distant tokens (tied ends, parity).

Per (source, process): one teacher, trained once. Per k and seed: one student distilled with
``dmmd distill``'s defaults (or the ``distill`` overrides: the lever under test), its TV along
training (``curve_points`` readings of the EMA weights) and at the end, against the teacher at
k and at 4k steps (one sampling seed: the teacher's spread over sampling seeds is about its
sampling standard error, 0.001-0.002 TV at 10^5 draws). The end readings also split the TV: the
share of impossible samples (outside the data's support) and the rest, the misweighting of the
possible sequences (:func:`dmmd.metrics.outside_support`), and give the TV of every position's
marginal and every adjacent pair's (:func:`dmmd.metrics.window_tv`): how much of the error is
already in them and how much only in the joint. Every stage is cached under ``out`` in a
directory or file named by a hash of everything that produces it (:mod:`dmmd.apps.stages`), so
a changed setting recomputes that stage and what depends on it, nothing else;
``bench/source_benchmark.py`` runs it, a short case is a test.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import partial

from dmmd.apps.draws import draw
from dmmd.apps.stages import cached, keyed_file, place, settings_key, shared_stage
from dmmd.apps.verdicts import reaches as verdict
from dmmd.apps.verdicts import summarize
from dmmd.data import make_source
from dmmd.extras import require
from dmmd.metrics import total_variation_and_outside, window_tv
from dmmd.options import Options, check_keys, option
from dmmd.training.checkpoint import checkpoint_exists, read_state, write_json_atomic
from dmmd.training.distill import DistillConfig, distill, load_student
from dmmd.training.teacher import TeacherConfig, load_teacher, train_teacher

# name -> the DataConfig that builds it; each small enough to enumerate (V^L <= 2e6)
SOURCES = {
    # the study chain of README "D-MMD on a source with an exactly known distribution": two
    # successors per state, mostly one; most transitions impossible
    "chain4x6": dict(data="markov", vocab_size=4, length=6, markov_fanout=2),
    # a wider vocabulary, three successors per state
    "chain8x5": dict(data="markov", vocab_size=8, length=5, markov_fanout=3),
    # a long sequence: many tokens revealed in each coarse step
    "chain3x10": dict(data="markov", vocab_size=3, length=10, markov_fanout=2, markov_concentration=1.0),
    # no impossible transition: every sequence possible, soft correlations only
    "soft4x6": dict(data="markov", vocab_size=4, length=6, markov_fanout=4, markov_concentration=2.0),
    # the last token must equal the first: a constraint across the whole sequence
    "tied4x7": dict(data="markov", vocab_size=4, length=7, markov_fanout=3, markov_concentration=1.0,
                    markov_tie_ends=True),
    # the sum of 5 bits is even: each bit alone is uniform, all the others decide each (the
    # benchmark's teacher learns 5 bits in its 1500 steps; at 6 and 8 bits it stays at chance)
    "parity2x5": dict(data="parity", vocab_size=2, length=5),
}

# DistillConfig keys the benchmark sets itself (refused in ``distill``, by name)
BENCH_OWNED = {"teacher": "is the benchmark's own teacher", "student_steps": "is set per student by ks",
               "batch_size": "is a benchmark option: distill_batch", "steps": "is a benchmark option: distill_steps",
               "seed": "is a benchmark option: seeds", "out": "is set under the benchmark's out",
               "device": "is a benchmark option: device", "save_every": "follows curve_points"}


@dataclass
class BenchConfig(Options):
    """The benchmark: which sources and processes, the teachers, the students and the TV samples."""

    sources: tuple[str, ...] = option(tuple(SOURCES), f"sources to run, from {tuple(SOURCES)}")
    processes: tuple[str, ...] = option(("masked", "uniform"), "diffusion processes")
    ks: tuple[int, ...] = option((2, 4), "student step counts")
    seeds: tuple[int, ...] = option((0, 1, 2), "distillation seeds: one student per (source, process, k, seed)")
    samples: int = option(100_000, "draws per sampler for the final TV estimates")
    # As many as the final reading: a TV estimate's bias grows with the support over the draws
    # (20,000 draws read soft4x6's students 0.16 along training and 0.093 at the end from 10^5),
    # so readings with fewer draws are not comparable with the end or with the teacher's lines.
    curve_samples: int = option(100_000, "draws per reading of the TV along training")
    curve_points: int = option(4, "readings of the student's TV along training (the last one at the end)")
    teacher_steps: int = option(1500, "teacher training steps")
    teacher_width: int = option(64, "teacher width (students copy the teacher)")
    teacher_depth: int = option(2, "teacher depth (transformer blocks)")
    teacher_batch: int = option(256, "teacher batch size")
    distill_steps: int = option(2000, "D-MMD steps per student")
    distill_batch: int = option(256, "D-MMD batch size")
    distill: dict = option({}, "DistillConfig fields to change (none: dmmd distill's per-process defaults)")
    seed: int = option(0, "seed of the teachers and of the TV samples")
    device: str = option("cpu", "cpu or cuda")
    out: str = option("runs/source_bench", "output directory; every stage is cached by its settings")

    def validate(self) -> None:
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown:
            raise ValueError(f"sources: unknown {unknown}; known: {sorted(SOURCES)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one distillation seed")
        if self.curve_points < 1:
            raise ValueError(f"curve_points must be >= 1, got {self.curve_points}")
        for name in ("samples", "curve_samples", "distill_steps", "teacher_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for process in self.processes:
            for k in self.ks:
                self.distill_config("teacher", k, self.seeds[0], "").validate(process)

    def tag(self) -> str:
        """What names this run's students and results: ``defaults``, else a hash of ``distill``
        (and of the students' steps and batch where they are not the benchmark's defaults)."""
        base = type(self)()
        tag = settings_key(DistillConfig.from_dict(self.distill)) if self.distill else "defaults"
        if (self.distill_steps, self.distill_batch) == (base.distill_steps, base.distill_batch):
            return tag
        return settings_key({"distill": tag, "steps": self.distill_steps, "batch": self.distill_batch})

    def results_path(self) -> str:
        """Where the rows of every run of these students add up (:func:`merge_results`)."""
        return os.path.join(self.out, f"results_{self.tag()}.json")

    def teacher_config(self, source: str, process: str) -> TeacherConfig:
        cfg = TeacherConfig.from_dict(dict(
            **SOURCES[source], process=process, schedule="linear", width=self.teacher_width,
            depth=self.teacher_depth, heads=2, batch_size=self.teacher_batch, steps=self.teacher_steps, lr=2e-3,
            warmup=50, ema=0.99, eval_every=0, save_every=self.teacher_steps, seed=self.seed, device=self.device,
            out=""))
        return place(cfg, os.path.join(self.out, "teachers"), f"{source}_{process}")

    def distill_config(self, teacher_dir: str, k: int, seed: int, name: str) -> DistillConfig:
        check_keys(self.distill, DistillConfig.leaf_names(), "distill", owned=BENCH_OWNED)
        cfg = DistillConfig.from_dict({
            "teacher": os.path.join(teacher_dir, "checkpoint"), "student_steps": k, "batch_size": self.distill_batch,
            "steps": self.distill_steps, "seed": seed, "device": self.device, "out": "",
            "save_every": max(1, self.distill_steps // self.curve_points), **self.distill})
        return place(cfg, os.path.join(self.out, "students"), f"{name}_k{k}_seed{seed}")


def _tv(model, noise_seed: int, process, source, device: str, samples: int, steps: int, seed: int) -> dict:
    """A sampler's TV to the data, the share of it that impossible samples make (the rest is the
    misweighting of the possible sequences), and the TV of each position's marginal and of each
    adjacent pair's (where the sequence's TV goes beyond them, the error is in the joint)."""
    x = draw(model, process, samples, source.length, steps, seed=seed, noise_seed=noise_seed, batch_size=25_000,
             device=device)
    d, out = total_variation_and_outside(x, source)
    return {"tv": d.value, "tv_stderr": d.stderr, "outside": out.value, "outside_stderr": out.stderr,
            "position_tv": window_tv(x, source, 1).tolist(), "pair_tv": window_tv(x, source, 2).tolist()}


def _reading(path: str, compute, *, upgrade: bool = True) -> dict:
    """A cached :func:`_tv` reading. One cached before readings carried all of :func:`_tv`'s
    numbers is drawn again when ``upgrade`` (the same weights and seeds: the same draws)."""
    r = cached(path, compute)
    if upgrade and not {"outside", "position_tv", "pair_tv"} <= r.keys():
        r = compute()
        write_json_atomic(path, r)
    return r


def _teacher_tv(cfg: BenchConfig, out: str, teacher, process, source, steps: int) -> dict:
    """The teacher's TV at ``steps`` from one sampling seed (its spread over seeds is about its
    sampling standard error), cached in its directory."""
    key = {"steps": steps, "samples": cfg.samples, "seed": cfg.seed + 1}
    r = _reading(keyed_file(out, "tv", key), partial(_tv, teacher, 0, process, source, cfg.device, cfg.samples,
                                                     steps, cfg.seed + 1))
    return {"mean": r["tv"], "stderr": r["tv_stderr"], "outside": r["outside"], "outside_stderr": r["outside_stderr"],
            "position_tv": r["position_tv"], "pair_tv": r["pair_tv"]}


def run_student(cfg: BenchConfig, tcfg: TeacherConfig, source, name: str, k: int, seed: int, progress: bool) -> dict:
    """Distill one student of the teacher ``tcfg`` on ``source`` (resuming), reading its TV at
    ``curve_points`` points of training (a reading not cached when the run was already past its
    point is left out of the curve)."""
    dcfg = cfg.distill_config(tcfg.run.out, k, seed, name)
    checkpoint = os.path.join(dcfg.run.out, "checkpoint")
    curve, train_seconds = [], 0.0
    for i in range(1, cfg.curve_points + 1):
        at = cfg.distill_steps * i // cfg.curve_points
        final = i == cfg.curve_points
        samples = cfg.samples if final else cfg.curve_samples
        key = {"step": at, "samples": samples, "seed": cfg.seed + 1 + seed}
        done = read_state(checkpoint)["step"] if checkpoint_exists(checkpoint) else 0
        if done < at:
            train_seconds = distill(dcfg, progress=progress, stop_at=at)["train_seconds"]
        elif done > at and not os.path.exists(keyed_file(dcfg.run.out, "tv", key)):
            continue  # the weights of that point are gone
        student, process, state = load_student(checkpoint, device=cfg.device)
        train_seconds = state.get("train_seconds", train_seconds)
        reading = _reading(keyed_file(dcfg.run.out, "tv", key), partial(
            _tv, student, seed + 2, process, source, cfg.device, samples, k, cfg.seed + 1 + seed), upgrade=final)
        curve.append({"step": at, **reading})
    end = curve[-1]
    return {"seed": seed, "tv": end["tv"], "outside": end["outside"], "position_tv": end["position_tv"],
            "pair_tv": end["pair_tv"], "curve": curve,
            "train_seconds": train_seconds,
            "entropy": _read_log(os.path.join(dcfg.run.out, "log.jsonl")), "out": dcfg.run.out}


def _read_log(path: str, points: int = 40) -> list[dict]:
    """The generator's output entropy (overall and per coarse step) and the noise projections'
    norm along training: about ``points`` generator steps, evenly spaced."""
    if not os.path.exists(path):
        return []
    keep = ("step", "gen_entropy", "gen_entropy_by_step", "noise_proj_norm")
    with open(path) as f:
        records = [r for r in map(json.loads, f) if "gen_loss" in r]
    every = max(1, len(records) // points)
    return [{k: r.get(k) for k in keep} for r in records[every - 1::every]]


def run_bench(cfg: BenchConfig, *, progress: bool = True, log=print) -> list[dict]:
    """Run (or resume) the benchmark; one row per (source, process, k), also in ``out/results.json``."""
    cfg.validate()
    rows = []
    start = time.perf_counter()
    name_tag = cfg.tag()
    for src in cfg.sources:
        for kind in cfg.processes:
            tcfg = cfg.teacher_config(src, kind)
            t0 = time.perf_counter()
            shared_stage(partial(train_teacher, tcfg, progress=progress), log=log)
            teacher, process, _ = load_teacher(os.path.join(tcfg.run.out, "checkpoint"), device=cfg.device)
            source = make_source(tcfg.source)
            log(f"{src} {kind}: teacher ready ({time.perf_counter() - t0:.0f} s)")
            for k in cfg.ks:
                students = [run_student(cfg, tcfg, source, f"{src}_{kind}_{name_tag}", k, seed, progress)
                            for seed in cfg.seeds]
                row = {"source": src, "process": kind, "k": k, "distill": cfg.distill,
                       "teacher_k": _teacher_tv(cfg, tcfg.run.out, teacher, process, source, k),
                       "teacher_4k": _teacher_tv(cfg, tcfg.run.out, teacher, process, source, 4 * k),
                       "student_k": summarize([s["tv"] for s in students]),
                       "student_outside": summarize([s["outside"] for s in students]), "students": students}
                row["vs_teacher_k"] = row["student_k"]["mean"] / row["teacher_k"]["mean"]
                row["vs_teacher_4k"] = row["student_k"]["mean"] / row["teacher_4k"]["mean"]
                row["verdict_4k"] = verdict(row["student_k"], row["teacher_4k"])
                row["verdict_k"] = verdict(row["student_k"], row["teacher_k"])
                log(format_row(row))
                rows.append(row)
    merge_results(cfg.results_path(), cfg, rows, round(time.perf_counter() - start))
    return rows


def merge_results(path: str, cfg: BenchConfig, rows: list[dict], seconds: int) -> None:
    """Add ``rows`` to the results of earlier runs of the same students (``path``), each
    (source, process, k) replacing its earlier row: runs over some sources or seeds at a time
    build one table instead of overwriting each other's."""
    runs, kept = [], []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        runs = old.get("runs", [{"config": old.get("config"), "seconds": old.get("seconds")}])
        new = {(r["source"], r["process"], r["k"]) for r in rows}
        kept = [r for r in old["rows"] if (r["source"], r["process"], r["k"]) not in new]
    write_json_atomic(path, {"runs": [*runs, {"config": cfg.to_dict(), "seconds": seconds}], "rows": [*kept, *rows]})


def _cell(d: dict) -> str:
    return f"{d['mean']:.3f} ± {d['std' if 'std' in d else 'stderr']:.3f}"


def _outside(row: dict) -> str:
    """The share of impossible samples, student (mean over seeds) / teacher at 4k steps; a dash
    for rows from before the benchmark measured it."""
    student, teacher = row.get("student_outside"), row["teacher_4k"].get("outside")
    return "—" if student is None or teacher is None else f"{student['mean']:.3f} / {teacher:.3f}"


def format_row(row: dict) -> str:
    return (f"| {row['source']} | {row['process']} | {row['k']} | {_cell(row['teacher_k'])} | "
            f"{_cell(row['student_k'])} | {_cell(row['teacher_4k'])} | "
            f"{row['vs_teacher_k']:.2f} | {row['vs_teacher_4k']:.2f} | {row['verdict_4k']} | {_outside(row)} |")


def markdown_table(rows: list[dict]) -> str:
    head = ("| source | process | k | teacher, k steps | student, k steps | teacher, 4k steps | "
            "student / teacher k | student / teacher 4k | vs 4k | impossible samples, student / teacher 4k |"
            "\n|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *(format_row(r) for r in rows)])


def plot(rows: list[dict], path: str) -> None:
    """One panel per (source, k): the students' TV along training (one line per seed) against
    the teacher's at k and 4k steps, and below it the generator's output entropy per coarse step
    along training (seed 0), with the noise projections' norm on a second axis."""
    matplotlib = require("matplotlib", "the benchmark's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(rows), figsize=(3.2 * len(rows), 5.6), squeeze=False)
    for col, row in enumerate(rows):
        top, bottom = axes[0, col], axes[1, col]
        for s in row["students"]:
            top.plot([c["step"] for c in s["curve"]], [c["tv"] for c in s["curve"]], "o-", ms=3,
                     label=f"student seed {s['seed']}")
        for key, style in (("teacher_k", "--"), ("teacher_4k", ":")):
            steps = row["k"] if key == "teacher_k" else 4 * row["k"]
            top.axhline(row[key]["mean"], color="k", ls=style, lw=1, label=f"teacher, {steps} steps")
        top.set_title(f"{row['source']} {row['process']} k={row['k']}", fontsize=8)
        top.set_ylim(bottom=0)
        log = row["students"][0]["entropy"]
        steps = [r["step"] for r in log]
        for j in range(row["k"]):
            bottom.plot(steps, [r["gen_entropy_by_step"][j] for r in log], label=f"step t in ({j}/k, {j + 1}/k]")
        norm = bottom.twinx()
        norm.plot(steps, [r["noise_proj_norm"] for r in log], color="grey", ls="--", lw=1)
        norm.tick_params(labelsize=6)
        if col == len(rows) - 1:
            norm.set_ylabel("noise projection norm (dashed)", fontsize=7)
        bottom.set_xlabel("distillation step", fontsize=7)
        if col == 0:
            top.set_ylabel("TV to the data", fontsize=8)
            bottom.set_ylabel("generator output entropy (nats)", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6)
    axes[1, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The main job, ``dmmd demo``: D-MMD's effect, in numbers and pictures, on data that ships with
the package. Few-step teachers fall apart; few-step students do not.

Parts (``data``), each under ``out/{part}`` and resumed from what an earlier run left there:

- ``digits`` (:mod:`dmmd.apps.demo_digits`): images, FID by number of steps, side-by-side grids;
- ``words`` (:mod:`dmmd.apps.demo_words`): a Markov chain over words with exact metrics (the share
  of samples with an impossible transition, exact NLL, entropy);
- ``text`` (:mod:`dmmd.apps.demo_text`): the embedded English text with a reference LM's
  Gradient Moment; on two CPU cores its teacher stays too weak for steps to matter (it needs a
  GPU or a long run).

The default run is the digits part alone: its two jobs (one per process) fill two cores for the
quarter of an hour the main job may take there; the words part is a third job of about 9 CPU
minutes, added with ``data=("digits", "words")``.

The per-part settings (teacher and student sizes, step counts, samples) are one set of options
whose defaults differ by part (``None``: the part's own); a setting given must apply to a part
that runs. Then ``out/results.json``, ``out/table.md`` (every part's table and the verdicts,
also printed) and each part's figures.

On a CPU the independent jobs (the words part, each digits process, the text part) first run
side by side in worker processes with one thread each (``jobs``): these small models gain
about 1.2x from a second thread but 2x from a second process. Then every part runs once more in
this process, where each stage is found finished, to gather the tables, verdicts and figures.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass, fields

import torch

from dmmd.apps import demo_digits, demo_text, demo_words
from dmmd.apps.image_study import ImageStudyConfig
from dmmd.extras import require
from dmmd.options import Options, field_default, option
from dmmd.training.checkpoint import write_json_atomic

PARTS = ("digits", "words", "text")


@dataclass(frozen=True)
class DemoPart:
    """What the demo knows of a part: its config class and defaults, the optional packages it
    needs (checked before any work), and its module, which has ``jobs(cfg)`` (the independent
    jobs a worker process can run), ``run_job(cfg, job, progress=, log=)``, ``report(cfg,
    progress=, log=)`` (resumes every stage; returns the results for results.json, the markdown
    table and the verdict lines) and optionally ``prepare(cfg, progress=, log=)`` (what its jobs
    read, made in this process first)."""

    config: type[Options]
    defaults: dict
    needs: tuple[tuple[str, str], ...]
    module: object


# the parts (the digits part: the image study with the demo's sizes)
DEMO_PARTS = {
    "digits": DemoPart(ImageStudyConfig, demo_digits.DEFAULTS, (("sklearn", "the digits data"),
                       ("PIL", "the demo's image grids"), ("matplotlib", "the demo's plots")), demo_digits),
    "words": DemoPart(demo_words.WordsDemoConfig, {}, (("matplotlib", "the demo's plots"),), demo_words),
    "text": DemoPart(demo_text.TextDemoConfig, {}, (("transformers", "the demo's reference LM"),
                     ("matplotlib", "the demo's plots")), demo_text),
}
# the order the independent jobs start in: the longest first
JOB_ORDER = ("words", "digits", "text")
# demo setting -> the field it sets in each part's config (a part without it: the setting does not apply)
SETTINGS = {
    "process": {"digits": "processes", "words": "process"},
    "teacher_width": {p: "teacher_width" for p in PARTS},
    "teacher_depth": {p: "teacher_depth" for p in PARTS},
    "teacher_steps": {p: "teacher_steps" for p in PARTS},
    "teacher_batch": {p: "teacher_batch" for p in PARTS},
    "teacher_lr": {"words": "teacher_lr", "text": "teacher_lr"},
    "ks": {p: "ks" for p in PARTS},
    "teacher_ks": {"digits": "teacher_grid", "words": "teacher_ks", "text": "teacher_ks"},
    "distill_steps": {p: "distill_steps" for p in PARTS},
    "masked_ks": {"digits": "masked_ks"},
    "masked_distill_steps": {"digits": "masked_distill_steps"},
    "distill_batch": {p: "distill_batch" for p in PARTS},
    "distill": {p: "distill" for p in PARTS},
    "num_samples": {"digits": "samples", "words": "num_samples", "text": "num_samples"},
    "length": {"words": "length", "text": "length"},
    "vocab_size": {"words": "vocab_size"},
    "reference_width": {"text": "reference_width"},
    "reference_layers": {"text": "reference_layers"},
    "reference_steps": {"text": "reference_steps"},
    "temperature": {"text": "temperature"},
    "top_p": {"text": "top_p"},
    "num_data": {"text": "num_data"},
}
# ``dmmd demo --quick``: tiny models and few steps, per part (the tests' smoke run)
QUICK = {
    "digits": dict(teacher_steps=50, distill_steps=20, masked_distill_steps=20, masked_ks=(2, 4), samples=200,
                   teacher_grid=(1, 2, 4, 16), classifier_steps=500),
    "words": dict(teacher_steps=100, distill_steps=20, num_samples=200, teacher_ks=(2, 4, 8, 32)),
    "text": dict(length=32, teacher_width=64, teacher_depth=2, teacher_steps=150, teacher_batch=16, teacher_lr=2e-3,
                 reference_width=64, reference_layers=1, reference_steps=100, distill_steps=40, distill_batch=16,
                 num_samples=32, num_data=32),
}


def part_default(part: str, name: str):
    """The default of demo setting ``name`` in ``part`` (``process`` of digits: its one process)."""
    cls, defaults = DEMO_PARTS[part].config, DEMO_PARTS[part].defaults
    target = SETTINGS[name][part]
    value = defaults.get(target, next(field_default(f) for f in fields(cls) if f.name == target))
    return value[0] if name == "process" and part == "digits" else value


def _setting(help: str, name: str):
    """A per-part setting: ``None`` (each part's own default, listed in its help)."""
    defaults = ", ".join(f"{p} {part_default(p, name)}" for p in PARTS if p in SETTINGS[name])
    return option(None, f"{help} (default: {defaults})")


@dataclass
class DemoConfig(Options):
    """What ``dmmd demo`` runs: the parts, and settings that change each part's defaults."""

    data: tuple[str, ...] = option(("digits",), "parts to run: digits (images, uniform and masked), words (a "
                                                 "Markov chain with exact metrics; a third job, about 9 more CPU "
                                                 "minutes), text (the embedded English text; needs a GPU or a long "
                                                 "run to show the effect)")
    out: str | None = option(None, "output directory, one folder per part; every stage resumes from what is "
                                   "there (default: runs/demo, with --quick runs/demo-quick)")
    device: str = option("cpu", "cpu or cuda")
    seed: int = option(0, "seed of every stage")
    jobs: int = option(0, "worker processes for the independent jobs (words, each digits process, text) on a "
                          "CPU, each with an equal share of the threads; 0: one per job; 1: none, all in this "
                          "process, one after another (always so with --device cuda)")
    process: str | None = _setting("diffusion process of the teacher and students", "process")
    teacher_width: int | None = _setting("teacher width", "teacher_width")
    teacher_depth: int | None = _setting("teacher transformer blocks", "teacher_depth")
    teacher_steps: int | None = _setting("teacher training steps", "teacher_steps")
    teacher_batch: int | None = _setting("teacher batch size", "teacher_batch")
    teacher_lr: float | None = _setting("teacher peak learning rate", "teacher_lr")
    ks: tuple[int, ...] | None = _setting("student step counts k (one student each)", "ks")
    teacher_ks: tuple[int, ...] | None = _setting("step counts the teacher is sampled with", "teacher_ks")
    distill_steps: int | None = _setting("D-MMD steps per student", "distill_steps")
    masked_ks: tuple[int, ...] | None = _setting("the digits' masked students' step counts", "masked_ks")
    masked_distill_steps: int | None = _setting("D-MMD steps per masked digits student", "masked_distill_steps")
    distill_batch: int | None = _setting("D-MMD batch size", "distill_batch")
    distill: dict | None = _setting("further DistillConfig fields as JSON, e.g. '{\"lr_gen\": 1e-4}' (merged "
                                    "into the part's own: {} for digits and words is dmmd distill's defaults for "
                                    "the process; text pins the settings of its README results)", "distill")
    num_samples: int | None = _setting("draws per sampler for the metrics", "num_samples")
    length: int | None = _setting("tokens per sequence", "length")
    vocab_size: int | None = _setting("words of the Markov chain", "vocab_size")
    reference_width: int | None = _setting("reference LM width", "reference_width")
    reference_layers: int | None = _setting("reference LM blocks", "reference_layers")
    reference_steps: int | None = _setting("reference LM training steps", "reference_steps")
    temperature: float | None = _setting("teacher temperature, in distillation and teacher sampling", "temperature")
    top_p: float | None = _setting("teacher top-p (soft mask in distillation, nucleus in teacher sampling)", "top_p")
    num_data: int | None = _setting("held-out sequences for the GM", "num_data")


def part_configs(cfg: DemoConfig, quick: bool = False) -> dict[str, Options]:
    """Each part's config: its defaults (``quick``: shrunk), then the settings given; a setting
    that applies to no part that runs, or a bad value, raises ``ValueError`` naming it."""
    if not cfg.data or len(set(cfg.data)) != len(cfg.data) or any(p not in PARTS for p in cfg.data):
        raise ValueError(f"data must name distinct parts among {PARTS}, got {cfg.data}")
    if cfg.jobs < 0:
        raise ValueError(f"jobs must be >= 0 (0: one process per job), got {cfg.jobs}")
    given = {name: getattr(cfg, name) for name in SETTINGS if getattr(cfg, name) is not None}
    for name in given:
        if not any(p in SETTINGS[name] for p in cfg.data):
            parts = " or ".join(p for p in PARTS if p in SETTINGS[name])
            raise ValueError(f"{name} applies to --data {parts}, which is not among the parts run ({cfg.data})")
    out = cfg.out or ("runs/demo-quick" if quick else "runs/demo")
    configs = {}
    for part in cfg.data:
        cls, defaults = DEMO_PARTS[part].config, DEMO_PARTS[part].defaults
        values = {**defaults, **(QUICK[part] if quick else {}),
                  "out": os.path.join(out, part), "device": cfg.device, "seed": cfg.seed}
        for name, value in given.items():
            if part in SETTINGS[name]:
                if name == "distill":
                    value = {**part_default(part, "distill"), **value}
                values[SETTINGS[name][part]] = (value,) if name == "process" and part == "digits" else value
        config = cls.from_dict(values)
        config.validate()
        configs[part] = config
    return configs


def _jobs(configs: dict[str, Options]) -> list[tuple[str, object]]:
    """The independent jobs of the parts that run, ``(part, job)``, in :data:`JOB_ORDER`."""
    return [(part, job) for part in JOB_ORDER if part in configs
            for job in DEMO_PARTS[part].module.jobs(configs[part])]


def _run_job(part: str, config: dict, job, threads: int) -> None:
    """One job in a worker process (its progress: one line per finished stage)."""
    torch.set_num_threads(threads)
    cfg = DEMO_PARTS[part].config.from_dict(config)
    label = part if job is None else f"{part} {job}"

    def log(line: str) -> None:
        print(f"[{label}] {line}", flush=True)

    DEMO_PARTS[part].module.run_job(cfg, job, progress=False, log=log)
    log("done")


def run_jobs(configs: dict[str, Options], workers: int, *, progress: bool = True, log=print) -> None:
    """Run the parts' independent jobs side by side in ``workers`` processes (spawned: no
    inherited threads or CUDA state), meanwhile in this process what a part's jobs read (its
    ``prepare``: the digits classifier, which both digits jobs read). The first job to fail
    stops the others and its error is raised here."""
    jobs = _jobs(configs)
    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    log(f"running {len(jobs)} jobs in {workers} processes, {threads} thread(s) each")
    with multiprocessing.get_context("spawn").Pool(workers) as pool:  # leaving it terminates the workers

        def submit(part, job):
            return pool.apply_async(_run_job, (part, configs[part].to_dict(), job, threads))

        def prepared(part) -> bool:
            return hasattr(DEMO_PARTS[part].module, "prepare")

        running = [submit(part, job) for part, job in jobs if not prepared(part)]
        for part in dict.fromkeys(part for part, _ in jobs if prepared(part)):  # (meanwhile, in this process)
            DEMO_PARTS[part].module.prepare(configs[part], progress=progress,
                                            log=lambda line, part=part: log(f"[{part}] {line}"))
            running += [submit(p, job) for p, job in jobs if p == part]
        while running:
            for finished in [j for j in running if j.ready()]:
                finished.get()  # raises the job's error
                running.remove(finished)
            time.sleep(0.2)
        pool.close()
        pool.join()


def run_demo(cfg: DemoConfig, *, quick: bool = False, progress: bool = True, log=print) -> dict:
    """Run (or resume) every part; returns ``{"config", "parts", "verdicts", "seconds"}`` (also
    ``results.json``) and writes and prints ``table.md``."""
    configs = part_configs(cfg, quick)
    for part in configs:  # a missing optional package, named, before any work
        for module, purpose in DEMO_PARTS[part].needs:
            require(module, purpose)
    out = os.path.dirname(next(iter(configs.values())).out)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    workers = cfg.jobs or len(_jobs(configs))
    if workers > 1 and cfg.device == "cpu":
        run_jobs(configs, workers, progress=progress, log=log)
    results, tables, lines, seconds = {}, [], [], {}
    for part, pcfg in configs.items():
        log(f"== {part}")
        t0 = time.perf_counter()
        results[part], table, verdict_lines = DEMO_PARTS[part].module.report(pcfg, progress=progress, log=log)
        tables.append(table)
        lines += verdict_lines
        seconds[part] = round(time.perf_counter() - t0, 1)
    seconds["total"] = round(time.perf_counter() - start, 1)
    result = {"config": cfg.to_dict(), "quick": quick, "parts": results, "verdicts": lines, "seconds": seconds}
    write_json_atomic(os.path.join(out, "results.json"), result)
    table = "\n\n".join([*tables, "Verdicts (differences under two standard errors are ties):", "\n".join(lines)])
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    log(table)
    return result


__all__ = ["DEMO_PARTS", "PARTS", "QUICK", "DemoConfig", "DemoPart", "part_configs", "run_demo"]

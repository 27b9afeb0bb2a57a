"""``dmmd demo --data text``: the paper's text experiment (Tables 2 and 5) in miniature, on the
embedded text (the Python standard library's documentation, as bytes), with no downloads. On
two CPU cores its teacher stays too weak for the step count to matter (the README's demo
section); on a GPU, with the settings the README recommends, it is the real comparison.

Stages, each resumed from what an earlier run left under ``out``:

1. ``teacher/``: a masked-diffusion teacher (:func:`dmmd.training.teacher.train_teacher`).
2. ``reference/``: a small GPT-2-configured reference LM for the metrics
   (:func:`dmmd.training.reference.train_reference`).
3. ``student_k{k}/``: a D-MMD student per ``k`` (:func:`dmmd.training.distill.distill`), distilled from
   the teacher modified by ``temperature`` / ``top_p`` (paper section 3.3).
4. ``samples/{name}.json``: ``num_samples`` sequences from the teacher at every step count of
   ``teacher_ks`` (with the same temperature / top-p) and from each student at its ``k``.
5. ``eval/{name}.json``: GM (U-statistic, with its standard error), generative perplexity and
   unigram entropy against held-out text (:func:`dmmd.metrics.evaluate.evaluate_set`).

Then ``results.json``, ``table.md`` (printed) and ``gm_vs_steps.png``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dmmd.apps.draws import draw
from dmmd.apps.stages import cached, keyed_file, place
from dmmd.apps.verdicts import against_teacher
from dmmd.data import ByteText, make_source
from dmmd.extras import require
from dmmd.metrics.evaluate import evaluate_set
from dmmd.models.reference_lm import load_reference
from dmmd.options import Options, check_keys, option
from dmmd.training.checkpoint import write_json_atomic
from dmmd.training.distill import DistillConfig, distill, load_student
from dmmd.training.reference import ReferenceConfig, train_reference
from dmmd.training.teacher import TeacherConfig, load_teacher, train_teacher

# DistillConfig keys the demo sets itself from its own options (refused in --distill, by name)
DEMO_OWNED = {"teacher": "is the demo's own teacher", "student_steps": "is set per student by --ks",
              "temperature": "is a demo option: use --temperature", "top_p": "is a demo option: use --top-p",
              "out": "is set under --out", "device": "is a demo option: use --device",
              "seed": "is a demo option: use --seed", "batch_size": "is a demo option: use --distill-batch",
              "steps": "is a demo option: use --distill-steps"}


@dataclass
class TextDemoConfig(Options):
    """Everything ``dmmd demo --data text`` runs; the defaults took 15 min 16 s on a 2-core AMD EPYC
    (idle)."""

    out: str = option("runs/demo/text", "output directory; every stage resumes from what is there")
    device: str = option("cpu", "cpu or cuda")
    seed: int = option(0, "seed of every stage")
    length: int = option(64, "bytes per sequence (teacher, students, reference LM, samples)")
    # teacher: masked diffusion, log-linear schedule
    teacher_width: int = option(128, "teacher transformer width")
    teacher_depth: int = option(3, "teacher transformer blocks")
    teacher_steps: int = option(3000, "teacher training steps")
    teacher_batch: int = option(32, "teacher batch size")
    teacher_lr: float = option(2e-3, "teacher peak learning rate")
    # reference LM (GPT-2 configuration)
    reference_width: int = option(128, "reference LM width")
    reference_layers: int = option(2, "reference LM blocks")
    reference_steps: int = option(600, "reference LM training steps")
    # students
    ks: tuple[int, ...] = option((4, 8, 16), "student step counts k (one student each)")
    distill_steps: int = option(800, "D-MMD steps per student")
    distill_batch: int = option(32, "D-MMD batch size")
    temperature: float = option(1.0, "teacher temperature, in distillation and in teacher sampling")
    top_p: float = option(1.0, "teacher top-p (soft mask in distillation, nucleus in teacher sampling)")
    # the student settings the README's demo results were measured with (dmmd distill's defaults
    # but the earlier masked noise and a constant learning rate)
    distill: dict = option({"warmup": 20, "noise_init": 0.02, "noise_into": "embedding", "lr_schedule": "constant"},
                           "further DistillConfig fields as JSON, e.g. '{\"lr_gen\": 1e-4}' (merged into "
                           "these defaults)")
    # evaluation
    teacher_ks: tuple[int, ...] = option((4, 8, 16, 32, 64, 128), "step counts the teacher is evaluated at")
    num_samples: int = option(128, "samples per sampler for the metrics")
    num_data: int = option(128, "held-out sequences for the metrics")

    def validate(self) -> None:
        for name in ("length", "teacher_steps", "reference_steps", "distill_steps", "num_samples", "num_data"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ks", "teacher_ks"):
            ks = getattr(self, name)
            if not ks or any(int(k) != k or k < 1 for k in ks):
                raise ValueError(f"{name} must be positive integers, got {ks}")
        if self.num_samples < 2 or self.num_data < 2:
            raise ValueError("num_samples and num_data must be >= 2 (the GM U-statistic needs pairs)")
        teacher_config(self).validate()  # the teacher's and reference LM's options, named, before any work
        reference_config(self).validate()
        distill_config(self, self.ks[0]).validate()  # --distill's keys by name, then their values


def teacher_config(cfg: TextDemoConfig) -> TeacherConfig:
    """The teacher, in ``out/teacher-<key>`` (:mod:`dmmd.apps.stages`)."""
    return place(TeacherConfig.from_dict(dict(
        data="text", process="masked", schedule="loglinear", length=cfg.length, width=cfg.teacher_width,
        depth=cfg.teacher_depth, heads=4, batch_size=cfg.teacher_batch, steps=cfg.teacher_steps, lr=cfg.teacher_lr,
        warmup=min(100, cfg.teacher_steps // 10), ema=0.999, eval_every=0, eval_batches=2, eval_steps=64,
        save_every=max(1, cfg.teacher_steps // 10), seed=cfg.seed, out="", device=cfg.device)), cfg.out, "teacher")


def reference_config(cfg: TextDemoConfig) -> ReferenceConfig:
    """The reference LM, in ``out/reference-<key>``."""
    return place(ReferenceConfig.from_dict(dict(
        data="text", length=cfg.length, n_layer=cfg.reference_layers, n_embd=cfg.reference_width, n_head=4,
        batch_size=32, steps=cfg.reference_steps, lr=2e-3, warmup=min(50, cfg.reference_steps // 10),
        save_every=max(1, cfg.reference_steps // 4), seed=cfg.seed, out="", device=cfg.device)), cfg.out,
        "reference")


def distill_config(cfg: TextDemoConfig, k: int) -> DistillConfig:
    """The student for ``k``: the demo's settings, then ``cfg.distill`` (keys checked by name)."""
    check_keys(cfg.distill, DistillConfig.leaf_names(), "distill", owned=DEMO_OWNED)
    return place(DistillConfig.from_dict({
        "teacher": os.path.join(teacher_config(cfg).run.out, "checkpoint"), "student_steps": k,
        "batch_size": cfg.distill_batch, "steps": cfg.distill_steps,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "save_every": max(1, cfg.distill_steps // 4),
        "seed": cfg.seed, "out": "", "device": cfg.device, **cfg.distill}), cfg.out, f"student_k{k}")


def _samplers(cfg: TextDemoConfig) -> list[dict]:
    rows = [{"name": f"teacher_{k}", "model": "teacher", "steps": k} for k in cfg.teacher_ks]
    return rows + [{"name": f"student_{k}", "model": "D-MMD student", "steps": k} for k in cfg.ks]


def _draw(cfg: TextDemoConfig, spec: dict, teacher) -> torch.Tensor:
    """``num_samples`` sequences from one sampler (teacher: with the demo's temperature / top-p);
    ``teacher`` is the loaded ``(model, process)``."""
    seed = cfg.seed + 1000 + spec["steps"]
    if spec["model"] == "teacher":
        model, process = teacher
        kw = {"temperature": cfg.temperature, "top_p": cfg.top_p}
    else:
        model, process, _ = load_student(os.path.join(distill_config(cfg, spec["steps"]).run.out, "checkpoint"),
                                         device=cfg.device)
        kw = {}
    return draw(model, process, cfg.num_samples, cfg.length, spec["steps"], seed=seed, noise_seed=seed,
                device=cfg.device, batch_size=256, **kw)


def run_text(cfg: TextDemoConfig, *, progress: bool = True, log=print) -> dict:
    """Run (or resume) every stage; returns ``{"config", "rows", "seconds"}`` (also in results.json)."""
    cfg.validate()
    for module, purpose in (("transformers", "the demo's reference LM"), ("matplotlib", "the demo's plot")):
        require(module, purpose)  # before any work
    os.makedirs(cfg.out, exist_ok=True)
    seconds = {}

    def stage(name, fn):
        log(f"== {name}")
        t0 = time.perf_counter()
        out = fn()
        seconds[name] = round(time.perf_counter() - t0, 1)
        return out

    teacher = stage("teacher", lambda: train_teacher(teacher_config(cfg), progress=progress))
    log(f"teacher: {teacher['step']} steps, validation ELBO bound {teacher['val_bits']:.3f} bits/byte")
    ref = stage("reference LM", lambda: train_reference(reference_config(cfg), progress=progress))
    log(f"reference LM: validation NLL {ref['val_nll']:.3f} nats/byte")
    for k in cfg.ks:
        stage(f"student k={k}", lambda k=k: distill(distill_config(cfg, k), progress=progress))

    def evaluate_all():
        specs = _samplers(cfg)
        reference = load_reference(ref["model"], device=cfg.device)
        source = make_source(teacher_config(cfg).source)
        gen = torch.Generator().manual_seed(cfg.seed)
        data = source.sample(cfg.num_data, gen, split="val").to(cfg.device)
        held_out = source.sample(cfg.num_samples, gen, split="val")
        teacher_model, process, _ = load_teacher(teacher["checkpoint"], device=cfg.device)
        rows = []
        for spec in tqdm(specs + [{"name": "data", "model": "data (held out)", "steps": None}],
                         desc="evaluate", disable=not progress):
            path = keyed_file(os.path.join(cfg.out, "eval"), spec["name"],
                              {**_sampler_key(cfg, spec), "reference": ref["model"], "num_data": cfg.num_data})

            def score(spec=spec):
                x = held_out if spec["model"].startswith("data") else _samples(cfg, spec, (teacher_model, process))
                return {**spec, **evaluate_set(reference, spec["name"], x, data, estimator="ustat")}

            rows.append(cached(path, score))
        return rows

    rows = stage("evaluate", evaluate_all)
    result = {"config": cfg.to_dict(), "rows": rows, "seconds": seconds}
    write_json_atomic(os.path.join(cfg.out, "results.json"), result)
    table = markdown_tables(rows, cfg)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, os.path.join(cfg.out, "gm_vs_steps.png"), cfg)
    log(table)
    return result


def _sampler_key(cfg: TextDemoConfig, spec: dict) -> dict:
    """What a sampler's draws depend on: the model's directory (its settings' hash with it) or the
    data's config, the steps, the teacher's sampling temperature and top-p, the draws and the seed."""
    if spec["model"] == "teacher":
        model = teacher_config(cfg).run.out
    elif spec["model"].startswith("data"):
        model = teacher_config(cfg).source.to_dict()
    else:
        model = distill_config(cfg, spec["steps"]).run.out
    return {"model": model, "steps": spec["steps"], "temperature": cfg.temperature, "top_p": cfg.top_p,
            "num_samples": cfg.num_samples, "seed": cfg.seed}


def _samples(cfg: TextDemoConfig, spec: dict, teacher) -> torch.Tensor:
    """A sampler's sequences, drawn once and kept in ``samples/{name}-<key>.json`` (with their text)."""
    path = keyed_file(os.path.join(cfg.out, "samples"), spec["name"], _sampler_key(cfg, spec))
    if os.path.exists(path):
        with open(path) as f:
            return torch.tensor(json.load(f)["tokens"], dtype=torch.long)
    x = _draw(cfg, spec, teacher)
    write_json_atomic(path, {**spec, "tokens": x.tolist(), "text": [ByteText.decode(r) for r in x]})
    return x


def _gm(row: dict) -> str:
    return f"{row['gm']:.3f} ± {row['gm_stderr']:.3f}"


def verdicts(rows: list[dict]) -> list[str]:
    """Plain sentences: does each student beat the teacher at its k, and how many steps does
    the teacher need to be as good (:func:`dmmd.apps.verdicts.against_teacher`)?"""
    teacher = {r["steps"]: (r["gm"], r["gm_stderr"]) for r in rows if r["model"] == "teacher"}
    return [f"k={r['steps']}: student GM {_gm(r)}"
            + against_teacher(r["steps"], (r["gm"], r["gm_stderr"]), teacher, lambda e: f"{e[0]:.3f} ± {e[1]:.3f}")
            + "." for r in rows if r["model"] == "D-MMD student"]


def markdown_tables(rows: list[dict], cfg: TextDemoConfig) -> str:
    """Table 5's shape (a row per sampler) and Table 2's (GM by step count), then the verdicts."""
    long = ["| model | steps | GM (± s.e.) ↓ | gen. perplexity | unigram entropy |", "|---|---|---|---|---|"]
    for r in rows:
        long.append(f"| {r['model']} | {r['steps'] or ''} | {_gm(r)} | {r['gen_ppl']:.2f} | {r['entropy']:.2f} |")
    steps = sorted({r["steps"] for r in rows if r["steps"]})
    grid = ["| model | " + " | ".join(map(str, steps)) + " |", "|---" * (len(steps) + 1) + "|"]
    for model in ("teacher", "D-MMD student"):
        by = {r["steps"]: r for r in rows if r["model"] == model}
        grid.append(f"| {model} | " + " | ".join(f"{by[s]['gm']:.3f}" if s in by else "" for s in steps) + " |")
    mod = f"teacher temperature {cfg.temperature}, top-p {cfg.top_p}"
    head = (f"GM against {cfg.num_data} held-out sequences of {cfg.length} bytes, {cfg.num_samples} samples "
            f"per sampler, reference LM trained here; {mod}.")
    return "\n".join([head, "", *long, "", "GM by denoising steps:", "", *grid, "", *verdicts(rows)])


def plot(rows: list[dict], path: str, cfg: TextDemoConfig) -> None:
    """Steps vs GM: the teacher's curve and the students' points, with standard errors."""
    matplotlib = require("matplotlib", "the demo's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model, style in (("teacher", dict(fmt="o-", color="tab:blue")),
                         ("D-MMD student", dict(fmt="s", color="tab:red", markersize=8))):
        rs = sorted((r for r in rows if r["model"] == model), key=lambda r: r["steps"])
        ax.errorbar([r["steps"] for r in rs], [r["gm"] for r in rs], yerr=[r["gm_stderr"] for r in rs],
                    capsize=3, label=model, **style)
    data = [r for r in rows if r["steps"] is None]
    if data:
        ax.axhline(data[0]["gm"], color="gray", ls="--", lw=1, label="held-out data")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["steps"] for r in rows if r["steps"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("denoising steps (NFE)")
    ax.set_ylabel("Gradient Moment (lower is better)")
    ax.set_title(f"D-MMD on embedded text (T={cfg.temperature}, top-p={cfg.top_p})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
def jobs(cfg: TextDemoConfig) -> list[None]:
    """The part's independent jobs (:mod:`dmmd.apps.demo`): one, the whole part."""
    return [None]


def run_job(cfg: TextDemoConfig, job: None, *, progress: bool = True, log=print) -> None:
    run_text(cfg, progress=progress, log=log)


def report(cfg: TextDemoConfig, *, progress: bool = True, log=print) -> tuple[list[dict], str, list[str]]:
    """The part's rows (for results.json), its markdown tables and its verdict lines."""
    rows = run_text(cfg, progress=progress, log=log)["rows"]
    return rows, markdown_tables(rows, cfg), [f"text, {v}" for v in verdicts(rows)]



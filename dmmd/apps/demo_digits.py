"""The demo's image part: scikit-learn's 8x8 digits as 64 pixel tokens, run through the image
study (:mod:`dmmd.apps.image_study`) with both processes (uniform and masked) and the demo's
smaller sizes: the FID classifier, per process a teacher sampled with 1-32 steps and a D-MMD
student per ``k``, FID by steps, a grid per sampler, side-by-side grids (data | teacher at k |
student at k | teacher at 32 steps) and the plot, all under ``out`` and resumed from what is
there. Each process's stages are one job (:func:`run_job`), so the two can run side
by side once the classifier exists (:func:`prepare`)."""
from __future__ import annotations

from dmmd.apps.image_study import (
    ImageStudyConfig,
    Scorer,
    markdown_tables,
    results_json,
    run_image_study,
    run_process,
)
from dmmd.apps.image_study import report as study_report
from dmmd.apps.verdicts import against_teacher

# The demo's image settings: ImageStudyConfig fields (the rest keep the study's defaults)
# (masked students need a longer distillation than uniform ones to beat their teacher: one k = 2
# masked student of twice the uniform ones' steps. The sizes fit the demo's quarter of an hour on
# the slower of the 2-core machines it was measured on, with room: see README "The main job".
# The grid stops at 32 steps: the verdicts need the teacher at 4k, 16 for k = 4, and 32 shows
# where it levels off.)
DEFAULTS = dict(out="runs/demo/digits", processes=("uniform", "masked"), parts=("main",), ks=(2, 4),
                teacher_grid=(1, 2, 4, 8, 16, 32), samples=1000, teacher_steps=2500, distill_steps=1000,
                masked_ks=(2,), masked_distill_steps=2400)


def digits_config(**settings) -> ImageStudyConfig:
    """The demo's image study with ``settings`` (ImageStudyConfig fields) changed."""
    return ImageStudyConfig.from_dict({**DEFAULTS, **settings})


def run_digits(cfg: ImageStudyConfig, *, progress: bool = True, log=print) -> dict:
    """Run (or resume) the image part; returns the study's results (:func:`dmmd.apps.image_study.report`)."""
    run_image_study(cfg, progress=progress, log=log)
    return study_report(cfg)


def prepare(cfg: ImageStudyConfig, *, progress: bool = True, log=print) -> None:
    """What every process's job reads: the FID classifier (trained once, here)."""
    cfg.validate()
    log(f"FID classifier: held-out accuracy {Scorer(cfg, progress=progress).accuracy:.3f}")


def jobs(cfg: ImageStudyConfig) -> list[str]:
    """The part's independent jobs (:mod:`dmmd.apps.demo`): one per process."""
    return list(cfg.processes)


def run_job(cfg: ImageStudyConfig, process: str, *, progress: bool = True, log=print) -> None:
    """One process's teacher, FIDs and students (after :func:`prepare`, whose classifier it reads)."""
    run_process(cfg, process, Scorer(cfg, progress=progress, train=False), progress=progress, log=log)


def report(cfg: ImageStudyConfig, *, progress: bool = True, log=print) -> tuple[dict, str, list[str]]:
    """The part's results (for results.json), its markdown tables and its verdict lines, with
    its grids and plot written (every stage resumed)."""
    res = run_digits(cfg, progress=progress, log=log)
    return results_json(res), markdown_table(res, cfg), verdicts(res, cfg)


def _fid(e: tuple[float, float]) -> str:
    return f"{e[0]:.2f} ± {e[1]:.2f}"


def verdicts(res: dict, cfg: ImageStudyConfig) -> list[str]:
    """One sentence per finished student: its FID against the teacher's at k and 4k steps, and
    the fewest teacher steps that are as good (:func:`dmmd.apps.verdicts.against_teacher`)."""
    out = []
    for process in cfg.processes:
        teacher = {s: (r["fid"], r["fid_stderr"]) for s, r in res["teacher"].get(process, {}).items()}
        for k, r in sorted(res["student"].get(process, {}).items()):
            e = (r["fid"], r["fid_stderr"])
            out.append(f"digits ({process}), k={k}: student FID {_fid(e)}" + against_teacher(k, e, teacher, _fid) + ".")
    return out


def markdown_table(res: dict, cfg: ImageStudyConfig) -> str:
    head = (f"{cfg.data}: FID (classifier features) of {cfg.samples} draws per sampler against the training "
            f"images; teacher width {cfg.teacher_width}, depth {cfg.teacher_depth}, {cfg.teacher_steps} steps; "
            f"students {cfg.distill_steps} D-MMD steps"
            + (f" ({cfg.masked_distill_steps} for the masked ones)" if "masked" in cfg.processes
               and cfg.masked_distill_steps not in (None, cfg.distill_steps) else "") + ".")
    return head + "\n\n" + markdown_tables(cfg, res)


__all__ = ["DEFAULTS", "digits_config", "jobs", "markdown_table", "prepare", "report", "run_digits", "run_job",
           "verdicts"]

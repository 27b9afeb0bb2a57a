"""The demo's image part: scikit-learn's 8x8 digits as 64 pixel tokens, run through the image
study (:mod:`dmmd.apps.image_study`) with one process and the demo's smaller sizes: the FID
classifier, a teacher sampled with 1-64 steps, a D-MMD student per ``k``, FID by steps, a grid
per sampler, side-by-side grids (data | teacher at k | student at k | teacher at 64 steps) and
the plot, all under ``out`` and resumed from what is there."""
from __future__ import annotations

from dmmd.apps.image_study import ImageStudyConfig, markdown_tables, report, run_image_study
from dmmd.apps.verdicts import against_teacher

# The demo's image settings: ImageStudyConfig fields (the rest keep the study's defaults)
DEFAULTS = dict(out="runs/demo/digits", processes=("uniform",), parts=("main",), ks=(2, 4),
                teacher_grid=(1, 2, 4, 8, 16, 32, 64), samples=1000, teacher_steps=2500, distill_steps=1200)


def digits_config(**settings) -> ImageStudyConfig:
    """The demo's image study with ``settings`` (ImageStudyConfig fields) changed."""
    return ImageStudyConfig.from_dict({**DEFAULTS, **settings})


def run_digits(cfg: ImageStudyConfig, *, progress: bool = True, log=print) -> dict:
    """Run (or resume) the image part; returns the study's results (:func:`report`)."""
    run_image_study(cfg, progress=progress, log=log)
    return report(cfg)


def _fid(e: tuple[float, float]) -> str:
    return f"{e[0]:.2f} ± {e[1]:.2f}"


def verdicts(res: dict, cfg: ImageStudyConfig) -> list[str]:
    """One sentence per student: its FID against the teacher's at k steps, and the fewest teacher
    steps that are as good (:func:`dmmd.apps.verdicts.against_teacher`)."""
    out = []
    for process in cfg.processes:
        teacher = {s: (r["fid"], r["fid_stderr"]) for s, r in res["teacher"][process].items()}
        for k, r in sorted(res["student"][process].items()):
            e = (r["fid"], r["fid_stderr"])
            out.append(f"digits ({process}), k={k}: student FID {_fid(e)}" + against_teacher(k, e, teacher, _fid) + ".")
    return out


def markdown_table(res: dict, cfg: ImageStudyConfig) -> str:
    head = (f"{cfg.data}: FID (classifier features) of {cfg.samples} draws per sampler against the training "
            f"images; teacher width {cfg.teacher_width}, depth {cfg.teacher_depth}, {cfg.teacher_steps} steps; "
            f"students {cfg.distill_steps} D-MMD steps.")
    return head + "\n\n" + markdown_tables(cfg, res)


__all__ = ["DEFAULTS", "digits_config", "markdown_table", "run_digits", "verdicts"]

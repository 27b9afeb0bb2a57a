"""What a distillation reads and writes: the teacher to distil (a dmmd checkpoint, a transformers
masked-LM directory, or a model given in Python) with its process and data
(:func:`load_distill_teacher`), the state saved with a student, and the student loaded back
(:func:`load_student`). Imports the options, never the algorithm or the run."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dmmd.data import DataConfig, make_source
from dmmd.diffusion.processes import DiffusionProcess
from dmmd.models.denoiser import Denoiser
from dmmd.models.external import ExternalDenoiser
from dmmd.training.artifacts import inspect
from dmmd.training.checkpoint import load_tensors
from dmmd.training.distill.options import DistillConfig
from dmmd.training.masked_lm import load_masked_lm
from dmmd.training.teacher import TeacherConfig, load_teacher, model_state, rebuild_model

if TYPE_CHECKING:
    from dmmd.training.distill.algorithm import Distiller

@dataclass
class DistillTeacher:
    """A teacher ready to distil: the model, its process, the data and what describes them."""

    model: Denoiser | ExternalDenoiser
    process: DiffusionProcess
    source: object                        # what draws the clean data (``.sample(batch, generator)``)
    data: DataConfig | None = None        # the source's config (None: a source given in Python)
    teacher_config: dict | None = None    # a dmmd teacher's TeacherConfig
    tokenizer: object = None              # a transformers teacher's, saved with the student
    conventions: dict | None = None       # a transformers teacher's (TeacherConventions), saved with the student
    directory: str | None = None          # a transformers teacher's: its remote code is copied to the student


def load_distill_teacher(cfg: DistillConfig, device: torch.device | str = "cpu") -> DistillTeacher:
    """The teacher ``cfg.teacher`` names (a dmmd checkpoint or a transformers masked-LM
    directory), its process and the data to distil on; every mismatch a ``ValueError`` naming it."""
    if inspect(cfg.teacher).is_transformers:
        if cfg.teacher_raw_weights:
            raise ValueError(f"teacher_raw_weights: the transformers directory {cfg.teacher} holds one set of weights")
        model, tokenizer, meta = load_masked_lm(cfg.teacher, mask_id=cfg.mask_id, device=str(device),
                                                trust_remote_code=cfg.trust_remote_code,
                                                conventions=cfg.conventions())
        if cfg.source.data:
            data = DataConfig.from_dict(cfg.source.to_dict())
        elif meta.get("source"):  # the data dmmd trained it on, with the data options given
            data = DataConfig.from_dict({**meta["source"], **{name: getattr(cfg.source, name)
                                                              for name in _data_options_set(cfg)}})
        else:
            raise ValueError(f"data: give the data to distil the transformers teacher {cfg.teacher} on (--data, "
                             f"--length; a .bin of its tokenizer's ids with --vocab-size)")
        source = make_source(data)
        mc = model.config
        if source.vocab_size > mc.num_classes:
            raise ValueError(f"data: its {source.vocab_size} token ids do not fit the teacher's {mc.num_classes} "
                             f"classes")
        if mc.length is not None and data.length > mc.length:
            raise ValueError(f"length: the teacher takes at most {mc.length} tokens, got {data.length}")
        if mc.block_size is not None and data.length % mc.block_size:
            raise ValueError(f"length: the block-diffusion teacher {cfg.teacher} works in blocks of {mc.block_size} "
                             f"tokens (its block_size); {data.length} is not a whole number of blocks")
        process = DiffusionProcess.of(mc, meta["schedule"])
        check_alignment(model, source, cfg.teacher)
        return DistillTeacher(model, process, source, data, None, tokenizer, meta["conventions"], cfg.teacher)
    conventions = [name for name, value in cfg.conventions().items() if value not in (None, "")]
    if cfg.trust_remote_code:
        conventions.insert(0, "trust_remote_code")
    if conventions:
        raise ValueError(f"{conventions[0]}: the dmmd teacher checkpoint {cfg.teacher} is dmmd's own model (that "
                         f"option is for a transformers teacher)")
    changed = _data_options_set(cfg)
    if changed:
        raise ValueError(f"{changed[0]}: the dmmd teacher checkpoint {cfg.teacher} distils on the data it was "
                         f"trained on (data options are for a transformers teacher)")
    model, process, state = load_teacher(cfg.teacher, use_ema=not cfg.teacher_raw_weights, mask_id=cfg.mask_id,
                                         device=str(device))
    tcfg = TeacherConfig.from_dict(state["config"])
    return DistillTeacher(model, process, make_source(tcfg.source), tcfg.source, tcfg.to_dict())


# A masked teacher read with the wrong alignment is refused when the other reading predicts the
# data better by this many nats per token, and well (this far below the uniform guess): an
# untrained model is not judged.
ALIGNMENT_MARGIN = 1.0
ALIGNMENT_PROBE = 32  # data sequences, one token masked in each


def check_alignment(model: ExternalDenoiser, source, name: str) -> None:
    """Refuse a masked transformers teacher whose logits the run reads shifted when they are
    aligned, or aligned when they are shifted (a Dream-style model without ``--shift-logits``):
    on a few data sequences with one inner token masked, the other reading must not predict that
    token clearly better (:data:`ALIGNMENT_MARGIN`)."""
    cfg = model.config
    if cfg.process != "masked":
        return
    x = source.sample(ALIGNMENT_PROBE, torch.Generator().manual_seed(0))
    if x.shape[1] < 3:
        return
    ref = next(model.parameters(), None)
    as_read, other = model.alignment_nll(x.to(ref.device if ref is not None else "cpu"),
                                         torch.Generator().manual_seed(1))
    if cfg.shift_logits:
        as_read, other = other, as_read
    guess = math.log(cfg.num_classes - len(cfg.never) - 1)
    if other < as_read - ALIGNMENT_MARGIN and other < guess - ALIGNMENT_MARGIN:
        now, then = ("shifted", "aligned") if cfg.shift_logits else ("aligned", "shifted")
        meaning = {"aligned": "output i predicts token i", "shifted": "output i predicts token i + 1"}
        raise ValueError(f"shift_logits: the teacher {name} looks {then} ({meaning[then]}), not {now}: a masked data "
                         f"token costs {as_read:.2f} nats read {now} and {other:.2f} read {then}; set --shift-logits "
                         f"{'false' if cfg.shift_logits else 'true'}")


def _data_options_set(cfg: DistillConfig) -> list[str]:
    """The data options ``cfg`` sets (those that differ from their defaults)."""
    return [f.name for f, default in DataConfig.flat_fields(DistillConfig().source)
            if getattr(cfg.source, f.name) != default]


def student_state(d: Distiller, cfg: DistillConfig, teacher: DistillTeacher) -> dict:
    """The JSON state saved with a student: what :func:`load_student` needs to rebuild it."""
    return {"kind": "student", "config": cfg.to_dict(), "teacher_config": teacher.teacher_config,
            "source": None if teacher.data is None else teacher.data.to_dict(),
            "schedule": d.process.schedule_name, **model_state(d.generator)}


def is_student(path: str) -> bool:
    return inspect(path).is_student


def load_student(path: str, *, use_ema: bool = True, device: str = "cpu", model: torch.nn.Module | None = None,
                 trust_remote_code: bool = False) -> tuple[Denoiser | ExternalDenoiser, DiffusionProcess, dict]:
    """A distilled generator (EMA weights by default), its process and its state, from a run's
    checkpoint or a transformers student directory (``OUT/student``; one whose model is code
    shipped in the directory, as its teacher's was, needs ``trust_remote_code``). A student of
    your own module (:func:`distill_model`) needs ``model``: an instance of that module's class,
    whose weights are replaced by the student's."""
    artifact = inspect(path)
    if not artifact.is_student:
        raise ValueError(f"{path} is not a D-MMD student (a {artifact.kind}; see dmmd distill)")
    if artifact.is_transformers:
        if not use_ema:
            raise ValueError(f"{path} holds the student's EMA weights only; the raw generator is in its run's "
                             f"checkpoint")
        student, _, meta = load_masked_lm(path, device=device, trust_remote_code=trust_remote_code)
        mc = student.config
        return student, DiffusionProcess.of(mc, meta["schedule"]), meta
    state = artifact.state
    student = rebuild_model(state, module=model)
    student.load_state_dict(load_tensors(path, "ema" if use_ema else "generator"))
    mc = student.config
    process = DiffusionProcess.of(mc, state["schedule"])
    return student.to(device).eval(), process, state

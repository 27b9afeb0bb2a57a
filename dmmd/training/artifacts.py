"""What a path holds, decided in one place (:func:`inspect`): a dmmd checkpoint of a teacher or of
a student (``OUT/checkpoint``), or a transformers directory holding a teacher (any masked LM, or
one dmmd trained) or a student (``dmmd distill``'s ``OUT/student``). The loaders
(:func:`dmmd.training.teacher.load_teacher`, :func:`dmmd.training.distill.load_student`, the
distiller's teacher) and the command line ask it instead of reading the files' keys
themselves. Imports the checkpoint and transformers readers only."""
from __future__ import annotations

from dataclasses import dataclass

from dmmd.training.checkpoint import read_state
from dmmd.training.masked_lm import is_masked_lm_dir, read_meta

TEACHER = "teacher checkpoint"
STUDENT = "student checkpoint"
TRANSFORMERS = "transformers directory"
TRANSFORMERS_STUDENT = "transformers student directory"
KINDS = (TEACHER, STUDENT, TRANSFORMERS, TRANSFORMERS_STUDENT)


@dataclass(frozen=True)
class Artifact:
    """A teacher or student on disk: its ``path``, its ``kind`` (one of :data:`KINDS`) and what
    dmmd saved with it (``state``: a checkpoint's JSON state, or the ``dmmd.json`` of a
    transformers directory, ``{}`` for one dmmd did not write)."""

    path: str
    kind: str
    state: dict

    @property
    def is_student(self) -> bool:
        return self.kind in (STUDENT, TRANSFORMERS_STUDENT)

    @property
    def is_transformers(self) -> bool:
        return self.kind in (TRANSFORMERS, TRANSFORMERS_STUDENT)

    def data(self):
        """The :class:`~dmmd.data.DataConfig` it was trained on (``None`` when it does not say)."""
        from dmmd.data import DataConfig
        from dmmd.training.teacher import TeacherConfig  # (the teacher module loads through here)

        state = self.state
        if state.get("source"):
            return DataConfig.from_dict(state["source"])
        if state.get("teacher_config"):
            return TeacherConfig.from_dict(state["teacher_config"]).source
        if self.kind == TEACHER and state.get("config"):
            return TeacherConfig.from_dict(state["config"]).source
        return None


def inspect(path: str) -> Artifact:
    """What ``path`` holds; a missing or damaged checkpoint is an error naming it."""
    if is_masked_lm_dir(path):
        meta = read_meta(path)
        return Artifact(path, TRANSFORMERS_STUDENT if meta.get("kind") == "student" else TRANSFORMERS, meta)
    state = read_state(path)
    return Artifact(path, STUDENT if state.get("kind") == "student" else TEACHER, state)


__all__ = ["KINDS", "STUDENT", "TEACHER", "TRANSFORMERS", "TRANSFORMERS_STUDENT", "Artifact", "inspect"]

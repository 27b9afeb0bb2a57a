"""Stages are keyed by everything that produced them (dmmd.apps.stages)."""
import threading

import pytest

from dmmd.apps.stages import place, settings_key, shared_stage
from dmmd.training.distill import options
from dmmd.training.distill.options import DistillConfig
from dmmd.training.loop import OutputLock


def test_the_key_follows_the_settings_not_the_output_directory():
    a = DistillConfig.from_dict({"student_steps": 2, "out": "here"})
    assert settings_key(a) == settings_key(DistillConfig.from_dict({"student_steps": 2, "out": "there"}))
    assert settings_key(a) != settings_key(a.replace(student_steps=4))
    placed = place(DistillConfig.from_dict({"student_steps": 2}), "parent", "student")
    assert placed.run.out == f"parent/student-{settings_key(placed)}"


def test_a_changed_per_process_default_changes_the_key_of_a_run_that_leaves_it_unset(monkeypatch):
    unset = DistillConfig.from_dict({"student_steps": 2})
    set_ = unset.replace(aux_per_gen=1)
    before = settings_key(unset), settings_key(set_)
    changed = {kind: dict(d) for kind, d in options.PROCESS_DEFAULTS.items()}
    changed["masked"]["aux_per_gen"] += 1
    monkeypatch.setattr(options, "PROCESS_DEFAULTS", changed)
    # a finished stage made with the old default is not found under the new one
    assert settings_key(unset) != before[0]
    assert settings_key(set_) == before[1]


def test_a_shared_stage_waits_for_the_process_that_holds_it(tmp_path):
    # two studies side by side reach the same teacher: the second waits for the first's lock
    # (taken here on another descriptor: flock refuses it within one process too) and then runs
    out = str(tmp_path / "teacher")
    held = OutputLock(out)
    lines, runs = [], []

    def stage():
        with OutputLock(out):
            runs.append(1)
            return "finished"

    threading.Timer(0.3, held.release).start()
    assert shared_stage(stage, log=lines.append, poll=0.05) == "finished"
    assert runs == [1]
    assert len(lines) == 1 and lines[0].startswith("waiting: ") and "in use by another run" in lines[0]

    def broken():  # any other error is the stage's own, raised at once
        raise ValueError("bad source")

    with pytest.raises(ValueError, match="bad source"):
        shared_stage(broken, log=lines.append)

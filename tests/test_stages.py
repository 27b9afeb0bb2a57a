"""Stages are keyed by everything that produced them (dmmd.apps.stages)."""
from dmmd.apps.stages import place, settings_key
from dmmd.training.distill import options
from dmmd.training.distill.options import DistillConfig


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

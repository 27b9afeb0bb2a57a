"""One source per option: configs nest instead of copying fields, read nested (checkpoints) and
flat (flags) keys alike, refuse unknown keys by name; every flag's help comes from its field;
DistillConfig keys passed through the demo or the study either work or are refused by name."""
from __future__ import annotations

import pytest

from dmmd.apps.cli import main
from dmmd.apps.demo import DemoConfig, part_configs
from dmmd.apps.demo_text import TextDemoConfig, distill_config
from dmmd.apps.demo_words import WordsDemoConfig
from dmmd.apps.markov_study import StudyConfig, run_study
from dmmd.training.distill import DistillConfig
from dmmd.training.reference import ReferenceConfig
from dmmd.training.teacher import TeacherConfig


def test_nested_and_flat_keys_build_the_same_config():
    flat = TeacherConfig.from_dict({"data": "markov", "length": 6, "steps": 5, "width": 32})
    nested = TeacherConfig.from_dict({"source": {"data": "markov", "length": 6}, "run": {"steps": 5}, "width": 32})
    assert flat == nested
    assert flat.source.data == "markov" and flat.run.steps == 5 and flat.run.out == "runs/teacher"
    assert TeacherConfig.from_dict(flat.to_dict()) == flat  # a checkpoint's JSON round-trips
    assert flat.replace(steps=9).run.steps == 9 and flat.run.steps == 5


def test_each_run_keeps_its_own_defaults_for_shared_options():
    assert TeacherConfig().run.out == "runs/teacher" and DistillConfig().run.out == "runs/student"
    assert ReferenceConfig().run.out == "runs/reference" and DistillConfig().run.batch_size == 64


@pytest.mark.parametrize("cls", [TeacherConfig, DistillConfig, ReferenceConfig, DemoConfig, TextDemoConfig,
                                 WordsDemoConfig, StudyConfig])
def test_unknown_keys_are_refused_by_name(cls):
    with pytest.raises(ValueError, match=r"unknown \w+ keys: \['no_such_option'\]"):
        cls.from_dict({"no_such_option": 1})


@pytest.mark.parametrize("cls", [TeacherConfig, DistillConfig, ReferenceConfig, DemoConfig, TextDemoConfig,
                                 WordsDemoConfig, StudyConfig])
def test_every_option_has_its_help_beside_its_field(cls):
    for f, _ in cls.flat_fields():
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


@pytest.mark.parametrize("command", [["train-teacher"], ["distill"], ["reference", "train"], ["demo"]])
def test_help_shows_each_default_once_and_booleans_as_true_false(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert "--out" in text and "(default: None) (default" not in text
    if command == ["distill"]:
        assert "--soft-target [{true,false}]" in text  # alone, a boolean flag means true


def test_a_boolean_flag_alone_means_true():
    from dmmd.apps.cli import _parser

    ap, _ = _parser()
    args, _ = ap.parse_known_args(["distill", "--trust-remote-code", "--soft-target", "false", "--dropout"])
    assert (args.trust_remote_code, args.soft_target, args.dropout) == (True, False, True)


def _text(**settings) -> TextDemoConfig:
    return part_configs(DemoConfig.from_dict({"data": ("text",), **settings}), quick=True)["text"]


def test_demo_distill_keys_work_or_are_refused_by_name():
    with pytest.raises(ValueError, match="distill: 'top_p' is a demo option: use --top-p"):
        _text(distill={"lr_gen": 5e-5, "top_p": 0.9})
    with pytest.raises(ValueError, match="distill: unknown key 'lr_generator'"):
        _text(distill={"lr_generator": 1e-4})
    with pytest.raises(ValueError, match="lr_gen must be > 0"):  # values too, before any work
        _text(distill={"lr_gen": -1.0})
    cfg = _text(distill={"lr_gen": 5e-5, "noise_per": "token", "aux_per_gen": 3})
    student = distill_config(cfg, 4)
    assert (student.lr_gen, student.noise_per, student.aux_per_gen) == (5e-5, "token", 3)
    assert student.run.batch_size == cfg.distill_batch and student.student_steps == 4
    assert student.noise_into == "embedding"  # merged into the text part's own distill settings
    for part in ("digits", "words"):  # each part refuses the keys it sets itself, by name
        with pytest.raises(ValueError, match="distill: 'steps' is set by distill_steps|'steps' is a demo option"):
            part_configs(DemoConfig.from_dict({"data": (part,), "distill": {"steps": 5}}))


def test_demo_command_refuses_a_colliding_distill_key_before_any_work(tmp_path, capsys):
    assert main(["demo", "--quick", "--data", "text", "--out", str(tmp_path / "d"), "--distill", '{"top_p": 0.9}',
                 "--no-progress"]) == 2
    assert "dmmd demo: error: distill: 'top_p' is a demo option: use --top-p" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_study_distill_keys_work_or_are_refused_by_name(tmp_path):
    for key, match in (("steps", "is a study option: distill_steps"), ("no_such", "unknown key 'no_such'")):
        cfg = StudyConfig(out=str(tmp_path), distill={key: 1})
        with pytest.raises(ValueError, match=match):
            run_study(cfg, progress=False, log=lambda *_: None)
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("key,value", [("steps", -5), ("steps", 0), ("batch_size", 0), ("save_every", 0),
                                       ("warmup", -1), ("grad_clip", 0.0), ("time_limit_min", -1.0)])
def test_run_options_out_of_their_domain_are_refused_before_any_work(tmp_path, key, value):
    from dmmd.training.teacher import train_teacher

    cfg = TeacherConfig.from_dict({"data": "markov", "length": 6, "width": 16, "depth": 1, "heads": 2,
                                   "out": str(tmp_path / "t"), key: value})
    with pytest.raises(ValueError, match=rf"^{key} must be"):
        train_teacher(cfg, progress=False)
    assert not (tmp_path / "t").exists()

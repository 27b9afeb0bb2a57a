"""The command line with bad input: every user error (a bad value, a missing or damaged file, a
busy output directory) is one line ``dmmd <command>: error: ...`` naming the argument or file,
exit status 2, no traceback, before any work; ``--debug`` shows the traceback; an unknown flag
shows the command's own usage."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dmmd.apps.cli import main
from dmmd.training.loop import OutputLock
from dmmd.training.teacher import TeacherConfig, train_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "markov", "--vocab-size", "4", "--length", "6", "--width", "16", "--depth", "1", "--heads", "2",
        "--batch-size", "4", "--eval-every", "0", "--no-progress"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = TeacherConfig.from_dict(dict(data="markov", vocab_size=4, length=6, width=16, depth=1, heads=2,
                                       batch_size=4, steps=2, eval_every=0, out=str(out)))
    return train_teacher(cfg, progress=False)["checkpoint"]


def _refused(capsys, argv, *needles):
    """``main(argv)`` exits 2 with one line on stderr naming each of ``needles``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    prefix = "dmmd " + (" ".join(argv[:2]) if argv[0] == "reference" else argv[0]) + ": error: "
    assert err.startswith(prefix) and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("flags,needle", [
    (["--num", "0"], "--num"), (["--num", "-2"], "--num"), (["--steps", "0"], "--steps"),
    (["--length", "0"], "--length"), (["--top-p", "1.5"], "--top-p"), (["--temperature", "0"], "--temperature"),
    (["--block-size", "0"], "--block-size")])
def test_sample_refuses_bad_values_before_loading(capsys, teacher, flags, needle):
    _refused(capsys, ["sample", "--checkpoint", teacher, *flags], needle)


def test_missing_and_damaged_checkpoints_name_the_file(capsys, teacher, tmp_path):
    _refused(capsys, ["sample", "--checkpoint", str(tmp_path / "nope")], str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("weights.safetensors", "state.json"):
        (broken / name).write_bytes(open(os.path.join(teacher, name), "rb").read())
    (broken / "weights.safetensors").write_bytes(b"garbage" * 10)
    _refused(capsys, ["sample", "--checkpoint", str(broken)], str(broken / "weights.safetensors"))
    (broken / "state.json").write_text('{"state": ')
    _refused(capsys, ["sample", "--checkpoint", str(broken)], str(broken / "state.json"))
    _refused(capsys, ["distill", "--teacher", str(broken), "--out", str(tmp_path / "s"), "--no-progress"],
             str(broken / "state.json"))
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--steps", "-5"], "steps must be >= 1"), (["--top-p", "0"], "top_p"), (["--lr-gen", "-1"], "lr_gen"),
    (["--soft-target", "true"], "soft_target"), (["--noise-per", "pixel"], "noise_per"),
    (["--lr-schedule", "linear"], "lr_schedule"), (["--noise-into", "head"], "noise_into")])
def test_distill_refuses_bad_options_before_any_work(capsys, tmp_path, flags, needle):
    cfg = TeacherConfig.from_dict(dict(data="markov", vocab_size=4, length=6, width=16, depth=1, heads=2,
                                       batch_size=4, steps=2, eval_every=0, process="uniform",
                                       out=str(tmp_path / "t")))
    teacher = train_teacher(cfg, progress=False)["checkpoint"]
    _refused(capsys, ["distill", "--teacher", teacher, "--out", str(tmp_path / "s"), "--no-progress", *flags],
             needle)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--process", "absorbing"], "process"), (["--schedule", "square"], "schedule"), (["--width", "15"], "width"),
    (["--data", "/no/such.bin"], "/no/such.bin"), (["--steps", "0"], "steps"), (["--ema", "1.5"], "ema")])
def test_train_teacher_refuses_bad_options_before_any_work(capsys, tmp_path, flags, needle):
    _refused(capsys, ["train-teacher", *TINY, "--out", str(tmp_path / "t"), *flags], needle)
    assert not (tmp_path / "t").exists()


def test_a_bad_config_file_is_named(capsys, tmp_path):
    bad = tmp_path / "run.json"
    bad.write_text("{not json")
    _refused(capsys, ["train-teacher", "--config", str(bad), "--out", str(tmp_path / "t")], str(bad))
    bad.write_text(json.dumps({"widht": 3}))
    _refused(capsys, ["train-teacher", "--config", str(bad), "--out", str(tmp_path / "t")], "widht")
    _refused(capsys, ["train-teacher", "--config", str(tmp_path / "none.json")], str(tmp_path / "none.json"))


def test_a_busy_output_directory_is_one_line(capsys, tmp_path):
    with OutputLock(str(tmp_path / "t")):
        _refused(capsys, ["train-teacher", *TINY, "--steps", "2", "--out", str(tmp_path / "t")], "in use",
                 str(tmp_path / "t"))


def test_evaluate_names_missing_files(capsys, tmp_path):
    _refused(capsys, ["evaluate", "--samples", str(tmp_path / "s.json"), "--reference", str(tmp_path)],
             "--samples", str(tmp_path / "s.json"))
    (tmp_path / "s.json").write_text(json.dumps({"tokens": [[1, 2]]}))
    _refused(capsys, ["evaluate", "--samples", str(tmp_path / "s.json"), "--reference", str(tmp_path / "r")],
             "--reference", str(tmp_path / "r"))


def test_debug_shows_the_traceback_and_unknown_flags_show_the_commands_usage(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = lambda *a: subprocess.run([sys.executable, "-m", "dmmd", *a], env=env, cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True)
    plain = run("sample", "--checkpoint", str(tmp_path / "nope"))
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = run("sample", "--checkpoint", str(tmp_path / "nope"), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
    unknown = run("distill", "--studnet-steps", "4")
    assert unknown.returncode == 2 and "usage: dmmd distill" in unknown.stderr
    assert "unrecognized arguments: --studnet-steps 4" in unknown.stderr


def test_a_missing_optional_dependency_is_one_line_naming_the_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    err = _refused(capsys, ["demo", "--quick", "--out", str(tmp_path / "d"), "--no-progress"],
                   "matplotlib", "pip install 'dmmd[demo]'")
    assert "plot" in err and not (tmp_path / "d").exists()  # before any work
    monkeypatch.delitem(sys.modules, "matplotlib")
    monkeypatch.setitem(sys.modules, "sklearn", None)  # the digits part's data
    _refused(capsys, ["demo", "--quick", "--out", str(tmp_path / "d"), "--no-progress"],
             "scikit-learn", "pip install 'dmmd[images]'")
    monkeypatch.setitem(sys.modules, "transformers", None)  # the text part's reference LM
    _refused(capsys, ["demo", "--quick", "--data", "text", "--out", str(tmp_path / "d"), "--no-progress"],
             "transformers", "pip install 'dmmd[metrics]'")
    assert not (tmp_path / "d").exists()
    monkeypatch.setitem(sys.modules, "transformers", None)
    _refused(capsys, ["reference", "train", "--steps", "1", "--out", str(tmp_path / "r")],
             "transformers", "pip install 'dmmd[metrics]'")

"""`dmmd demo`: the quick mode end to end (digits, the default, with words added; the text part
on its own; every stage resumed), the per-part settings, and the verdicts."""
import glob
import json
import os

import pytest

from dmmd.apps import demo_digits, demo_words
from dmmd.apps.cli import main
from dmmd.apps.demo import DemoConfig, part_configs, run_demo
from dmmd.apps.demo_text import TextDemoConfig, markdown_tables, verdicts


def _row(model, steps, gm, se=0.1):
    return {"model": model, "steps": steps, "name": f"{model}_{steps}", "gm": gm, "gm_stderr": se,
            "gen_ppl": 10.0, "entropy": 3.0}


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_quick_demo_on_digits_and_words_end_to_end_and_resume(tmp_path, capsys):
    assert DemoConfig().data == ("digits",)  # words: a part to add
    out = str(tmp_path / "demo")
    both = ["--data", "digits", "words"]
    assert main(["demo", "--quick", *both, "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)
    assert result["quick"] and set(result["parts"]) == {"digits", "words"} and set(result["seconds"]) == {
        "digits", "words", "total"}
    v = result["verdicts"]
    assert [line.split(":")[0] for line in v] == ["digits (uniform), k=2", "digits (uniform), k=4",
                                                 "digits (masked), k=2", "digits (masked), k=4", "words, k=4",
                                                 "words, k=8"]
    assert all("the teacher at" in line for line in v)
    assert "the teacher at 16 steps" in v[1] and "the teacher at 16 steps" in v[3]  # k=4 against 4k
    # digits, both processes: FID per sampler, grids side by side, the plot
    digits = result["parts"]["digits"]
    for process in ("uniform", "masked"):
        assert set(digits["teacher"][process]) == {"1", "2", "4", "16"}
        assert set(digits["student"][process]) == {"2", "4"}
    grids = os.path.join(out, "digits", "grids")
    assert all(_png(os.path.join(grids, f"side_by_side_{p}_k{k}.png")) for k in (2, 4) for p in ("uniform", "masked"))
    assert _png(os.path.join(out, "digits", "fid_by_steps.png"))
    # words: exact metrics per sampler; held-out draws of the chain are all possible
    rows = result["parts"]["words"]
    assert [(r["model"], r["steps"]) for r in rows] == (
        [("teacher", k) for k in (2, 4, 8, 32)] + [("D-MMD student", k) for k in (4, 8)] + [("data", None)])
    assert rows[-1]["impossible"] == 0 and all(r["samples"] == 200 for r in rows)
    assert all(0 <= r["impossible"] <= 1 and r["entropy"] > 0 for r in rows)
    assert _png(os.path.join(out, "words", "words_by_steps.png"))
    (kept,) = glob.glob(os.path.join(out, "words", "samples", "student_4-*.json"))  # named by what made it
    with open(kept) as f:
        s = json.load(f)
    assert len(s["tokens"]) == 200 and len(s["words"][0].split()) == 16
    table = open(os.path.join(out, "table.md")).read()
    assert "| D-MMD student | 4 |" in table and "Verdicts" in table and table.strip() in printed

    # resume: a deleted evaluation is recomputed from the kept samples, bit for bit; deleted
    # samples are redrawn from the kept checkpoints identically
    for pattern in ("words/eval/student_8-*.json", "words/samples/teacher_8-*.json", "words/eval/teacher_8-*.json",
                    "digits/student_uniform_k4-*/fid-*.json"):
        (path,) = glob.glob(os.path.join(out, pattern))
        os.remove(path)
    assert main(["demo", "--quick", *both, "--out", out, "--no-progress"]) == 0
    capsys.readouterr()
    with open(os.path.join(out, "results.json")) as f:
        again = json.load(f)
    for part in (again, result):  # (a resumed student's distill_seconds is this run's: 0)
        for process in ("uniform", "masked"):
            for row in part["parts"]["digits"]["student"][process].values():
                row.pop("distill_seconds")
    assert again["parts"] == result["parts"] and again["verdicts"] == v

    # the digits jobs only read the classifier (both start at once): held by another run, they go on
    from dmmd.apps.image_study import classifier_config
    from dmmd.training.loop import OutputLock

    cfg = part_configs(DemoConfig.from_dict({"out": out}), quick=True)["digits"]
    with OutputLock(classifier_config(cfg).run.out):
        demo_digits.run_job(cfg, "masked", progress=False, log=lambda *_: None)


def test_quick_text_demo_end_to_end_and_resume(tmp_path, capsys):
    top = str(tmp_path / "demo")
    out = os.path.join(top, "text")
    assert main(["demo", "--quick", "--data", "text", "--out", top, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)
    cfg = result["config"]
    assert cfg["ks"] == [4, 8, 16] and cfg["teacher_ks"] == [4, 8, 16, 32, 64, 128] and cfg["length"] == 32
    rows = result["rows"]
    got = [(r["model"], r["steps"]) for r in rows]
    assert got == ([("teacher", k) for k in (4, 8, 16, 32, 64, 128)]
                   + [("D-MMD student", k) for k in (4, 8, 16)] + [("data (held out)", None)])
    for r in rows:
        assert r["n"] == 32 and r["gm_stderr"] > 0 and r["gen_ppl"] > 1 and r["entropy"] > 0
    # held-out text against held-out text: GM near zero; the samplers of a 150-step teacher are far
    data = rows[-1]
    assert abs(data["gm"]) < 3 * data["gm_stderr"] + 1e-9
    assert min(r["gm"] for r in rows[:-1]) > data["gm"]
    for k in (4, 8, 16):
        (student,) = glob.glob(os.path.join(out, f"student_k{k}-*"))
        assert os.path.isdir(os.path.join(student, "checkpoint"))
        (samples,) = glob.glob(os.path.join(out, "samples", f"student_{k}-*.json"))
        with open(samples) as f:
            s = json.load(f)
        assert len(s["tokens"]) == 32 and all(len(t) == 32 for t in s["tokens"]) and len(s["text"]) == 32
    with open(os.path.join(out, "gm_vs_steps.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = open(os.path.join(out, "table.md")).read()
    assert "| D-MMD student | 16 |" in table and "GM by denoising steps" in table and table.strip() in printed
    # every result is as readable as any file the user writes (no 0600 files in 0700 folders)
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            mode = os.stat(os.path.join(root, name)).st_mode & 0o777
            assert mode & ~umask & 0o444 == 0o444 & ~umask, (os.path.join(root, name), oct(mode))

    # Re-running resumes: a deleted evaluation is recomputed from the kept samples, bit for bit,
    # and a deleted sample file is redrawn from the kept student checkpoint identically.
    for pattern in ("eval/student_8-*.json", "samples/teacher_16-*.json", "eval/teacher_16-*.json"):
        (path,) = glob.glob(os.path.join(out, pattern))
        os.remove(path)
    assert main(["demo", "--quick", "--data", "text", "--out", top, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "teacher: 150 steps" in printed and "text, k=4: student GM" in printed
    with open(os.path.join(out, "results.json")) as f:
        again = json.load(f)["rows"]
    assert again == rows


def test_verdicts_say_where_the_student_wins_and_loses():
    rows = [_row("teacher", k, gm) for k, gm in ((4, 5.0), (8, 3.0), (16, 2.0), (32, 1.0))]
    rows += [_row("D-MMD student", 4, 2.05), _row("D-MMD student", 8, 3.1), _row("D-MMD student", 16, 4.0),
             _row("D-MMD student", 32, 0.1)]
    v = verdicts(rows)
    assert v[0].startswith("k=4: student GM 2.050") and "beats the teacher at 4 steps" in v[0]
    assert "as good as the teacher at 16 steps" in v[0]
    assert "ties with the teacher at 8 steps" in v[1] and "as good as" not in v[1]
    assert "loses to the teacher at 16 steps" in v[2]
    assert "better than the teacher at every step count up to 32" in v[3]
    table = markdown_tables(rows, TextDemoConfig())
    assert "| teacher | 4.000 | 5.000 |" not in table  # columns are step counts in order
    assert "| teacher | 5.000 | 3.000 | 2.000 | 1.000 |" in table
    assert "| D-MMD student | 2.050 | 3.100 | 4.000 | 0.100 |" in table


@pytest.mark.parametrize("bad, name", [({"ks": [4, 0]}, "ks"), ({"teacher_ks": []}, "teacher_ks"),
                                       ({"num_samples": 1}, "num_samples"), ({"distill_steps": 0}, "distill_steps"),
                                       ({"data": ("text", "nope")}, "data"), ({"data": ()}, "data"),
                                       ({"process": "gaussian"}, "process"), ({"vocab_size": 1}, "vocab_size")])
def test_bad_demo_options_are_named(bad, name):
    with pytest.raises(ValueError, match=name):
        part_configs(DemoConfig.from_dict({"data": ("words", "text"), **bad}), quick=True)


@pytest.mark.parametrize("data", ["digits", "words", "text"])
@pytest.mark.parametrize("bad, name", [({"teacher_width": 0}, "width"), ({"teacher_steps": 0}, "steps"),
                                       ({"distill": {"lr_gen": -1.0}}, "lr_gen")])
def test_every_part_refuses_bad_teacher_and_student_options_before_any_part_runs(data, bad, name):
    # a bad value for the second part must not wait until the first part has run for minutes
    with pytest.raises(ValueError, match=name):
        part_configs(DemoConfig.from_dict({"data": (data,), **bad}))
    if data != "digits":
        with pytest.raises(ValueError, match="lr must be"):
            part_configs(DemoConfig.from_dict({"data": (data,), "teacher_lr": -1.0}))


def test_unknown_demo_option_is_an_error():
    with pytest.raises(ValueError, match="nonsense"):
        DemoConfig.from_dict({"nonsense": 1})


def test_settings_change_every_part_that_has_them_and_refuse_parts_that_do_not_run():
    both = {"data": ("digits", "words")}
    cfgs = part_configs(DemoConfig.from_dict({**both, "teacher_steps": 7, "process": "masked", "ks": (3,)}),
                        quick=True)
    assert set(cfgs) == {"digits", "words"}
    assert cfgs["digits"].teacher_steps == cfgs["words"].teacher_steps == 7
    assert cfgs["digits"].processes == ("masked",) and cfgs["words"].process == "masked"
    assert cfgs["digits"].ks == cfgs["words"].ks == (3,)
    assert cfgs["digits"].out == os.path.join("runs/demo-quick", "digits")
    assert set(part_configs(DemoConfig(), quick=False)) == {"digits"}
    plain = part_configs(DemoConfig.from_dict(both), quick=False)
    assert plain["digits"].processes == ("uniform", "masked") and plain["words"].process == "uniform"
    # the digits' masked students: their own step counts and a longer distillation
    from dmmd.apps.image_study import distill_config, students

    digits = plain["digits"]
    assert [k for _, k, _ in students(digits, "masked")] == [2]
    assert [k for _, k, _ in students(digits, "uniform")] == [2, 4]
    assert distill_config(digits, "masked", "student_masked_k2", 2, {}).run.steps == 2400
    assert distill_config(digits, "uniform", "student_uniform_k2", 2, {}).run.steps == 1000
    mine = part_configs(DemoConfig.from_dict({"masked_ks": (4,), "masked_distill_steps": 50}))["digits"]
    assert mine.masked_ks == (4,) and mine.masked_distill_steps == 50
    with pytest.raises(ValueError, match="masked_ks applies to --data digits"):
        part_configs(DemoConfig.from_dict({"data": ("words",), "masked_ks": (2,)}))
    assert not plain["words"].self_loops
    assert plain["words"].out == os.path.join("runs/demo", "words")
    with pytest.raises(ValueError, match="reference_steps applies to --data text"):
        part_configs(DemoConfig.from_dict({"reference_steps": 5}))
    with pytest.raises(ValueError, match="vocab_size applies to --data words"):
        part_configs(DemoConfig.from_dict({"vocab_size": 16}))


def _word_row(model, steps, impossible, se=0.01, entropy=0.7):
    return {"model": model, "steps": steps, "name": f"{model}_{steps}", "impossible": impossible,
            "impossible_stderr": se, "nll": 0.8, "nll_stderr": 0.01, "entropy": entropy, "samples": 1000}


def test_word_and_digit_verdicts():
    rows = [_word_row("teacher", k, p) for k, p in ((2, 1.0), (4, 0.9), (8, 0.5), (16, 0.2), (32, 0.1))]
    rows += [_word_row("D-MMD student", 4, 0.21, entropy=0.6), _word_row("D-MMD student", 8, 0.51),
             _word_row("data", None, 0.0, se=0.0)]
    v = demo_words.verdicts(rows)
    assert v[0].startswith("words, k=4: student 21.0% ± 1.0 impossible; beats the teacher at 4 steps (90.0% ± 1.0)")
    assert "as good as the teacher at 16 steps" in v[0] and "diversity 0.60 nats/word (data 0.70)." in v[0]
    assert "; ties with the teacher at 16 steps (20.0% ± 1.0)" in v[0]  # the 4k target
    assert "; loses to the teacher at 32 steps (10.0% ± 1.0)" in v[1]
    assert "ties with the teacher at 8 steps" in v[1] and "as good as" not in v[1]
    assert v[1].endswith("diversity 0.70 nats/word (data 0.70).")
    collapsed = demo_words.verdicts([*rows[:5], _word_row("D-MMD student", 4, 0.0, entropy=0.5), rows[-1]])
    assert collapsed[0].endswith("diversity 0.50 nats/word (data 0.70: less diverse than the data).")
    res = {"teacher": {"uniform": {1: {"fid": 40.0, "fid_stderr": 1.0}, 2: {"fid": 20.0, "fid_stderr": 1.0},
                                   64: {"fid": 9.0, "fid_stderr": 0.5}}},
           "student": {"uniform": {2: {"fid": 8.0, "fid_stderr": 0.5}}}}
    cfg = demo_digits.digits_config()
    (line,) = demo_digits.verdicts(res, cfg)
    assert line == ("digits (uniform), k=2: student FID 8.00 ± 0.50; beats the teacher at 2 steps (20.00 ± 1.00); "
                    "as good as the teacher at 64 steps.")
    res["teacher"]["uniform"][8] = {"fid": 6.0, "fid_stderr": 0.5}
    (line,) = demo_digits.verdicts(res, cfg)
    assert "; beats the teacher at 2 steps (20.00 ± 1.00); loses to the teacher at 8 steps (6.00 ± 0.50); as good " \
           "as the teacher at 8 steps." in line


def test_a_failing_job_stops_the_demo_with_its_error(tmp_path):
    # the words job's teacher directory held by another run: that job fails in its worker process,
    # the digits jobs are stopped, and the error reaches the caller
    from dmmd.training.loop import OutputInUse, OutputLock

    cfg = DemoConfig.from_dict({"data": ("digits", "words"), "out": str(tmp_path / "demo")})
    teacher = demo_words.teacher_config(part_configs(cfg, quick=True)["words"]).run.out
    os.makedirs(teacher)
    lock = OutputLock(teacher)
    try:
        with pytest.raises(OutputInUse, match="words/teacher-[0-9a-f]+ is in use by another run"):
            run_demo(cfg, quick=True, progress=False, log=lambda *_: None)
    finally:
        lock.release()
    with pytest.raises(ValueError, match="jobs must be >= 0"):
        part_configs(DemoConfig.from_dict({"jobs": -1}))

"""`dmmd demo`: the quick mode end to end (the whole story, resumed), and the table's verdicts."""
import json
import os

import pytest

from dmmd.apps.cli import main
from dmmd.apps.demo import DemoConfig, demo_config, markdown_tables, verdicts


def _row(model, steps, gm, se=0.1):
    return {"model": model, "steps": steps, "name": f"{model}_{steps}", "gm": gm, "gm_stderr": se,
            "gen_ppl": 10.0, "entropy": 3.0}


def test_quick_demo_end_to_end_and_resume(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--out", out, "--no-progress"]) == 0
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
        assert os.path.isdir(os.path.join(out, f"student_k{k}", "checkpoint"))
        with open(os.path.join(out, "samples", f"student_{k}.json")) as f:
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
    os.remove(os.path.join(out, "eval", "student_8.json"))
    os.remove(os.path.join(out, "samples", "teacher_16.json"))
    os.remove(os.path.join(out, "eval", "teacher_16.json"))
    assert main(["demo", "--quick", "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "teacher: 150 steps" in printed
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
    table = markdown_tables(rows, DemoConfig())
    assert "| teacher | 4.000 | 5.000 |" not in table  # columns are step counts in order
    assert "| teacher | 5.000 | 3.000 | 2.000 | 1.000 |" in table
    assert "| D-MMD student | 2.050 | 3.100 | 4.000 | 0.100 |" in table


@pytest.mark.parametrize("bad, name", [({"ks": [4, 0]}, "ks"), ({"teacher_ks": []}, "teacher_ks"),
                                       ({"num_samples": 1}, "num_samples"), ({"distill_steps": 0}, "distill_steps")])
def test_bad_demo_options_are_named(bad, name):
    with pytest.raises(ValueError, match=name):
        demo_config(True, **bad).validate()


def test_unknown_demo_option_is_an_error():
    with pytest.raises(ValueError, match="nonsense"):
        demo_config(False, nonsense=1)

"""The README's examples run as written, so they cannot rot: the Python blocks of "Distill your
own model" and "Use the ops in your own training loop", and the command lines of the former
(with fewer training steps; the line with a user's own paths is left out)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section(title: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def _run_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


# what each example must have made, checked after it ran
CHECKS = {
    "Distill your own model": "assert x.shape == (8, 6) and int(x.max()) < 4  # never the mask\n"
                              "assert os.path.isfile('runs/my_student/checkpoint/state.json')\n",
    "Use the ops in your own training loop": "assert all(p.grad is not None for p in generator.parameters())\n"
                                             "assert teacher.noise.weight.abs().sum() == 0\n",
}


@pytest.mark.parametrize("title", list(CHECKS))
def test_python_examples_run(title, tmp_path):
    (code,) = _blocks(_section(title), "python")
    result = _run_python(code + "\nimport os\n" + CHECKS[title], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()  # each example prints what it made


def test_command_line_example_runs(tmp_path):
    pytest.importorskip("transformers")
    (script,) = _blocks(_section("Distill your own model"), "bash")
    lines = [line for line in script.replace("\\\n", " ").splitlines() if line and not line.startswith("#")]
    commands, buffer = [], ""
    for line in lines:  # the echo spans two lines inside its quotes
        buffer = f"{buffer}\n{line}" if buffer else line
        if buffer.count("'") % 2 == 0:
            commands.append(buffer)
            buffer = ""
    commands = [c for c in commands if "path/to/" not in c]  # the user's own paths
    assert len(commands) == 4, commands
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dmmd").write_text(f"#!/bin/sh\nexec {sys.executable} -m dmmd \"$@\"\n")
    (bin_dir / "dmmd").chmod(0o755)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    for command in commands:
        command = command.replace("--steps 2000", "--steps 10")  # the same commands, shorter runs
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr[-3000:])
    assert (tmp_path / "runs" / "bert_k4" / "student" / "noise.safetensors").is_file()
    assert "--- sample 3 (4 steps)" in result.stdout

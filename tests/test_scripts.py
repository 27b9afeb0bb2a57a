"""The GPU check's pieces that run without a GPU: the sanitizer command lines (--dry-run) and
the sanitizer probe's cases, run here on the CPU kernels."""
import os
import subprocess
import sys

import dmmd_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_dry_run_prints_one_sanitizer_line_per_tool():
    out = subprocess.run(["bash", "scripts/device_check.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    tools = [line.split("--tool ")[1].split()[0] for line in out]
    assert tools == ["memcheck", "racecheck", "synccheck", "initcheck"]
    assert all("scripts/sanitizer_probe.py" in line and "--error-exitcode" in line for line in out)
    # initcheck must see torch's kernels' writes: it runs unfiltered, the others on ours only.
    assert ["kns=dmmd" in line for line in out] == [True, True, True, False]


def test_sanitizer_probe_runs_every_op(monkeypatch):
    called = set()
    for name in ("generator_loss", "aux_loss", "teacher_logprobs", "sample_categorical", "posterior_sample",
                 "denoise_step", "grad_gram", "philox4x32"):
        op = getattr(dmmd_ops, name)
        monkeypatch.setattr(dmmd_ops, name, lambda *a, _op=op, _n=name, **k: (called.add(_n), _op(*a, **k))[1])
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import sanitizer_probe
    finally:
        sys.path.pop(0)
    assert sanitizer_probe.main(["--cpu"]) == 0
    assert called == {"generator_loss", "aux_loss", "teacher_logprobs", "sample_categorical", "posterior_sample",
                      "denoise_step", "grad_gram", "philox4x32"}

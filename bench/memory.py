"""Peak resident memory of one step, for the benchmarks that report it (``extra_info``): the
peak a call adds above what was resident before it (Linux ``VmHWM``, reset first), measured in a
fresh subprocess per case so that no case inherits another's freed pages."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_bytes(fn) -> int:
    """In this process: the peak resident memory ``fn()`` adds above what is resident now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _status("VmRSS")
    fn()
    return _status("VmHWM") - base


def in_subprocess(module: str, call: str) -> int:
    """``module.call`` (an expression returning bytes, e.g. ``peak_step_bytes('aux', True)``)
    evaluated in a fresh Python process."""
    code = f"import json, {module} as b; print(json.dumps(b.{call}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    return int(json.loads(out.stdout.strip().splitlines()[-1]))

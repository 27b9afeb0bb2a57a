"""How a small distillation run degrades when another job shares the CPU.

Runs the exact-source study's distillation (width 64, batch 256, Markov V = 4, L = 6) for a
fixed number of steps, alone and beside a copy of itself (a second process running the same
distillation under the same setting), for each OpenMP setting given; every job is a fresh
process (OpenMP reads its settings at start-up). Prints steps per second, one line per setting.

    python bench/under_load.py --steps 40 --settings default passive threads1

On 2 cores (2026-11-30): default (spinning workers) 17.1 steps/s alone, 4.1 beside a copy of
itself; passive 11.4 and 11.4; one thread 12.3 and 12.7. The dmmd CLI uses passive.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> environment of the measured job (and of its copy)
SETTINGS = {
    "default": {"OMP_WAIT_POLICY": ""},  # empty: libgomp's default (spin, then sleep)
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "threads1": {"OMP_NUM_THREADS": "1"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin1k": {"GOMP_SPINCOUNT": "1000"},
    "spin100": {"GOMP_SPINCOUNT": "100"},
}

MEASURE = """
import sys, time, json
from dmmd.training.distill import DistillConfig, distill
cfg = DistillConfig.from_dict(dict(teacher=sys.argv[1], student_steps=2, batch_size=256, steps=int(sys.argv[2]),
                                   out=sys.argv[3], save_every=10**6, aux_per_gen=2, soft_target=True))
t0 = time.perf_counter()
distill(cfg, progress=False, resume=False)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def _env(setting: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    for key, value in SETTINGS[setting].items():
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    return env


def _teacher(tmp: str) -> str:
    from dmmd.training.teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig.from_dict(dict(data="markov", vocab_size=4, length=6, markov_fanout=2, width=64, depth=2,
                                       heads=2, batch_size=256, steps=20, eval_every=0, out=os.path.join(tmp, "t")))
    return train_teacher(cfg, progress=False)["checkpoint"]


def _seconds(teacher: str, steps: int, setting: str, out: str) -> float:
    done = subprocess.run([sys.executable, "-c", MEASURE, teacher, str(steps), out], env=_env(setting), cwd=ROOT,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def measure(teacher: str, steps: int, setting: str, tmp: str) -> dict:
    alone = _seconds(teacher, steps, setting, os.path.join(tmp, f"alone-{setting}"))
    copy = subprocess.Popen([sys.executable, "-c", MEASURE, teacher, "1000000", os.path.join(tmp, f"copy-{setting}")],
                            env=_env(setting), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(5)  # the copy is past its start-up and training
        loaded = _seconds(teacher, steps, setting, os.path.join(tmp, f"loaded-{setting}"))
    finally:
        copy.kill()
        copy.wait()
    return {"setting": setting, "steps": steps, "alone_steps_per_s": round(steps / alone, 2),
            "beside_a_copy_steps_per_s": round(steps / loaded, 2), "slowdown": round(loaded / alone, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--settings", nargs="+", default=["default", "passive", "threads1"], choices=list(SETTINGS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = _teacher(tmp)
        for setting in args.settings:
            print(json.dumps(measure(teacher, args.steps, setting, tmp)), flush=True)


if __name__ == "__main__":
    main()

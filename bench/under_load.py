"""How a small distillation run degrades when another process shares the CPU.

Runs the exact-source study's distillation (width 64, batch 256, Markov V = 4, L = 6) for a
fixed number of steps, alone and beside a competitor (a 2-thread PyTorch loop of small ops), under
each thread setting given, each in a fresh process (the OpenMP settings are read at start-up),
and prints steps per second as a JSON line per case.

    python bench/under_load.py --steps 60 --settings default passive threads1
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

# name -> environment for the measured process
SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "threads1": {"OMP_NUM_THREADS": "1"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin1k": {"GOMP_SPINCOUNT": "1000"},
    "spin100": {"GOMP_SPINCOUNT": "100"},
    "dmmd_auto": {"DMMD_THREADS": "auto"},
}

# Another user's 2-thread PyTorch job: many small parallel regions (like a small model's
# training step), the kind whose idle OpenMP workers spin while waiting.
COMPETITOR = """
import torch
torch.set_num_threads(2)
x, w = torch.randn(1536, 64), torch.randn(64, 64)
while True:
    x = torch.nn.functional.layer_norm(torch.relu(x @ w), (64,))
"""

MEASURE = """
import sys, time, json
from dmmd.training.distill import DistillConfig, distill
cfg = DistillConfig.from_dict(dict(teacher=sys.argv[1], student_steps=2, batch_size=256, steps=int(sys.argv[2]),
                                   out=sys.argv[3], save_every=10**6, aux_per_gen=2, soft_target=True))
t0 = time.perf_counter()
distill(cfg, progress=False, resume=False)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def _teacher(tmp: str) -> str:
    from dmmd.training.teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig.from_dict(dict(data="markov", vocab_size=4, length=6, markov_fanout=2, width=64, depth=2,
                                       heads=2, batch_size=256, steps=20, eval_every=0, out=os.path.join(tmp, "t")))
    return train_teacher(cfg, progress=False)["checkpoint"]


def measure(teacher: str, steps: int, setting: str, loaded: bool, tmp: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, **SETTINGS[setting])
    competitor = None
    if loaded:
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=dict(os.environ),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)  # let it reach its loop
    try:
        out = subprocess.run([sys.executable, "-c", MEASURE, teacher, str(steps),
                              os.path.join(tmp, f"s-{setting}-{loaded}")], env=env, cwd=ROOT, check=True,
                             capture_output=True, text=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    seconds = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
    return {"setting": setting, "competitor": loaded, "steps": steps, "seconds": round(seconds, 2),
            "steps_per_s": round(steps / seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--settings", nargs="+", default=["default", "passive", "threads1"], choices=list(SETTINGS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = _teacher(tmp)
        for setting in args.settings:
            for loaded in (False, True):
                print(json.dumps(measure(teacher, args.steps, setting, loaded, tmp)), flush=True)


if __name__ == "__main__":
    main()

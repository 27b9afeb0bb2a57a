"""The memory plan (dmmd/training/memory_plan.py) against the measured peak of a distillation on
the CPU (a script, not a pytest-benchmark module):

    python bench/memory_plan.py [--width 512] [--depth 8] [--vocab 4096] [--length 128] [--batch 8]

In a fresh process per case: the peak resident memory (Linux VmHWM) above what was resident
before the teacher was built, over building the teacher, the distiller (generator, auxiliary
model, EMA), both AdamW optimizers and one generator and one auxiliary step each (backward,
optimizer step, EMA), against the plan for one process (ddp, world 1). Prints one line per case.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(width: int, depth: int, vocab: int, length: int, batch: int, checkpoint: bool = False) -> dict:
    """In this process: ``{"measured": bytes, "plan": bytes}`` for one case (see the docstring)."""
    import torch

    from bench.memory import _status
    from dmmd.diffusion.processes import DiffusionProcess
    from dmmd.models.denoiser import Denoiser, DenoiserConfig
    from dmmd.training import sharding
    from dmmd.training.distill import DistillConfig, Distiller, draw_batch
    from dmmd.training.memory_plan import memory_plan, shape_of

    torch.set_num_threads(1)

    class Uniform:  # random data: the memory does not depend on it
        vocab_size = vocab - 1

        def sample(self, n, generator, split="train"):
            return torch.randint(0, vocab - 1, (n, length), generator=generator)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    torch.manual_seed(0)
    teacher = Denoiser(DenoiserConfig(num_classes=vocab, length=length, width=width, depth=depth,
                                      heads=max(1, width // 64)))
    process = DiffusionProcess("masked", vocab, "linear")
    cfg = DistillConfig.from_dict({"batch_size": batch, "student_steps": 4, "fused_losses": False})
    d = Distiller(teacher, process, cfg)
    if checkpoint:
        sharding.checkpoint_units(d.generator)
        sharding.checkpoint_units(d.aux)
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (d.generator, d.aux)}
    for step in (0, 1):  # a generator step, then an auxiliary one
        batch_ = draw_batch(Uniform(), process, d.cfg, d.noise, step)
        loss, _ = d.generator_loss(batch_, step) if step == 0 else d.aux_loss(batch_, step)
        model = d.generator if step == 0 else d.aux
        opts[model].zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opts[model].step()
        if step == 0:
            with torch.no_grad():
                for pe, pm in zip(d.ema.parameters(), d.generator.parameters(), strict=True):
                    pe.lerp_(pm, 0.01)
        del loss
    measured = _status("VmHWM") - base
    plan = memory_plan(shape_of(teacher), world=1, parallel="ddp", batch_per_rank=batch, length=length,
                       checkpoint_activations=checkpoint, fused=False)
    return {"measured": measured, "plan": plan["total"], "params": shape_of(teacher).params}


def in_subprocess(**case) -> dict:
    code = f"import json, bench.memory_plan as b; print(json.dumps(b.measure(**{case!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, nargs="+", default=[512])
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    for width in args.width:
        for checkpoint in (False, True):
            r = in_subprocess(width=width, depth=args.depth, vocab=args.vocab, length=args.length, batch=args.batch,
                              checkpoint=checkpoint)
            print(f"width {width}, depth {args.depth}, V {args.vocab}, L {args.length}, batch {args.batch}, "
                  f"checkpointing {'on' if checkpoint else 'off'}: {r['params'] / 1e6:.1f} M parameters, plan "
                  f"{r['plan'] / 2 ** 20:.0f} MiB, measured {r['measured'] / 2 ** 20:.0f} MiB "
                  f"(plan / measured {r['plan'] / r['measured']:.2f})", flush=True)


if __name__ == "__main__":
    main()

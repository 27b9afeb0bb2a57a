"""Gradient Moment measurements on the embedded text (a script, not a pytest-benchmark module).

    python bench/gradient_moment.py [--out runs/gm_bench] [--repeats 6]

1. Trains (or resumes) a small GPT-2-configured reference LM on the embedded text.
2. Wall time of ``per_example_gram`` against brute-force per-example gradients
   (``torch.func.grad`` per sequence, flattened, then the Gram) at n = 32, L = 256.
3. Standard error of the two GM estimators for the same number of reference-model backward
   passes (sequences backpropagated): samples are held-out windows with 10% of bytes replaced
   at random, data are held-out windows. Reported: each estimator's own standard error and the
   spread of its values over repeats.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from dmmd.data import make_source
from dmmd.metrics import gradient_moment, per_example_gram
from dmmd.metrics.gram import _model_inputs, _token_losses
from dmmd.models.reference_lm import load_reference
from dmmd.training.reference import ReferenceConfig, train_reference


def brute_force_gram(model, seqs):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, seq):
        kw = _model_inputs(model, seq[None], None)
        out = torch.func.functional_call(model, p, (), kw)
        return _token_losses(out.logits, seq[None], None, 0)[0]

    flat = torch.stack([torch.cat([g.flatten() for g in torch.func.grad(loss)(params, s).values()]) for s in seqs])
    return flat.double() @ flat.double().T


def corrupt(x, frac, gen):
    noise = torch.randint(0, 256, x.shape, generator=gen)
    return torch.where(torch.rand(x.shape, generator=gen) < frac, noise, x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gm_bench")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--ref-steps", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = ReferenceConfig.from_dict(dict(data="text", length=256, n_layer=2, n_embd=128, n_head=4, batch_size=16,
                          steps=args.ref_steps, warmup=40, lr=2e-3, eval_batches=4, save_every=200,
                          out=os.path.join(args.out, "reference")))
    t0 = time.perf_counter()
    result = train_reference(cfg)
    model = load_reference(result["model"])
    report = {"reference": {"val_nll_nats_per_byte": result["val_nll"], "train_seconds": time.perf_counter() - t0,
                            "parameters": sum(p.numel() for p in model.parameters())}}
    source = make_source(cfg.source)
    gen = torch.Generator().manual_seed(0)

    seqs = source.sample(32, gen, split="val")
    t0 = time.perf_counter()
    k = per_example_gram(model, seqs)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    want = brute_force_gram(model, seqs)
    brute = time.perf_counter() - t0
    report["gram_n32_L256"] = {"per_example_gram_s": ours, "torch_func_s": brute, "speedup": brute / ours,
                               "max_rel_diff": float((k - want).abs().max() / want.abs().max())}
    print(json.dumps(report, indent=1), flush=True)

    n_ustat, b_pairs = 32, 8  # both backpropagate 64 sequences per estimate
    values = {"ustat": [], "pairs": []}
    ses = {"ustat": [], "pairs": []}
    backprop = {}
    for _ in range(args.repeats):
        data = source.sample(n_ustat, gen, split="val")
        samples = corrupt(source.sample(n_ustat, gen, split="val"), 0.1, gen)
        for est, bs in (("ustat", 2 * n_ustat), ("pairs", b_pairs)):
            gm = gradient_moment(model, samples, data, estimator=est, batch_size=bs)
            values[est].append(gm.value)
            ses[est].append(gm.stderr)
            backprop[est] = gm.sequences_backpropagated
        print(values, flush=True)
    report["estimators_same_backward_passes"] = {
        est: {"mean": sum(v) / len(v), "mean_reported_stderr": sum(ses[est]) / len(v),
              "spread_over_repeats": float(torch.tensor(v, dtype=torch.float64).std()),
              "sequences_backpropagated": backprop[est]} for est, v in values.items()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    if not math.isfinite(report["gram_n32_L256"]["speedup"]):
        raise SystemExit("timing failed")


if __name__ == "__main__":
    main()

"""Reference-LM training (``dmmd reference train``): a small GPT-2-configured causal LM on one
of our token sources, run by :class:`dmmd.training.loop.RunLoop` and saved as a transformers
directory (``OUT/model``) that :func:`dmmd.models.reference_lm.load_reference` loads, with a
resumable checkpoint beside it. On image data (digits) the same command trains the FID
feature classifier instead.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from dmmd.data import DataConfig, make_source
from dmmd.data.config import is_image_data
from dmmd.data.images import ImageSource
from dmmd.diffusion.randomness import Stream, step_generator, validation_generator
from dmmd.extras import require
from dmmd.models.reference_lm import build_reference, load_reference
from dmmd.options import Options, nested, option
from dmmd.training.checkpoint import make_readable
from dmmd.training.classifier import train_classifier
from dmmd.training.loop import RunConfig, RunLoop, Trained, Update, run_context, warmup_cosine


@dataclass
class ReferenceConfig(Options):
    """A reference LM run: a GPT-2 configuration trained on a token source."""

    source: DataConfig = nested(DataConfig)
    n_layer: int = option(4, "GPT-2 blocks")
    n_embd: int = option(256, "GPT-2 width")
    n_head: int = option(4, "attention heads")
    lr: float = option(1e-3, "peak AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    eval_batches: int = option(8, "validation batches of the final NLL")
    run: RunConfig = nested(RunConfig, batch_size=32, steps=2000, warmup=100, save_every=500,
                            out="runs/reference")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first option out of its domain."""
        for name in ("n_layer", "n_embd", "n_head", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.run.validate()


# The feature classifier learns faster and needs a larger step than the LM: its defaults on image data
# (each kept only where the caller gives none). Held-out accuracy on digits, seeds 0, 1, 2: 96.1%,
# 96.1%, 95.0% with the LM's (batch 32, 2000 steps, lr 1e-3); 100%, 99.4%, 97.8% with these.
CLASSIFIER_DEFAULTS = {"batch_size": 64, "steps": 3000, "lr": 3e-3}


def reference_config(values: dict) -> ReferenceConfig:
    """A :class:`ReferenceConfig` from flat ``values``, with :data:`CLASSIFIER_DEFAULTS` filled in
    where the data is images (the reference is then the FID feature classifier)."""
    cfg = ReferenceConfig.from_dict(values)
    if is_image_data(cfg.source):
        cfg = ReferenceConfig.from_dict({**CLASSIFIER_DEFAULTS, **values})
    return cfg


@torch.no_grad()
def validation_nll(model, source, cfg: ReferenceConfig) -> float:
    """Mean next-token NLL (nats) on ``eval_batches`` fixed validation batches."""
    gen = validation_generator(cfg.run.seed, Stream.REFERENCE)
    device = next(model.parameters()).device
    total = []
    for _ in range(cfg.eval_batches):
        x = source.sample(cfg.run.batch_size, gen, split="val").to(device)
        total.append(float(model(input_ids=x, labels=x).loss))
    return sum(total) / len(total)


def train_reference(cfg: ReferenceConfig, *, resume: bool = True, progress: bool = True,
                    stop_at: int | None = None) -> dict:
    """Train (or resume) a reference LM; the transformers directory is ``OUT/model``. On image
    data the reference is the FID feature classifier instead (:mod:`dmmd.training.classifier`)."""
    cfg.validate()
    run = cfg.run
    source = make_source(cfg.source)
    if isinstance(source, ImageSource):
        return train_classifier(cfg, source, resume=resume, progress=progress, stop_at=stop_at)
    require("transformers", "a reference LM")
    ctx = run_context(run)
    torch.manual_seed(run.seed)
    model = build_reference(source.vocab_size, cfg.source.length, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                            n_head=cfg.n_head).to(ctx.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    trained = {"model": Trained(model, opt, warmup_cosine(cfg.lr, run.warmup, run.steps))}
    loop = RunLoop(run, ctx, trained, name="reference LM", state=lambda done: {"config": cfg.to_dict()},
                   settings=cfg.to_dict(), postfix=lambda record, metrics: {"loss": f"{record['loss']:.3f}"})
    if resume:
        loop.resume()
    net = loop.wrap_parallel()["model"]
    rows = ctx.rows(run.batch_size)

    def step(i: int) -> Update:
        x = source.sample(run.batch_size, step_generator(run.seed, i, Stream.REFERENCE))[rows].to(ctx.device)
        loss = net(input_ids=x, labels=x).loss
        return Update(loss, "model", {"loss": float(loss.detach())})

    result = loop.run(step, progress=progress, stop_at=stop_at)
    model.eval()
    val = validation_nll(model, source, cfg)
    model.save_pretrained(os.path.join(run.out, "model"))
    with open(os.path.join(run.out, "model", "dmmd_reference.json"), "w") as f:
        json.dump({"config": cfg.to_dict(), "val_nll": val}, f, indent=1)
    make_readable(os.path.join(run.out, "model"))
    return {"step": result["step"], "val_nll": val, "model": os.path.join(run.out, "model"),
            "seconds": result["seconds"]}


__all__ = ["CLASSIFIER_DEFAULTS", "ReferenceConfig", "load_reference", "reference_config", "train_reference",
           "validation_nll"]

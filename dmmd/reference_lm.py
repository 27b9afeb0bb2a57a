"""Reference causal LMs for the Gradient Moment and generative perplexity.

Any ``transformers`` causal LM in a local directory loads with :func:`load_reference`
(``local_files_only``: no hub access; a directory holding GPT-2's weights gives the paper's
GPT-2 GM). :func:`train_reference` (``dmmd reference train``) trains a small GPT-2-configured
LM on one of our token sources and saves it as such a directory, with a resumable checkpoint
beside it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from dmmd.checkpoint import load_checkpoint, save_checkpoint
from dmmd.train import ConfigFromDict, TeacherConfig, lr_at, make_source, out_of_time, step_generator


@dataclass
class ReferenceConfig(ConfigFromDict):
    """A reference LM run; the data fields mean what they mean for teachers."""

    data: str = "text"
    vocab_size: int = 0
    bin_dtype: str = "uint16"
    markov_fanout: int = 3
    markov_seed: int = 0
    length: int = 128
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    batch_size: int = 32
    steps: int = 2000
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_batches: int = 8
    save_every: int = 500
    seed: int = 0
    out: str = "runs/reference"
    device: str = "cpu"
    time_limit_min: float = 0.0

    def source(self):
        return make_source(TeacherConfig(data=self.data, vocab_size=self.vocab_size, bin_dtype=self.bin_dtype,
                                         markov_fanout=self.markov_fanout, markov_seed=self.markov_seed,
                                         length=self.length))


def load_reference(path: str, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """A causal LM from a local transformers directory, in eval mode."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise ValueError(f"reference must be a local transformers directory, got {path!r}")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def _build(cfg: ReferenceConfig, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=cfg.length, n_layer=cfg.n_layer,
                                      n_embd=cfg.n_embd, n_head=cfg.n_head, bos_token_id=0, eos_token_id=0))


@torch.no_grad()
def validation_nll(model, source, cfg: ReferenceConfig) -> float:
    """Mean next-token NLL (nats) on ``eval_batches`` fixed validation batches."""
    gen = torch.Generator().manual_seed(cfg.seed + 999)
    device = next(model.parameters()).device
    total = []
    for _ in range(cfg.eval_batches):
        x = source.sample(cfg.batch_size, gen, split="val").to(device)
        total.append(float(model(input_ids=x, labels=x).loss))
    return sum(total) / len(total)


def train_reference(cfg: ReferenceConfig, *, resume: bool = True, progress: bool = True,
                    stop_at: int | None = None) -> dict:
    """Train (or resume) a reference LM; the transformers directory is ``cfg.out/model``."""
    source = cfg.source()
    device = torch.device(cfg.device)
    model = _build(cfg, source.vocab_size).to(device).train()
    model.config.loss_type = "ForCausalLM"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    ckpt = os.path.join(cfg.out, "checkpoint")
    start = 0
    if resume and os.path.exists(ckpt):
        start = int(load_checkpoint(ckpt, models={"model": model}, optimizers={"opt": opt})["step"])
    os.makedirs(cfg.out, exist_ok=True)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="reference LM", disable=not progress)
    t0, step = time.perf_counter(), start
    for step in bar:
        x = source.sample(cfg.batch_size, step_generator(cfg.seed, step, purpose=2)).to(device)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)  # the teachers' warm-up + cosine schedule
        opt.step()
        done = step + 1
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        stop = out_of_time(cfg.time_limit_min, t0, done, stop_at)
        if done % cfg.save_every == 0 or done == cfg.steps or stop:
            save_checkpoint(ckpt, models={"model": model}, optimizers={"opt": opt},
                            state={"step": done, "config": asdict(cfg)})
        if stop:
            break
    model.eval()
    val = validation_nll(model, source, cfg)
    model.save_pretrained(os.path.join(cfg.out, "model"))
    with open(os.path.join(cfg.out, "model", "dmmd_reference.json"), "w") as f:
        json.dump({"config": asdict(cfg), "val_nll": val}, f, indent=1)
    return {"step": step + 1 if cfg.steps > start else start, "val_nll": val,
            "model": os.path.join(cfg.out, "model")}

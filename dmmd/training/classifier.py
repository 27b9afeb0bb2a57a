"""The FID feature classifier's training (``dmmd reference train`` on labelled image data):
:class:`~dmmd.models.image_classifier.ImageClassifier` by cross-entropy on the training split,
each image shifted by up to one pixel at random (the classifier should not care where a digit
sits), run by :class:`dmmd.training.loop.RunLoop` (resumable) and saved as ``OUT/model`` with
its held-out accuracy.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dmmd.data.images import ImageSource
from dmmd.diffusion.randomness import Stream, step_generator
from dmmd.models.image_classifier import ImageClassifier, save_classifier
from dmmd.training.checkpoint import make_readable
from dmmd.training.loop import RunLoop, Trained, Update, run_context, warmup_cosine


def shift_images(tokens: torch.Tensor, shape: tuple[int, int, int], gen: torch.Generator) -> torch.Tensor:
    """Each image of ``tokens [N, H*W*C]`` moved by -1, 0 or +1 pixel in each direction (the
    background, token 0, fills the edge left behind)."""
    n = tokens.shape[0]
    h, w, c = shape
    img = tokens.reshape(n, h, w, c)
    padded = F.pad(img.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)  # [N, H+2, W+2, C]
    dy, dx = (torch.randint(0, 3, (n,), generator=gen) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w)
    out = padded[torch.arange(n)[:, None, None], rows, cols]
    return out.reshape(n, -1)


@torch.no_grad()
def accuracy(model: ImageClassifier, source: ImageSource, split: str = "val") -> float:
    """Share of ``split``'s images whose most likely class is their label."""
    pred = model(source.split(split)).argmax(-1).cpu()
    return float((pred == source.labels[split]).double().mean())


def train_classifier(cfg, source: ImageSource, *, resume: bool = True, progress: bool = True,
                     stop_at: int | None = None) -> dict:
    """Train (or resume) the feature classifier described by ``cfg`` (a ``ReferenceConfig``:
    its run options and ``lr`` / ``weight_decay``) on ``source``; writes ``OUT/model``."""
    if source.labels is None:
        raise ValueError(f"{cfg.source.data}: training the FID classifier needs labelled images (--data digits); "
                         "for other images pass your own feature extractor to dmmd.metrics.fid")
    run = cfg.run
    ctx = run_context(run)
    torch.manual_seed(run.seed)
    classes = int(source.labels["train"].max()) + 1
    model = ImageClassifier(source.length, source.vocab_size, classes).to(ctx.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    trained = {"model": Trained(model, opt, warmup_cosine(cfg.lr, run.warmup, run.steps))}
    loop = RunLoop(run, ctx, trained, name="FID classifier", state=lambda done: {"config": cfg.to_dict()},
                   settings=cfg.to_dict(), postfix=lambda record, metrics: {"loss": f"{record['loss']:.3f}"})
    if resume:
        loop.resume()
    net = loop.wrap_parallel()["model"]
    rows = ctx.rows(run.batch_size)
    pool, labels = source.split("train"), source.labels["train"]

    def step(i: int) -> Update:
        gen = step_generator(run.seed, i, Stream.REFERENCE)
        idx = torch.randint(0, len(pool), (run.batch_size,), generator=gen)[rows]
        x = shift_images(pool[idx], source.shape, gen).to(ctx.device)
        loss = F.cross_entropy(net(x), labels[idx].to(ctx.device))
        return Update(loss, "model", {"loss": float(loss.detach())})

    result = loop.run(step, progress=progress, stop_at=stop_at)
    model.eval()
    val = accuracy(model, source)
    out = os.path.join(run.out, "model")
    save_classifier(model.cpu(), out, {"val_accuracy": val, "val_images": len(source.split("val")),
                                       "config": cfg.to_dict()})
    make_readable(out)
    return {"step": result["step"], "val_accuracy": val, "model": out, "seconds": result["seconds"]}

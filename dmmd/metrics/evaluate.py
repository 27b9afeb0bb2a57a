"""Evaluate sample sets against held-out data of their source (``dmmd evaluate``): the
Gradient Moment with its standard error, generative perplexity and unigram entropy under a
reference causal LM, and for the exact Markov source its exact NLL (and TV when it is small).
Image samples get FID instead (:func:`evaluate_image_samples`: features of the data's own
classifier, one PNG grid per sample set and the FID-by-steps plot)."""
from __future__ import annotations

import math
import os

import torch

from dmmd.data import MarkovSource
from dmmd.metrics import exact_nll, generative_perplexity, gradient_moment, total_variation, unigram_entropy
from dmmd.models.reference_lm import load_reference


def evaluate_samples(named: dict[str, torch.Tensor], source, reference: str, *, num_data: int = 256,
                     estimator: str = "ustat", batch_size: int = 32, prompt_length: int = 0, seed: int = 0
                     ) -> list[dict]:
    """One row per sample set (name -> int64 ``[N, T]``), plus a ``data`` row for held-out data
    against a second held-out draw (its GM should be about zero)."""
    model = load_reference(reference)
    gen = torch.Generator().manual_seed(seed)
    data = source.sample(num_data, gen, split="val")
    sets = {"data (held out)": source.sample(num_data, gen, split="val"), **named}
    return [evaluate_set(model, name, x, data, source, estimator=estimator, batch_size=batch_size,
                         prompt_length=prompt_length) for name, x in sets.items()]


def evaluate_set(model, name: str, x: torch.Tensor, data: torch.Tensor, source=None, *, estimator: str = "ustat",
                 batch_size: int = 32, prompt_length: int = 0) -> dict:
    """One row: GM of samples ``x`` against held-out ``data`` under the reference ``model``,
    generative perplexity and unigram entropy (and exact NLL / TV for the Markov source)."""
    if x.dim() != 2 or x.shape[1] != data.shape[1]:
        raise ValueError(f"samples {name!r} must be [N, {data.shape[1]}], got {tuple(x.shape)}")
    x = x.to(data.device)
    gm = gradient_moment(model, x, data, estimator=estimator, batch_size=batch_size, prompt_length=prompt_length)
    row = {"name": name, "n": x.shape[0], "gm": gm.value, "gm_stderr": gm.stderr, "estimator": estimator,
           "gen_ppl": generative_perplexity(model, x, batch_size=batch_size, prompt_length=prompt_length),
           "entropy": unigram_entropy(x)}
    if isinstance(source, MarkovSource):
        row["exact_nll"] = exact_nll(x.cpu(), source).value
        if source.vocab_size ** source.length <= 2_000_000:
            row["tv"] = total_variation(x.cpu(), source).value
    return row


def markdown_table(rows: list[dict]) -> str:
    extra = [k for k in ("exact_nll", "tv") if any(k in r for r in rows)]
    head = "| samples | N | GM (± s.e.) | gen. perplexity | unigram entropy |" + "".join(f" {k} |" for k in extra)
    lines = [head, "|---" * (5 + len(extra)) + "|"]
    for r in rows:
        cells = [r["name"], str(r["n"]), f"{r['gm']:.4g} ± {r['gm_stderr']:.2g}", f"{r['gen_ppl']:.2f}",
                 f"{r['entropy']:.2f}"]
        cells += [f"{r[k]:.4f}" if k in r and math.isfinite(r[k]) else str(r.get(k, "")) for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class ImageFID:
    """FID of token images against every training image of ``source``, under the feature
    classifier saved in directory ``classifier``; the training images' features are computed once."""

    def __init__(self, classifier: str, source):
        from dmmd.metrics.fid import extract
        from dmmd.models.image_classifier import load_classifier

        self.model = load_classifier(classifier)
        if self.model.length != source.length or self.model.levels != source.vocab_size:
            raise ValueError(f"classifier {classifier!r} was trained on images of {self.model.length} tokens and "
                             f"{self.model.levels} levels; the data has {source.length} and {source.vocab_size}")
        self.source = source
        self.data = extract(source.split("train"), self.model.features, 500)

    def __call__(self, x: torch.Tensor, name: str = "samples", seed: int = 0):
        """The :class:`~dmmd.metrics.exact.Distance` of images ``x`` (tokens ``[N, L]``)."""
        from dmmd.metrics.fid import extract, fid

        if x.dim() != 2 or x.shape[1] != self.source.length:
            raise ValueError(f"samples {name!r} must be [N, {self.source.length}], got {tuple(x.shape)}")
        if int(x.min()) < 0 or int(x.max()) >= self.source.vocab_size:
            raise ValueError(f"samples {name!r} hold ids outside [0, {self.source.vocab_size}) (a mask left over?)")
        return fid(extract(x, self.model.features, 500), self.data, seed=seed)


def evaluate_image_samples(named: dict[str, torch.Tensor], source, classifier: str, *, steps: dict[str, int],
                           out_dir: str | None = None, seed: int = 0) -> list[dict]:
    """One FID row per image sample set (name -> tokens ``[N, L]``) against every training image
    of ``source`` under the feature classifier in directory ``classifier`` (:class:`ImageFID`),
    plus a ``data (held out)`` row (the held-out split: the FID's small-sample floor). With
    ``out_dir``: one PNG grid per set (``out_dir/<name>.png``) and ``out_dir/fid_by_steps.png``
    (``steps``: name -> the sampler's step count, where known)."""
    from dmmd.data.images import save_grid

    score = ImageFID(classifier, source)
    rows = []
    for name, x in {"data (held out)": source.split("val"), **named}.items():
        d = score(x, name, seed)
        rows.append({"name": name, "n": x.shape[0], "steps": steps.get(name), "fid": d.value, "fid_stderr": d.stderr})
        if out_dir:
            save_grid(source.to_images(x[:64]), os.path.join(out_dir, _file_name(name) + ".png"))
    if out_dir:
        plot_fid_by_steps([r for r in rows if r["steps"]], os.path.join(out_dir, "fid_by_steps.png"))
    return rows


def _file_name(name: str) -> str:
    base = os.path.splitext(os.path.basename(name))[0]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)


def plot_fid_by_steps(rows: list[dict], path: str) -> None:
    """FID (with its standard error) against the sampler's steps, one point per sample set."""
    from dmmd.extras import require

    if not rows:
        return
    matplotlib = require("matplotlib", "the FID-by-steps plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.errorbar([r["steps"]], [r["fid"]], [r["fid_stderr"]], marker="o", label=_file_name(r["name"]))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def image_markdown_table(rows: list[dict]) -> str:
    lines = ["| samples | N | steps | FID (± bootstrap s.e.) |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['n']} | {r['steps'] or ''} | {r['fid']:.2f} ± {r['fid_stderr']:.2f} |"
              for r in rows]
    return "\n".join(lines)

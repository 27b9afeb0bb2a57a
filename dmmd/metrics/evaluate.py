"""Evaluate sample sets against held-out data of their source (``dmmd evaluate``): the
Gradient Moment with its standard error, generative perplexity and unigram entropy under a
reference causal LM, and for the exact Markov source its exact NLL (and TV when it is small)."""
from __future__ import annotations

import math

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

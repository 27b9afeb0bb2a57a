"""The memory a distillation needs per rank, before it starts: a formula, printed by
``dmmd distill --dry-run`` and checked against ``--max-memory-per-rank``.

D-MMD holds three models of the teacher's size: the teacher (frozen), the generator and the
auxiliary model (both trained with AdamW), and the generator's EMA. With N teacher parameters,
in float32, per rank (``s = 1 / world`` under FSDP, 1 under DDP, which copies everything):

- teacher ``4 N s``; generator and auxiliary model, weights and gradients, ``8 N s`` each;
  their AdamW moments ``16 N s`` together; the EMA ``4 N s``: 40 bytes per parameter in all;
- under FSDP, the units being gathered: two of the largest unit's weights (the one computing,
  the next one prefetched), ``2 x 4 N / layers``;
- activations of the model being trained (one of generator and auxiliary model at a time), per
  layer and token about ``17 d + 2.5 heads L`` values (Korthikanti et al., 2022: the attention
  block's and the MLP's saved inputs, and the attention scores), with activation checkpointing
  only each layer's input (``d``) plus one layer in full;
- the logits of a step: about four ``[tokens, V]`` float32 arrays (generator with its
  gradient, teacher, auxiliary model), or, with the fused linear losses, two 256 MiB chunks.

Activations are 4-byte values on the CPU and 2-byte (bf16 autocast) on CUDA. It is an estimate
(allocator slack, the framework's own buffers and temporaries are not in it);
``bench/memory_plan.py`` measures a small model against it.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30
FUSED_CHUNK_BYTES = 256 * 2 ** 20


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: parameters, width, layers, heads, classes."""

    params: int
    width: int
    layers: int
    heads: int
    classes: int


# published teachers' shapes for the README's table (LLaMA-like; V of their tokenizers)
REFERENCE_SHAPES = {
    "1B": ModelShape(params=1_240_000_000, width=2048, layers=16, heads=32, classes=128_256),
    "8B": ModelShape(params=8_020_000_000, width=4096, layers=32, heads=32, classes=126_464),
    "70B": ModelShape(params=70_600_000_000, width=8192, layers=80, heads=64, classes=128_256),
}

_WIDTH = ("hidden_size", "d_model", "hidden_dim", "n_embd", "dim")
_LAYERS = ("num_hidden_layers", "n_layers", "n_layer", "n_blocks", "num_layers")
_HEADS = ("num_attention_heads", "n_heads", "n_head", "num_heads")


def shape_of(model) -> ModelShape:
    """The :class:`ModelShape` of dmmd's denoiser or a wrapped model (its transformers config's
    width, layers and heads under their usual names; ``ValueError`` naming what is missing)."""
    params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    if hasattr(cfg, "width") and hasattr(cfg, "depth"):  # dmmd's own
        return ModelShape(params, cfg.width, cfg.depth, cfg.heads, cfg.num_classes)
    inner = getattr(getattr(model, "model", None), "config", None)

    def first(names):
        return next((getattr(inner, n) for n in names if isinstance(getattr(inner, n, None), int)), None)

    width, layers, heads = first(_WIDTH), first(_LAYERS), first(_HEADS)
    if None in (width, layers, heads):
        raise ValueError("the memory plan needs the model's width, layers and heads; its config names none of "
                         f"{_WIDTH}, {_LAYERS} or {_HEADS}")
    return ModelShape(params, width, layers, heads, cfg.num_classes)


def memory_plan(shape: ModelShape, *, world: int, parallel: str, batch_per_rank: int, length: int,
                checkpoint_activations: bool = False, fused: bool = False, cuda: bool = False) -> dict[str, float]:
    """Bytes per rank by part (see the module docstring), with ``total``."""
    n, s = shape.params, (1.0 / world if parallel == "fsdp" else 1.0)
    act = 2 if cuda else 4
    tokens = batch_per_rank * length
    per_layer_token = 17 * shape.width + 2.5 * shape.heads * length
    if checkpoint_activations:
        activations = (shape.layers * shape.width + per_layer_token) * tokens * act
    else:
        activations = shape.layers * per_layer_token * tokens * act
    plan = {
        "teacher": 4 * n * s,
        "generator": 8 * n * s,
        "auxiliary": 8 * n * s,
        "optimizers": 16 * n * s,
        "ema": 4 * n * s,
        "gathered units": 2 * 4 * n / shape.layers if parallel == "fsdp" and world > 1 else 0.0,
        "activations": activations,
        "logits": 2 * FUSED_CHUNK_BYTES if fused else 4 * tokens * shape.classes * 4,
    }
    plan["total"] = sum(plan.values())
    return plan


def size(nbytes: float) -> str:
    """``nbytes`` in GiB, or MiB below one GiB."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2 ** 20:.1f} MiB"


def parts(plan: dict[str, float]) -> str:
    """The plan's parts, one after another."""
    return ", ".join(f"{k} {size(v)}" for k, v in plan.items() if k != "total")


def describe(plan: dict[str, float], *, title: str) -> str:
    """The plan on one line: the total and the parts, per rank."""
    return f"{title}: {size(plan['total'])} per rank ({parts(plan)})"

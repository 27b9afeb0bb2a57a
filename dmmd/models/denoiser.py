"""The bidirectional transformer denoiser shared by teacher, generator and auxiliary model.

``Denoiser(z_t [B, L], t [B], noise=None) -> logits [B, L, V]`` (float32). Built on
``torch.nn.functional.scaled_dot_product_attention``; time enters every block through
adaptive LayerNorm (shift, scale and gate from an embedding of ``t``, DiT-style).

- Masked diffusion: the mask class is never predicted (its logit is ``-inf``) and an
  unmasked input position outputs its own token (carry-over: one finite logit).
- ``noise_dim > 0``: a Gaussian noise input ``[B, L, noise_dim]`` projected into the residual
  stream at the embeddings (and, with ``noise_into="blocks"``, again before every block; with
  ``"conditioning"`` also, averaged over the tokens, into the time conditioning that sets every
  block's adaptive-LayerNorm shift, scale and gate), for D-MMD generators; the projections
  start at zero, so a generator initialised from a teacher starts as the teacher.
- ``image_shape``: pixel tokens ``(H, W, C)`` in raster order, channels last, get 2-D
  positions (row, column and channel embeddings summed) instead of one per index.
- ``block_size``: block-causal attention for block-autoregressive diffusion (paper section
  6.3): a position attends to its own block and the blocks before it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dmmd.diffusion.processes import masked_output_rule
from dmmd.models.noise import NoiseSpec, check_noise, check_noise_options, init_projections


@dataclass
class DenoiserConfig:
    """Architecture and process of a denoiser (saved beside its weights as JSON)."""

    num_classes: int            # V, every output class (masked: includes the mask)
    length: int                 # L, tokens per sequence
    process: str = "masked"     # "masked" or "uniform"
    mask_id: int | None = None  # masked: default V - 1
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    noise_dim: int = 0          # > 0: Gaussian noise input (D-MMD generators)
    noise_per: str = "token"    # noise per "token", per "sequence" (shared by its tokens) or a 2-D "pyramid"
    noise_into: str = "embedding"  # the noise enters at the "embedding", before every "block", or also the adaLN
                                   # "conditioning"
    block_size: int | None = None  # block-causal attention
    image_shape: tuple[int, int, int] | None = None  # (H, W, C): 2-D positions for pixel tokens

    def __post_init__(self):
        if self.process not in ("masked", "uniform"):
            raise ValueError(f"process must be 'masked' or 'uniform', got {self.process!r}")
        if self.process == "masked" and self.mask_id is None:
            self.mask_id = self.num_classes - 1
        check_noise_options(self.noise_per, self.noise_into)
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.image_shape is not None:
            self.image_shape = tuple(int(d) for d in self.image_shape)  # JSON gives a list
            if len(self.image_shape) != 3 or math.prod(self.image_shape) != self.length:
                raise ValueError(f"image_shape {self.image_shape} must be (H, W, C) with H * W * C = length "
                                 f"{self.length}")
        if self.block_size is not None and not 0 < self.block_size <= self.length:
            raise ValueError(f"block_size must be in [1, length], got {self.block_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of ``t`` in [0, 1] (scaled by 1000). ``[B]`` -> ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def block_causal_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """Bool ``[L, L]``: True where query ``i`` may attend key ``j`` (``block(j) <= block(i)``)."""
    block = torch.arange(length, device=device) // block_size
    return block.unsqueeze(0) <= block.unsqueeze(1)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))
        self.ada = nn.Linear(width, 6 * width)  # shift, scale, gate for attention and MLP
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, w = h.shape
        s1, k1, g1, s2, k2, g2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        x = self.norm1(h) * (1 + k1) + s1
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        h = h + (1 + g1) * self.proj(a.transpose(1, 2).reshape(b, n, w))
        x = self.norm2(h) * (1 + k2) + s2
        return h + (1 + g2) * self.mlp(x)


class Denoiser(nn.Module):
    """``x_hat(z_t)`` as logits; see the module docstring."""

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.num_classes, cfg.width)
        if cfg.image_shape is None:
            self.pos = nn.Parameter(torch.randn(cfg.length, cfg.width) * 0.02)
        else:  # a token's position is its row's, its column's and its channel's embedding summed
            h, w, c = cfg.image_shape
            self.pos_row = nn.Parameter(torch.randn(h, cfg.width) * 0.02)
            self.pos_col = nn.Parameter(torch.randn(w, cfg.width) * 0.02)
            self.pos_channel = nn.Parameter(torch.randn(c, cfg.width) * 0.02)
        self.time = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))
        noisy = cfg.noise_dim > 0
        self.noise_proj = nn.Linear(cfg.noise_dim, cfg.width, bias=False) if noisy else None
        # "blocks": one more projection of the same noise into the residual before each block
        self.block_noise = (nn.ModuleList(nn.Linear(cfg.noise_dim, cfg.width, bias=False) for _ in range(cfg.depth))
                            if noisy and cfg.noise_into in ("blocks", "conditioning") else None)
        # "conditioning": the tokens' mean noise (per-sequence noise: the sequence's vector) into the
        # time conditioning, so it modulates every block multiplicatively (adaLN scale and gate)
        self.cond_noise = (nn.Linear(cfg.noise_dim, cfg.width, bias=False)
                           if noisy and cfg.noise_into == "conditioning" else None)
        init_projections(self.noise_projections(), 0.0, None)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.width, elementwise_affine=False)
        self.ada_out = nn.Linear(cfg.width, 2 * cfg.width)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        self.head = nn.Linear(cfg.width, cfg.num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if cfg.block_size is not None:
            self.register_buffer("attn_mask", block_causal_mask(cfg.length, cfg.block_size), persistent=False)
        else:
            self.attn_mask = None

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, *,
                features: bool = False) -> torch.Tensor:
        """``z_t [B, L]`` int64, ``t [B]`` in [0, 1], optional ``noise [B, L, noise_dim]``
        -> float32 logits ``[B, L, V]`` (float64 for a float64 model); with ``features`` the
        final hidden states ``[B, L, width]`` that :meth:`output_head` maps to the logits
        (for the fused linear losses)."""
        cfg = self.config
        b, n = z_t.shape
        if n > cfg.length:
            raise ValueError(f"z_t has {n} tokens; this model was built for at most {cfg.length}")
        check_noise(self.noise_spec, noise, z_t)
        h = self.embed(z_t) + self.positions()[:n]
        noise = None if noise is None else noise.to(h.dtype)
        if noise is not None:
            h = h + self.noise_proj(noise)
        c = self.time(timestep_embedding(t.reshape(b), cfg.width).to(h.dtype))
        if noise is not None and self.cond_noise is not None:
            c = c + self.cond_noise(noise.mean(1))
        mask = None if self.attn_mask is None else self.attn_mask[:n, :n]
        for i, block in enumerate(self.blocks):
            if noise is not None and self.block_noise is not None:
                h = h + self.block_noise[i](noise)
            h = block(h, c, mask)
        shift, scale = self.ada_out(c).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm_out(h) * (1 + scale) + shift
        if features:
            return h
        logits = self.head(h)
        if logits.dtype != torch.float64:  # float64 models (test oracles) stay float64
            logits = logits.float()
        if cfg.process == "masked":
            logits = masked_output_rule(logits, z_t, cfg.mask_id)
        return logits

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [V, width], bias [V])`` with ``logits = features @ weight.T + bias`` where
        the model has a choice (masked diffusion: a masked position; the mask class's bias is
        ``-inf``, as its logit)."""
        bias = self.head.bias
        if self.config.process == "masked":
            never = torch.zeros_like(bias, dtype=torch.bool)
            never[self.config.mask_id] = True
            bias = bias.masked_fill(never, float("-inf"))
        return self.head.weight, bias

    def positions(self) -> torch.Tensor:
        """``[L, width]`` position embeddings (raster order, channels last for images)."""
        if self.config.image_shape is None:
            return self.pos
        h, w, c = self.config.image_shape
        grid = self.pos_row[:, None, None] + self.pos_col[None, :, None] + self.pos_channel[None, None, :]
        return grid.reshape(h * w * c, -1)

    @property
    def noise_spec(self) -> NoiseSpec | None:
        """The noise input (None without one)."""
        cfg = self.config
        return NoiseSpec(cfg.noise_dim, cfg.noise_per, cfg.noise_into) if cfg.noise_dim > 0 else None

    def draw_noise(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """A batch of this model's noise ``[batch, length, noise_dim]`` (:meth:`NoiseSpec.draw`)."""
        if self.noise_spec is None:
            raise ValueError("this model has no noise input (noise_dim 0)")
        return self.noise_spec.draw(batch, length, generator, self.config.image_shape)

    def noise_projections(self) -> list[nn.Linear]:
        """Every linear map of the noise input (empty without one)."""
        if self.noise_proj is None:
            return []
        return [self.noise_proj, *(self.block_noise or []), *([self.cond_noise] if self.cond_noise is not None else [])]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

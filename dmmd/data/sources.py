"""Token sources, none downloaded. Each gives fixed-length windows ``[B, L]`` (int64) from an
explicit ``torch.Generator``, so a training step's batch depends only on its seed.

- :class:`ByteText`: the English documentation text every CPython ships
  (``pydoc_data.topics``), as UTF-8 bytes (V = 256), split into train / validation.
- :class:`TokenFile`: nanoGPT-style ``.bin`` files of ``uint16`` / ``uint32`` ids (memory-mapped).
- :class:`MarkovSource`: a random sparse Markov chain whose distribution is known exactly:
  ``log_prob`` of any sequence, and for small ``V ** L`` the full distribution; up to 64
  tokens render as English words (:meth:`MarkovSource.to_words`). Optionally its ends are
  tied (the last token equals the first): a constraint between the two most distant tokens.
- :class:`ParitySource`: uniform tokens whose sum is 0 modulo ``V``: every token alone is
  uniform, and only all the others together decide any one of them.
- :class:`TokenGrids`: small 2-D images as tokens (coloured rectangles and lines on a
  background), flattened row-major.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch


class WindowSource:
    """Random windows of ``length`` tokens from a 1-D token array (train or validation part)."""

    def __init__(self, tokens: np.ndarray, vocab_size: int, length: int, *, val_fraction: float = 0.1):
        if len(tokens) < 2 * (length + 1):
            raise ValueError(f"need at least {2 * (length + 1)} tokens for windows of {length}, got {len(tokens)}")
        self.tokens, self.vocab_size, self.length = tokens, vocab_size, length
        self.split = int(len(tokens) * (1 - val_fraction))

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """``[batch, length]`` int64 windows starting at uniform random offsets of the split."""
        lo, hi = (0, self.split) if split == "train" else (self.split, len(self.tokens))
        starts = torch.randint(lo, hi - self.length, (batch,), generator=generator).numpy()
        rows = np.stack([np.asarray(self.tokens[s:s + self.length], dtype=np.int64) for s in starts])
        return torch.from_numpy(rows)


class ByteText(WindowSource):
    """The standard library's documentation topics (about 0.8 MB of English) as bytes, V = 256."""

    def __init__(self, length: int, *, val_fraction: float = 0.1):
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
        super().__init__(np.frombuffer(text.encode("utf-8"), dtype=np.uint8), 256, length,
                         val_fraction=val_fraction)

    @staticmethod
    def decode(tokens: torch.Tensor) -> str:
        """Byte ids ``[L]`` -> text (invalid UTF-8 replaced, mask / out-of-range ids shown as '_')."""
        ids = [int(i) for i in tokens.reshape(-1)]
        return bytes(i if 0 <= i < 256 else ord("_") for i in ids).decode("utf-8", errors="replace")


class TokenFile(WindowSource):
    """A nanoGPT-style token file: a flat ``uint16`` (or ``uint32``) array, memory-mapped."""

    def __init__(self, path: str, vocab_size: int, length: int, *, dtype: str = "uint16",
                 val_fraction: float = 0.1):
        if dtype not in ("uint16", "uint32"):
            raise ValueError(f"dtype must be uint16 or uint32, got {dtype!r}")
        if not os.path.isfile(path):
            raise ValueError(f"token file {path}: not a file")
        size, item = os.path.getsize(path), np.dtype(dtype).itemsize
        if size % item:
            raise ValueError(f"token file {path}: {size} bytes is not a whole number of {dtype} ids "
                             f"(truncated, or another dtype)")
        if size < 2 * (length + 1) * item:
            raise ValueError(f"token file {path}: {size // item} ids, too few for windows of {length}")
        self.path = path
        tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        super().__init__(tokens, vocab_size, length, val_fraction=val_fraction)

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """As :meth:`WindowSource.sample`; an id outside the vocabulary raises naming the file."""
        x = super().sample(batch, generator, split)
        if x.numel() and int(x.max()) >= self.vocab_size:
            raise ValueError(f"token file {self.path}: id {int(x.max())} >= vocab_size {self.vocab_size} "
                             f"(corrupt file, or the wrong vocab_size / dtype)")
        return x


# What MarkovSource tokens look like as text: 64 short words, so that a sample reads like a
# sentence at a glance (the chain's transitions, not grammar, decide which word follows which).
WORDS = ("the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "and", "then", "saw", "big",
         "small", "red", "blue", "bird", "sang", "in", "house", "old", "man", "woman", "ate", "bread", "fish",
         "slept", "by", "river", "green", "hill", "child", "played", "with", "ball", "boat", "sailed", "to",
         "sea", "sun", "rose", "over", "town", "rain", "fell", "at", "night", "wind", "blew", "through", "door",
         "she", "he", "walked", "home", "it", "was", "cold", "warm", "day", "long", "road", "far")


@dataclass
class MarkovSource:
    """A stationary-start Markov chain over ``vocab_size`` tokens with ``fanout`` successors per
    state (Dirichlet(``concentration``) weights: below 1 most of a state's mass goes to one
    successor): strongly correlated across positions, with exact probabilities. Built
    deterministically from ``seed``; ``self_loops=False`` draws each state's successors from the
    other states (no token follows itself: no "a a a a" runs); ``tie_ends=True`` keeps only the
    sequences whose last token equals the first (the chain conditioned on it), a long-range
    constraint that no step-by-step left-to-right rule sees until the end."""

    vocab_size: int
    length: int
    fanout: int = 3
    concentration: float = 0.5
    seed: int = 0
    self_loops: bool = True
    tie_ends: bool = False

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        v = self.vocab_size
        if not self.self_loops and v < 2:
            raise ValueError("a Markov source without self-loops needs vocab_size >= 2")
        if not self.concentration > 0:
            raise ValueError(f"concentration must be > 0, got {self.concentration}")
        if self.fanout < 1:
            raise ValueError(f"fanout must be >= 1, got {self.fanout}")
        trans = np.zeros((v, v))
        for i in range(v):
            if self.self_loops:
                succ = rng.choice(v, size=min(self.fanout, v), replace=False)
            else:
                others = np.delete(np.arange(v), i)
                succ = rng.choice(others, size=min(self.fanout, v - 1), replace=False)
            trans[i, succ] = rng.dirichlet(np.full(len(succ), self.concentration))
        self.transition = torch.from_numpy(trans)
        self.initial = torch.from_numpy(rng.dirichlet(np.full(v, 1.0)))
        if self.tie_ends:
            if self.length < 2:
                raise ValueError(f"tie_ends needs length >= 2, got {self.length}")
            # reach[m][a, b] = P(x_{i+m} = b | x_i = a): the chain's m-step transitions
            reach = [torch.eye(v, dtype=torch.float64)]
            for _ in range(self.length - 1):
                reach.append(reach[-1] @ self.transition)
            self._reach = reach
            back = torch.diagonal(reach[-1])  # P(x_{L-1} = x_0 | x_0 = a)
            self._log_z = math.log(float((self.initial * back).sum()))
            if not math.isfinite(self._log_z):
                raise ValueError("tie_ends: no sequence of this chain ends where it starts")
            self._first = self.initial * back / (self.initial * back).sum()

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """``[batch, length]`` exact draws (the split is ignored: the source is infinite)."""
        x = torch.empty(batch, self.length, dtype=torch.long)
        first = self._first if self.tie_ends else self.initial
        x[:, 0] = torch.multinomial(first, batch, replacement=True, generator=generator)
        for i in range(1, self.length):
            w = self.transition[x[:, i - 1]]
            if self.tie_ends:  # times the chance of still ending at the first token from here
                w = w * self._reach[self.length - 1 - i][:, x[:, 0]].T
            x[:, i] = torch.multinomial(w, 1, generator=generator).squeeze(-1)
        return x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x)`` (natural log) of sequences ``[..., L]`` -> ``[...]`` float64
        (``-inf`` for impossible sequences, e.g. ones containing a mask id)."""
        x = x.long()
        ok = ((x >= 0) & (x < self.vocab_size)).all(-1)
        xc = x.clamp(0, self.vocab_size - 1)
        lp = torch.log(self.initial[xc[..., 0]])
        lp = lp + torch.log(self.transition[xc[..., :-1], xc[..., 1:]]).sum(-1)
        if self.tie_ends:
            ok = ok & (xc[..., -1] == xc[..., 0])
            lp = lp - self._log_z
        return torch.where(ok, lp, torch.full_like(lp, -math.inf))

    def to_words(self, x: torch.Tensor) -> list[str]:
        """Sequences ``[N, L]`` as lines of words (:data:`WORDS`; a token outside the vocabulary,
        e.g. a mask id, as ``_``); ``vocab_size`` must be at most 64."""
        if self.vocab_size > len(WORDS):
            raise ValueError(f"to_words renders at most {len(WORDS)} tokens, the source has {self.vocab_size}")
        return [" ".join(WORDS[i] if 0 <= i < self.vocab_size else "_" for i in row.tolist())
                for row in x.reshape(-1, x.shape[-1])]

    def all_sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence and its probability, for ``V ** L <= 2e6``: ``([N, L], [N])``."""
        return _all_sequences(self)

    @property
    def entropy_bits_per_token(self) -> float:
        """Exact entropy rate of the data distribution in bits per token (from the enumeration
        when small, else a Monte Carlo estimate over 20000 sequences)."""
        return _entropy_bits_per_token(self)


def _all_sequences(source) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence of ``source`` (``vocab_size``, ``length``, ``log_prob``) and its
    probability, for ``V ** L <= 2e6``."""
    n = source.vocab_size ** source.length
    if n > 2_000_000:
        raise ValueError(f"V^L = {n} is too many sequences to enumerate")
    seqs = torch.tensor(list(itertools.product(range(source.vocab_size), repeat=source.length)), dtype=torch.long)
    return seqs, source.log_prob(seqs).exp()


def _entropy_bits_per_token(source) -> float:
    try:
        _, p = source.all_sequences()
        p = p[p > 0]
        h = float(-(p * p.log()).sum())
    except ValueError:
        x = source.sample(20000, torch.Generator().manual_seed(source.seed + 1))
        h = float(-source.log_prob(x).mean())
    return h / source.length / math.log(2)


@dataclass
class ParitySource:
    """Sequences of ``length`` tokens in ``[0, vocab_size)`` whose sum is 0 modulo
    ``vocab_size``, all equally likely: each token alone (and any ``length - 1`` of them) is
    uniform, yet the last one revealed is fixed by the rest. A factorised sampler that reveals
    ``m >= 2`` tokens in its last step breaks the constraint with probability ``1 - 1/V``."""

    vocab_size: int
    length: int
    seed: int = 0  # no randomness in the source; kept for the sources' common interface

    def __post_init__(self):
        if self.vocab_size < 2 or self.length < 2:
            raise ValueError(f"a parity source needs vocab_size >= 2 and length >= 2, got {self.vocab_size} "
                             f"and {self.length}")

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """``[batch, length]`` exact draws (the split is ignored: the source is infinite)."""
        x = torch.randint(0, self.vocab_size, (batch, self.length), generator=generator)
        x[:, -1] = (-x[:, :-1].sum(-1)) % self.vocab_size
        return x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x)`` of sequences ``[..., L]`` -> ``[...]`` float64 (``-inf`` off the
        constraint or outside the vocabulary)."""
        x = x.long()
        ok = ((x >= 0) & (x < self.vocab_size)).all(-1) & (x.sum(-1) % self.vocab_size == 0)
        lp = torch.full(x.shape[:-1], -(self.length - 1) * math.log(self.vocab_size), dtype=torch.float64)
        return torch.where(ok, lp, torch.full_like(lp, -math.inf))

    def all_sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence and its probability, for ``V ** L <= 2e6``: ``([N, L], [N])``."""
        return _all_sequences(self)

    @property
    def entropy_bits_per_token(self) -> float:
        return (self.length - 1) * math.log2(self.vocab_size) / self.length


@dataclass
class TokenGrids:
    """``size x size`` images with ``colors`` colours (token 0 is the background): one to three
    axis-aligned rectangles or lines each, flattened row-major to ``L = size * size``."""

    size: int = 8
    colors: int = 4

    @property
    def vocab_size(self) -> int:
        return self.colors

    @property
    def length(self) -> int:
        return self.size * self.size

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        s = self.size
        img = torch.zeros(batch, s, s, dtype=torch.long)
        shapes = torch.randint(1, 4, (batch,), generator=generator)
        for b in range(batch):
            for _ in range(int(shapes[b])):
                r0, c0 = torch.randint(0, s, (2,), generator=generator).tolist()
                h, w = torch.randint(1, s // 2 + 1, (2,), generator=generator).tolist()
                if torch.rand((), generator=generator) < 0.3:  # a line
                    h = 1 if torch.rand((), generator=generator) < 0.5 else h
                    w = 1 if h != 1 else w
                color = int(torch.randint(1, self.colors, (), generator=generator))
                img[b, r0:r0 + h, c0:c0 + w] = color
        return img.reshape(batch, -1)

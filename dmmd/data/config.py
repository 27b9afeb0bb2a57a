"""Which token source a run reads: :class:`DataConfig` (shared by teachers, reference LMs and
the evaluation) and :func:`make_source`."""
from __future__ import annotations

import os
from dataclasses import dataclass

from dmmd.data.images import ImageSource, is_image_path
from dmmd.data.sources import ByteText, MarkovSource, ParitySource, TokenFile, TokenGrids
from dmmd.options import Options, option


@dataclass
class DataConfig(Options):
    """A token source and the sequence length drawn from it."""

    data: str = option("text", "token source: 'text' (the stdlib docs as bytes), 'markov' (exact synthetic "
                               "source), 'parity' (exact: uniform tokens summing to 0 modulo V), 'grids' "
                               "(2-D token images), 'digits' (scikit-learn's 8x8 digits), "
                               "a path to a nanoGPT .bin file, or images: .npy/.npz uint8 [N, H, W, C], "
                               "a folder of PNGs, CIFAR-10 python batch files")
    vocab_size: int = option(0, "vocabulary of a .bin file, or V of the markov or parity source")
    bin_dtype: str = option("uint16", "uint16 or uint32 ids in the .bin file")
    markov_fanout: int = option(3, "successors per state of the markov source")
    markov_seed: int = option(0, "seed that builds the markov source")
    markov_self_loops: bool = option(True, "whether a token of the markov source may follow itself")
    markov_concentration: float = option(0.5, "Dirichlet concentration of the markov source's transition weights "
                                              "(below 1: most of a state's mass on one successor)")
    markov_tie_ends: bool = option(False, "the markov source keeps only sequences whose last token equals the first")
    grid_size: int = option(8, "side of the token grids (length must be its square)")
    grid_colors: int = option(4, "colours of the token grids (token 0 is the background)")
    levels: int = option(256, "tokens per channel value of image files (uint8 values quantised)")
    length: int = option(0, "tokens per sequence; 0: the data's own (images: H * W * C, grids: the grid's "
                            "cells, otherwise 128)")


BUILT_IN = ("text", "markov", "parity", "grids")


def is_image_data(cfg: DataConfig) -> bool:
    """Whether ``cfg`` names image data (digits, or an image file or folder), without reading it."""
    return cfg.data == "digits" or (cfg.data not in BUILT_IN and is_image_path(cfg.data))


DEFAULT_LENGTH = 128  # sources without a length of their own: text, markov, parity, .bin files


def make_source(cfg: DataConfig):
    """The token source named by ``cfg.data``; a bad name or file raises ``ValueError`` naming it.
    ``cfg.length == 0`` is set here to the source's own length (so a config saved after this
    names it)."""
    if cfg.length < 0:
        raise ValueError(f"length must be >= 1 (or 0: the data's own), got {cfg.length}")
    if cfg.length == 0 and not (cfg.data == "grids" or is_image_data(cfg)):
        cfg.length = DEFAULT_LENGTH
    if cfg.data == "text":
        return ByteText(cfg.length)
    if cfg.data == "markov":
        return MarkovSource(cfg.vocab_size or 8, cfg.length, fanout=cfg.markov_fanout, seed=cfg.markov_seed,
                            self_loops=cfg.markov_self_loops, concentration=cfg.markov_concentration,
                            tie_ends=cfg.markov_tie_ends)
    if cfg.data == "parity":
        return ParitySource(cfg.vocab_size or 2, cfg.length)
    if cfg.data == "grids":
        cfg.length = cfg.length or cfg.grid_size ** 2
        if cfg.length != cfg.grid_size ** 2:
            raise ValueError(f"grids of size {cfg.grid_size} need length {cfg.grid_size ** 2}, got {cfg.length}")
        return TokenGrids(cfg.grid_size, cfg.grid_colors)
    if cfg.data == "digits":
        return _image_length_checked(ImageSource.digits(), cfg)
    if not os.path.exists(cfg.data):
        raise ValueError(f"data must be text, markov, parity, grids, digits or an existing .bin or image path, "
                         f"got {cfg.data!r}")
    if is_image_data(cfg):
        return _image_length_checked(ImageSource.from_path(cfg.data, cfg.levels), cfg)
    if cfg.vocab_size < 2:
        raise ValueError("a .bin token file needs --vocab-size")
    return TokenFile(cfg.data, cfg.vocab_size, cfg.length, dtype=cfg.bin_dtype)


def _image_length_checked(source: ImageSource, cfg: DataConfig) -> ImageSource:
    cfg.length = cfg.length or source.length
    if cfg.length != source.length:
        h, w, c = source.shape
        raise ValueError(f"{cfg.data}: images of {h}x{w}x{c} are {source.length} tokens: pass --length "
                         f"{source.length}, got {cfg.length}")
    return source

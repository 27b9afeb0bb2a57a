"""Data: token sources that need no download, and the config that names one.

Lives here: the sources (:mod:`.sources`: embedded text, nanoGPT ``.bin`` files, the exact
Markov and parity sources, token grids; :mod:`.images`: image files and scikit-learn's digits as pixel
tokens) and :class:`DataConfig` / :func:`make_source`. May import numpy and torch, and
optional packages through :mod:`dmmd.extras` only; every other part of ``dmmd`` may import it.
"""
from dmmd.data.config import DataConfig, make_source
from dmmd.data.images import ImageSource, load_images
from dmmd.data.sources import ByteText, MarkovSource, ParitySource, TokenFile, TokenGrids, WindowSource

__all__ = ["ByteText", "DataConfig", "ImageSource", "MarkovSource", "ParitySource", "TokenFile", "TokenGrids",
           "WindowSource", "load_images", "make_source"]

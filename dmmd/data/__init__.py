"""Data: token sources that need no download, and the config that names one.

Lives here: the sources (:mod:`.sources`: embedded text, nanoGPT ``.bin`` files, the exact
Markov source, token grids) and :class:`DataConfig` / :func:`make_source`. May import numpy
and torch only; every other part of ``dmmd`` may import it.
"""
from dmmd.data.config import DataConfig, make_source
from dmmd.data.sources import ByteText, MarkovSource, TokenFile, TokenGrids, WindowSource

__all__ = ["ByteText", "DataConfig", "MarkovSource", "TokenFile", "TokenGrids", "WindowSource", "make_source"]

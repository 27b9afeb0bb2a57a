"""Sample-quality metrics: exact distances on small synthetic spaces (:mod:`.exact`) and the
Gradient Moment of a reference causal LM (paper section 5): per-example gradient Gram
matrices (:mod:`.gram`) and the two GM estimators (:mod:`.moment`); generative perplexity and
unigram entropy (:mod:`.quality`); the Frechet distance of feature statistics, FID with an
image classifier's features (:mod:`.fid`)."""
from dmmd.metrics.exact import (
    Distance,
    chain_quality,
    exact_nll,
    outside_support,
    total_variation,
    total_variation_and_outside,
    window_tv,
)
from dmmd.metrics.fid import fid, frechet_distance
from dmmd.metrics.gram import per_example_gram
from dmmd.metrics.moment import GradientMoment, gradient_moment, mmd2_ustat
from dmmd.metrics.quality import generative_perplexity, unigram_entropy

__all__ = ["Distance", "GradientMoment", "chain_quality", "exact_nll", "fid", "frechet_distance",
           "generative_perplexity", "gradient_moment", "mmd2_ustat", "outside_support", "per_example_gram",
           "total_variation", "total_variation_and_outside", "unigram_entropy", "window_tv"]

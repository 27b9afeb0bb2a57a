"""The k-step sampler with an exact ("oracle") denoiser on an enumerable source: one step
samples the product of the marginals, many steps the joint distribution (masked diffusion
reveals tokens one at a time). Plus reproducibility and block-autoregressive sampling."""
from __future__ import annotations

import itertools

import numpy as np
import torch

from dmmd.data import MarkovSource
from dmmd.diffusion.processes import DiffusionProcess
from dmmd.diffusion.sampling import sample
from tests.conftest import chi2_pvalue


def oracle_masked(source: MarkovSource, proc: DiffusionProcess):
    """Logits of E[x | z_t] for masked diffusion, by enumerating every sequence."""
    seqs, probs = source.all_sequences()
    v = proc.num_classes

    onehot = torch.nn.functional.one_hot(seqs, v).to(torch.float64)  # [N, L, V]

    def fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        known = z != proc.mask_id  # [B, L]
        consistent = ((seqs[None] == z[:, None]) | ~known[:, None]).all(-1)  # [B, N]
        w = probs[None] * consistent
        # tokens revealed in one step can be jointly impossible: then any answer will do
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, probs[None])
        marg = torch.einsum("bn,nlv->blv", w, onehot)
        return torch.log(marg / marg.sum(-1, keepdim=True)).float()

    return fn


def _counts(x: torch.Tensor, v: int) -> np.ndarray:
    idx = torch.zeros(x.shape[0], dtype=torch.long)
    for i in range(x.shape[1]):
        idx = idx * v + x[:, i]
    return np.bincount(idx.numpy(), minlength=v ** x.shape[1])


def test_one_step_samples_the_marginals_many_steps_the_joint():
    source = MarkovSource(3, 3, fanout=2, seed=1)
    proc = DiffusionProcess("masked", 4, "linear")
    oracle = oracle_masked(source, proc)
    seqs, probs = source.all_sequences()
    n = 3000
    one = sample(oracle, proc, n, 3, 1, seed=3)
    many = sample(oracle, proc, n, 3, 32, seed=4)
    assert (one != proc.mask_id).all() and (many != proc.mask_id).all()
    marg = [np.bincount(seqs[:, i].numpy(), weights=probs.numpy(), minlength=3) for i in range(3)]
    product = np.array([marg[0][a] * marg[1][b] * marg[2][c] for a, b, c in itertools.product(range(3), repeat=3)])
    assert chi2_pvalue(_counts(one, 3), product / product.sum()) > 1e-4
    joint = probs.numpy()
    # 32 steps: two tokens are revealed in the same step with small probability, so the
    # result is close to (not exactly) the joint; still far from the product.
    tv_many = 0.5 * np.abs(_counts(many, 3) / n - joint).sum()
    tv_one = 0.5 * np.abs(_counts(one, 3) / n - joint).sum()
    assert tv_many < 0.08 < tv_one


def test_sampler_is_reproducible_and_covers_both_processes(gen):
    for kind, v in (("masked", 5), ("uniform", 4)):
        proc = DiffusionProcess(kind, v, "cosine")

        def model(z, t, v=v):
            return torch.randn((*z.shape, v), generator=torch.Generator().manual_seed(int(z.sum())))

        a = sample(model, proc, 6, 10, 4, seed=7, top_p=0.9, temperature=0.8)
        b = sample(model, proc, 6, 10, 4, seed=7, top_p=0.9, temperature=0.8)
        c = sample(model, proc, 6, 10, 4, seed=8, top_p=0.9, temperature=0.8)
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.shape == (6, 10) and a.min() >= 0 and a.max() < proc.data_classes
        calls = []

        def counted(z, t, calls=calls):
            calls.append(z.shape[0])
            return model(z, t)

        chunked = sample(counted, proc, 6, 10, 4, seed=7, top_p=0.9, temperature=0.8, batch_size=4)
        assert calls == [4] * 4 + [2] * 4  # two chunks (4 + 2 rows), 4 steps each
        again = sample(model, proc, 6, 10, 4, seed=7, top_p=0.9, temperature=0.8, batch_size=4)
        assert torch.equal(chunked, again) and chunked.shape == (6, 10)
        # the second chunk has streams of its own, not a replay of the first chunk's
        assert not torch.equal(chunked[4:], chunked[:2])


def test_block_autoregressive_sampling_fills_blocks_in_order():
    proc = DiffusionProcess("masked", 5, "linear")
    seen = []

    def model(z, t):
        seen.append(z.shape[1])
        logits = torch.zeros((*z.shape, 5))
        logits[..., 4] = float("-inf")
        return logits

    x = sample(model, proc, 3, 12, 2, seed=0, block_size=4)
    assert (x != 4).all()
    assert seen == [4, 4, 8, 8, 12, 12]  # each block sees itself and the blocks before it

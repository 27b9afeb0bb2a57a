"""Metrics: exact TV on a small space; per-example gradient Gram matrices against brute-force
``torch.func`` gradients on a tiny GPT-2 loaded from a local directory (tied embeddings, with
and without a prompt, with padding); the MMD^2 U-statistic against its formula; the U-statistic
and the paper's batch-pair estimator agree in expectation."""
from __future__ import annotations

import math

import pytest
import torch

from dmmd.data import MarkovSource
from dmmd.metrics import exact_nll, gradient_moment, mmd2_ustat, per_example_gram, total_variation
from dmmd.metrics.gram import _token_losses

transformers = pytest.importorskip("transformers")


def test_total_variation_is_exact_on_a_small_space():
    src = MarkovSource(3, 4, fanout=2, seed=1)
    seqs, p = src.all_sequences()
    gen = torch.Generator().manual_seed(0)
    x = seqs[torch.multinomial(p, 200_000, replacement=True, generator=gen)]
    d = total_variation(x, src)
    assert d.value < 0.02 and d.samples == 200_000  # exact samples: only sampling noise
    # A point mass on one sequence: TV = 1 - p(that sequence), exactly.
    one = seqs[int(p.argmax())].repeat(50, 1)
    assert total_variation(one, src).value == pytest.approx(1 - float(p.max()), abs=1e-12)
    bad = torch.full((10, 4), 3)  # id 3 is outside V = 3: no mass under p
    assert total_variation(bad, src).value == pytest.approx(1.0)
    assert math.isinf(exact_nll(bad, src).value)
    with pytest.raises(ValueError, match="samples"):
        total_variation(torch.zeros(5, 3, dtype=torch.long), src)


def _tiny_gpt2(path, seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(n_layer=2, n_embd=16, n_head=2, vocab_size=11, n_positions=16, resid_pdrop=0.1, embd_pdrop=0.1,
                attn_pdrop=0.1, bos_token_id=0, eos_token_id=0)
    cfg = transformers.GPT2Config(**{**base, **kw})
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    model = transformers.GPT2LMHeadModel.from_pretrained(path, local_files_only=True).double()
    with torch.no_grad():  # LayerNorm weights away from 1, biases away from 0: every term counts
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _brute_force_gram(model, seqs, prompt_length=0, attention_mask=None):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, seq, mask):
        out = torch.func.functional_call(model, p, (), {"input_ids": seq[None], "attention_mask": mask})
        return _token_losses(out.logits, seq[None], mask, prompt_length)[0]

    model.eval()
    rows = []
    for i in range(seqs.shape[0]):
        mask = None if attention_mask is None else attention_mask[i:i + 1]
        g = torch.func.grad(loss)(params, seqs[i], mask)
        rows.append(torch.cat([v.flatten() for v in g.values()]))
    flat = torch.stack(rows)
    return flat @ flat.T


@pytest.mark.parametrize("prompt_length", [0, 3])
def test_per_example_gram_equals_brute_force_on_tied_gpt2(tmp_path, prompt_length):
    model = _tiny_gpt2(tmp_path / "gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    seqs = torch.randint(0, 11, (5, 9), generator=torch.Generator().manual_seed(1))
    seqs[1, 2:5] = seqs[0, 2:5]  # shared tokens across examples: the equality trick is exercised
    model.train()  # dropout on: per_example_gram must turn it off, and restore the mode
    k = per_example_gram(model, seqs, prompt_length=prompt_length)
    assert model.training
    want = _brute_force_gram(model, seqs, prompt_length)
    torch.testing.assert_close(k, want, rtol=1e-5, atol=1e-10)


def test_per_example_gram_with_padding_and_untied_head(tmp_path):
    model = _tiny_gpt2(tmp_path / "gpt2u", seed=3, tie_word_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    seqs = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(seqs)
    mask[2, 6:] = 0
    mask[3, 4:] = 0
    k = per_example_gram(model, seqs, attention_mask=mask)
    torch.testing.assert_close(k, _brute_force_gram(model, seqs, attention_mask=mask), rtol=1e-5, atol=1e-10)


def test_per_example_gram_rejects_unsupported_modules():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 4)
            self.scale = torch.nn.Parameter(torch.ones(4))
            self.head = torch.nn.Linear(4, 5)

        def forward(self, input_ids, attention_mask=None):
            return self.head(self.emb(input_ids) * self.scale)

    with pytest.raises(ValueError, match="Scaled"):
        per_example_gram(Scaled(), torch.zeros(2, 3, dtype=torch.long))


def test_ustat_equals_the_mmd2_formula():
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(7, 5, generator=gen, dtype=torch.float64), torch.randn(9, 5, generator=gen,
                                                                                 dtype=torch.float64) + 0.3
    z = torch.cat([xs, ys])
    value, stderr = mmd2_ustat(z @ z.T, 7)
    m, n = 7, 9
    want = sum(float(xs[i] @ xs[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1)) \
        + sum(float(ys[i] @ ys[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1)) \
        - 2 * sum(float(xs[i] @ ys[j]) for i in range(m) for j in range(n)) / (m * n)
    assert value == pytest.approx(want, rel=1e-12)
    # The jackknife: recompute the U-statistic without each point.
    drops = [mmd2_ustat(z[[r for r in range(16) if r != i]] @ z[[r for r in range(16) if r != i]].T,
                        m - (i < m))[0] for i in range(16)]
    dx, dy = torch.tensor(drops[:m], dtype=torch.float64), torch.tensor(drops[m:], dtype=torch.float64)
    var = (m - 1) / m * float(((dx - dx.mean()) ** 2).sum()) + (n - 1) / n * float(((dy - dy.mean()) ** 2).sum())
    assert stderr == pytest.approx(math.sqrt(var), rel=1e-10)


def test_estimators_agree_in_expectation(tmp_path):
    model = _tiny_gpt2(tmp_path / "toy", n_layer=1).float()
    gen = torch.Generator().manual_seed(5)
    u, p = [], []
    for _ in range(24):
        samples = torch.randint(0, 11, (16, 6), generator=gen)
        data = torch.randint(0, 6, (16, 6), generator=gen)  # a different distribution: GM > 0
        u.append(gradient_moment(model, samples, data, estimator="ustat", batch_size=32).value)
        p.append(gradient_moment(model, samples, data, estimator="pairs", batch_size=4).value)
    u, p = torch.tensor(u, dtype=torch.float64), torch.tensor(p, dtype=torch.float64)
    se = math.sqrt(float(u.var()) / len(u) + float(p.var()) / len(p))
    assert float(u.mean()) > 5 * float(u.std()) / math.sqrt(len(u))  # the distance is real
    assert abs(float(u.mean() - p.mean())) < 4 * se
    assert float(u.std()) < float(p.std())  # every pair counts: lower variance for the same passes

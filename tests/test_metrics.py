"""Metrics: exact TV on a small space and its share from impossible samples; per-example
gradient Gram matrices against brute-force ``torch.func`` gradients on a tiny GPT-2 loaded from
a local directory (tied embeddings, with and without a prompt, with padding); the MMD^2
U-statistic against its formula; the U-statistic and the paper's batch-pair estimator agree in
expectation."""
from __future__ import annotations

import math

import pytest
import torch

from dmmd.data import MarkovSource, ParitySource, make_source
from dmmd.metrics import (
    chain_quality,
    exact_nll,
    gradient_moment,
    mmd2_ustat,
    outside_support,
    per_example_gram,
    total_variation,
    total_variation_and_outside,
    window_tv,
)
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


def test_outside_support_splits_the_total_variation():
    src = ParitySource(2, 4)  # 8 possible sequences of 16, each 1/8
    seqs, p = src.all_sequences()
    possible, impossible = seqs[p > 0], seqs[p == 0]
    # every possible sequence once, the first impossible one twice, one id outside V = 2
    x = torch.cat([possible, impossible[:1].repeat(2, 1), torch.tensor([[0, 0, 2, 0]])])
    out = outside_support(x, src)
    assert out.value == pytest.approx(3 / 11, abs=1e-12) and out.samples == 11
    assert total_variation_and_outside(x, src) == (total_variation(x, src), out)  # one enumeration, both
    assert out.stderr == pytest.approx(math.sqrt(3 / 11 * 8 / 11 / 11))
    # here the possible sequences are evenly weighted: the whole TV is the impossible share
    assert total_variation(x, src).value == pytest.approx(3 / 11, abs=1e-12)
    # only possible sequences, badly weighted: nothing outside, the TV is all misweighting
    skewed = torch.cat([possible, possible[:1].repeat(8, 1)])
    assert outside_support(skewed, src).value == 0.0
    assert total_variation(skewed, src).value == pytest.approx(0.5 * (9 / 16 - 1 / 8 + 7 * (1 / 8 - 1 / 16)))
    # TV >= outside on any draw
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        r = torch.randint(0, 2, (200, 4), generator=gen)
        assert total_variation(r, src).value >= outside_support(r, src).value - 1e-12
    with pytest.raises(ValueError, match="samples"):
        outside_support(torch.zeros(5, 3, dtype=torch.long), src)


def _window_tv_written_out(x, src, width):
    """window_tv by counting tuples in Python (float64 sums over dicts)."""
    seqs, p = src.all_sequences()
    v, length = src.vocab_size, src.length
    rows = [tuple(r) for r in x.tolist()]
    out = []
    for j in range(length - width + 1):
        data, seen = {}, {}
        for seq, pr in zip(seqs.tolist(), p.tolist(), strict=True):
            data[tuple(seq[j:j + width])] = data.get(tuple(seq[j:j + width]), 0.0) + pr
        bad = 0
        for r in rows:
            if all(0 <= t < v for t in r):
                seen[r[j:j + width]] = seen.get(r[j:j + width], 0) + 1
            else:
                bad += 1
        keys = set(data) | set(seen)
        out.append(0.5 * (sum(abs(seen.get(c, 0) / len(rows) - data.get(c, 0.0)) for c in keys) + bad / len(rows)))
    return out


def test_window_tv_is_the_tv_of_each_windows_marginals():
    src = ParitySource(2, 4)  # 8 possible sequences of 16, each 1/8
    seqs, p = src.all_sequences()
    possible, impossible = seqs[p > 0], seqs[p == 0]
    # parity: any three of the four bits of the even sequences are uniform, and so are the odd
    # ones', so every window short of the whole sequence sees no error in the odd sequences,
    # whose whole-sequence TV is 1: the error is all in the joint
    for x, whole in ((possible, 0.0), (impossible, 1.0)):
        for width in (1, 2, 3):
            assert window_tv(x, src, width).tolist() == pytest.approx([0.0] * (5 - width), abs=1e-12)
        assert window_tv(x, src, 4).tolist() == [pytest.approx(whole, abs=1e-12)]
    # random draws of a Markov chain, one id outside V: against the tuples counted in Python;
    # the whole-sequence window is the TV, and no window's TV exceeds it
    src = MarkovSource(3, 5, fanout=2, seed=1)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([src.sample(300, gen), torch.randint(0, 3, (100, 5), generator=gen)])
    x[7, 2] = 3
    tv = total_variation(x, src).value
    for width in range(1, 6):
        got = window_tv(x, src, width)
        assert got.dtype == torch.float64 and got.shape == (6 - width,)
        assert got.tolist() == pytest.approx(_window_tv_written_out(x, src, width), abs=1e-12)
        assert (got <= tv + 1e-12).all()
    assert window_tv(x, src, 5).item() == pytest.approx(tv, abs=1e-12)
    for width in (0, 6):
        with pytest.raises(ValueError, match="width"):
            window_tv(x, src, width)


def test_chain_quality_counts_impossible_samples_exact_nll_and_diversity():
    src = MarkovSource(6, 8, fanout=2, seed=3)
    gen = torch.Generator().manual_seed(0)
    data = src.sample(20_000, gen)
    q = chain_quality(data, src)
    assert q["impossible"] == 0 and q["impossible_stderr"] == 0 and q["samples"] == 20_000
    # exact draws: NLL per token is the entropy rate; the plug-in next-token entropy is the
    # chain's conditional entropy under its (nearly stationary) state frequencies
    assert q["nll"] == pytest.approx(src.entropy_bits_per_token * math.log(2), abs=4 * q["nll_stderr"] + 1e-3)
    freq = torch.bincount(data[:, :-1].reshape(-1), minlength=6).double()
    t = src.transition
    cond = -(t * torch.where(t > 0, t.log(), torch.zeros_like(t))).sum(1)
    assert q["entropy"] == pytest.approx(float((freq / freq.sum() * cond).sum()), abs=0.01)
    # one impossible transition in a quarter of the samples (and a mask id in one more): counted
    # by sample, with the binomial standard error; the possible ones keep their exact NLL
    x = data[:400].clone()
    for i in range(100):  # position 3 gets a successor the chain never takes after position 2
        x[i, 3] = int((t[x[i, 2]] == 0).nonzero()[0])
    x[100, 5] = 6
    q = chain_quality(x, src)
    assert q["impossible"] == pytest.approx(101 / 400)
    assert q["impossible_stderr"] == pytest.approx(math.sqrt(101 / 400 * 299 / 400 / 400))
    assert q["nll"] == pytest.approx(float(-src.log_prob(x[101:]).mean() / 8))
    # a sampler repeating one sequence: likely, possible, and no diversity at all
    one = data[:1].repeat(500, 1)
    assert chain_quality(one, src)["impossible"] == 0 and chain_quality(one, src)["entropy"] == pytest.approx(0)
    # uniform tokens: nearly all impossible; their allowed pairs are uniform over each word's
    # successors (log 2 nats here), however many impossible pairs surround them
    noise = torch.randint(0, 6, (4000, 8), generator=gen)
    assert chain_quality(noise, src)["impossible"] > 0.95
    assert chain_quality(noise, src)["entropy"] == pytest.approx(math.log(2), abs=0.02)
    assert math.isnan(chain_quality(torch.full((3, 8), 6), src)["nll"])


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
    k = per_example_gram(model, seqs, prompt_length=prompt_length, materialise_limit=0)  # the tricks
    assert model.training
    want = _brute_force_gram(model, seqs, prompt_length)
    torch.testing.assert_close(k, want, rtol=1e-5, atol=1e-10)
    k = per_example_gram(model, seqs, prompt_length=prompt_length)  # small V: materialised
    torch.testing.assert_close(k, want, rtol=1e-5, atol=1e-10)


def test_per_example_gram_with_padding_and_untied_head(tmp_path):
    model = _tiny_gpt2(tmp_path / "gpt2u", seed=3, tie_word_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    seqs = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(seqs)
    mask[2, 6:] = 0
    mask[3, 4:] = 0
    want = _brute_force_gram(model, seqs, attention_mask=mask)
    for limit in (0, 1 << 25):
        k = per_example_gram(model, seqs, attention_mask=mask, materialise_limit=limit)
        torch.testing.assert_close(k, want, rtol=1e-5, atol=1e-10)


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


# ---------------------------------------------------------------- with a reference LM trained here

@pytest.fixture(scope="module")
def byte_reference(tmp_path_factory):
    from dmmd.models.reference_lm import load_reference
    from dmmd.training.reference import ReferenceConfig, train_reference

    out = tmp_path_factory.mktemp("ref")
    cfg = ReferenceConfig.from_dict(dict(data="text", length=32, n_layer=2, n_embd=64, n_head=2, batch_size=32,
                                         steps=300, warmup=20, lr=3e-3, eval_batches=2, save_every=300,
                                         out=str(out)))
    result = train_reference(cfg, progress=False)
    return load_reference(result["model"]), cfg, result


def test_reference_lm_trains_and_loads_from_a_local_directory(byte_reference):
    model, cfg, result = byte_reference
    assert result["val_nll"] < math.log(256) - 1.5  # well below uniform over bytes
    assert isinstance(model, transformers.GPT2LMHeadModel) and not model.training


def test_gradient_moment_separates_degenerate_generators(byte_reference):
    """Held-out data: GM within 3 standard errors of zero. Repeating one real sequence, or
    shuffling the tokens of real sequences: many standard errors above zero, although the
    repeated sequence's generative perplexity is close to the data's."""
    from dmmd.metrics import generative_perplexity, unigram_entropy

    model, cfg, _ = byte_reference
    source = make_source(cfg.source)
    gen = torch.Generator().manual_seed(0)
    data = source.sample(96, gen, split="val")
    held_out = source.sample(96, gen, split="val")
    repeated = held_out[:1].repeat(96, 1)
    shuffled = torch.stack([row[torch.randperm(row.numel(), generator=gen)] for row in held_out])
    gm = {name: gradient_moment(model, x, data, batch_size=96)
          for name, x in (("held_out", held_out), ("repeated", repeated), ("shuffled", shuffled))}
    print({k: str(v) for k, v in gm.items()})
    assert abs(gm["held_out"].value) < 3 * gm["held_out"].stderr, gm
    for name in ("repeated", "shuffled"):
        assert gm[name].value > 5 * gm[name].stderr and gm[name].value > 5 * abs(gm["held_out"].value), gm
    ppl_data = generative_perplexity(model, data)
    assert generative_perplexity(model, repeated) < 1.5 * ppl_data
    assert generative_perplexity(model, shuffled) > 1.5 * ppl_data
    assert unigram_entropy(shuffled) == pytest.approx(unigram_entropy(held_out))


def test_command_line_reference_train_and_evaluate(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    run = lambda *a: subprocess.run([sys.executable, "-m", "dmmd", *a], check=True, env=env, cwd=root,  # noqa: E731
                                    capture_output=True, text=True).stdout
    assert "--n-layer" in run("reference", "train", "--help")
    out = tmp_path / "ref"
    result = json.loads(run("reference", "train", "--data", "markov", "--vocab-size", "4", "--length", "6",
                            "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--batch-size", "16",
                            "--steps", "20", "--warmup", "2", "--eval-batches", "1", "--out", str(out),
                            "--no-progress").strip().splitlines()[-1])
    assert os.path.isfile(out / "model" / "config.json") and result["step"] == 20
    src = MarkovSource(4, 6, fanout=3, seed=0)
    samples = tmp_path / "s.json"
    samples.write_text(json.dumps({"tokens": src.sample(24, torch.Generator().manual_seed(1)).tolist()}))
    table = run("evaluate", "--samples", str(samples), "--reference", str(out / "model"), "--data", "markov",
                "--vocab-size", "4", "--num-data", "24", "--batch-size", "24", "--out", str(tmp_path / "e.json"))
    assert "| data (held out) |" in table and "tv" in table
    rows = json.loads((tmp_path / "e.json").read_text())
    assert [r["name"] for r in rows] == ["data (held out)", str(samples)]
    assert all(math.isfinite(r["gm"]) and r["tv"] < 1 for r in rows)

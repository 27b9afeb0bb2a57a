"""The benchmark of exact sources (``bench/source_benchmark.py`` runs it whole): the new sources
sample their exact distributions, and one short case of the benchmark runs, caches every stage
by its settings, and recomputes only what a changed setting changes."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dmmd.apps.source_bench import SOURCES, BenchConfig, markdown_table, merge_results, plot, run_bench, verdict
from dmmd.apps.stages import keyed_file
from dmmd.data import DataConfig, MarkovSource, ParitySource, make_source
from dmmd.metrics import total_variation


def test_tied_chain_samples_its_exact_distribution():
    src = MarkovSource(4, 6, fanout=3, concentration=1.0, tie_ends=True)
    seqs, p = src.all_sequences()
    assert float(p.sum()) == pytest.approx(1.0)
    assert bool((p[seqs[:, 0] != seqs[:, -1]] == 0).all())
    x = src.sample(200_000, torch.Generator().manual_seed(0))
    assert bool((x[:, 0] == x[:, -1]).all())
    # the empirical TV is only the sampling noise (bias ~ sum sqrt(p / (2 pi N)))
    noise = float(torch.sqrt(p / (2 * torch.pi * len(x))).sum())
    tv = total_variation(x, src)
    assert tv.value < 1.5 * noise + 3 * tv.stderr, (tv, noise)
    # the chain with its last token overwritten by the first is another distribution: caught
    plain = MarkovSource(4, 6, fanout=3, concentration=1.0).sample(200_000, torch.Generator().manual_seed(0))
    plain[:, -1] = plain[:, 0]
    assert total_variation(plain, src).value > 3 * noise


def test_untied_chain_is_unchanged_by_the_new_options():
    a, b = MarkovSource(4, 6, fanout=2), MarkovSource(4, 6, fanout=2, concentration=0.5, tie_ends=False)
    assert torch.equal(a.transition, b.transition)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(a.sample(50, g1), b.sample(50, g2))


def test_parity_source():
    src = ParitySource(3, 5)
    x = src.sample(60_000, torch.Generator().manual_seed(0))
    assert bool((x.sum(-1) % 3 == 0).all())
    seqs, p = src.all_sequences()
    assert int((p > 0).sum()) == 3 ** 4 and float(p.sum()) == pytest.approx(1.0)
    assert total_variation(x, src).value < 0.05
    assert src.log_prob(torch.tensor([[0, 0, 0, 0, 1]])).item() == float("-inf")
    assert src.entropy_bits_per_token == pytest.approx(4 / 5 * 1.5849625, rel=1e-6)
    assert isinstance(make_source(DataConfig(data="parity", vocab_size=3, length=5)), ParitySource)
    with pytest.raises(ValueError, match="parity source needs vocab_size >= 2"):
        ParitySource(1, 4)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_benchmark_source_enumerates(name):
    src = make_source(DataConfig.from_dict(SOURCES[name]))
    _, p = src.all_sequences()
    assert float(p.sum()) == pytest.approx(1.0)
    assert 16 <= int((p > 0).sum()) <= 5000  # few enough for a TV from 10^5 draws, enough to be a distribution


def test_verdict_allows_two_standard_errors():
    t = {"mean": 0.10, "stderr": 0.006}
    assert verdict({"mean": 0.09, "std": 0.0, "n": 3}, t) == "reaches"
    assert verdict({"mean": 0.11, "std": 0.01, "n": 3}, t) == "reaches"  # within 2 s.e. of the difference
    assert verdict({"mean": 0.13, "std": 0.01, "n": 3}, t) == "short"


def test_short_benchmark_runs_and_caches_by_settings(tmp_path):
    torch.manual_seed(0)
    cfg = BenchConfig(sources=("parity2x5",), processes=("masked",), ks=(2,), seeds=(0,), samples=4000,
                      curve_samples=1000, curve_points=2, teacher_steps=30, distill_steps=20, out=str(tmp_path))
    (row,) = run_bench(cfg, progress=False, log=lambda *_: None)
    assert row["source"] == "parity2x5" and row["verdict_4k"] in ("reaches", "short")
    (student,) = row["students"]
    assert [c["step"] for c in student["curve"]] == [10, 20] and student["entropy"]
    # the end reading splits the TV: impossible samples, the rest misweighting of possible ones
    assert 0 <= student["outside"] <= student["tv"] and row["student_outside"]["mean"] == student["outside"]
    assert 0 <= row["teacher_4k"]["outside"] <= row["teacher_4k"]["mean"]
    # and gives the TV of each position's and each adjacent pair's marginals, none above the TV
    for end, tv in ((student, student["tv"]), (row["teacher_4k"], row["teacher_4k"]["mean"])):
        assert len(end["position_tv"]) == 5 and len(end["pair_tv"]) == 4
        assert max(end["position_tv"]) <= max(end["pair_tv"]) + 1e-12 and max(end["pair_tv"]) <= tv + 1e-12
    assert f"| {student['outside']:.3f} / {row['teacher_4k']['outside']:.3f} |" in markdown_table([row])
    # a row from before the split: a dash, not a number
    old = {**row, "teacher_4k": {"mean": 0.1, "stderr": 0.01}}
    del old["student_outside"]
    assert markdown_table([old]).endswith("| — |")
    plot([row, row], str(tmp_path / "curves.png"))  # TV along training, entropy per coarse step, noise norm
    assert (tmp_path / "curves.png").stat().st_size > 1000
    teachers, students = os.listdir(tmp_path / "teachers"), os.listdir(tmp_path / "students")
    # the same settings again: every stage read from its cache, the same numbers
    (again,) = run_bench(cfg, progress=False, log=lambda *_: None)
    assert again["student_k"] == row["student_k"] and again["teacher_k"] == row["teacher_k"]
    # a reading cached before the split is drawn again from the same weights: the same TV
    reading = keyed_file(student["out"], "tv", {"step": 20, "samples": 4000, "seed": cfg.seed + 1})
    with open(reading) as f:
        cached_reading = json.load(f)
    with open(reading, "w") as f:
        json.dump({"tv": cached_reading["tv"], "tv_stderr": cached_reading["tv_stderr"]}, f)
    (upgraded,) = run_bench(cfg, progress=False, log=lambda *_: None)
    assert upgraded["students"][0]["outside"] == student["outside"] and upgraded["student_k"] == row["student_k"]
    assert upgraded["students"][0]["pair_tv"] == student["pair_tv"]
    assert os.listdir(tmp_path / "teachers") == teachers
    # a lever: a new student next to the old one, the same teacher
    cfg.distill = {"noise_per": "token"}
    (lever,) = run_bench(cfg, progress=False, log=lambda *_: None)
    assert os.listdir(tmp_path / "teachers") == teachers
    assert len(os.listdir(tmp_path / "students")) == len(students) + 1
    assert lever["teacher_k"] == row["teacher_k"]
    # results are named by what the students change, their length included
    tags = {BenchConfig().tag(), BenchConfig(distill_steps=6000).tag(), BenchConfig(distill_batch=64).tag(),
            BenchConfig(distill={"noise_per": "token"}).tag()}
    assert len(tags) == 4 and BenchConfig().tag() == "defaults"
    with pytest.raises(ValueError, match="distill: 'seed' is a benchmark option: seeds"):
        BenchConfig(distill={"seed": 3}).validate()
    with pytest.raises(ValueError, match="sources: unknown"):
        BenchConfig(sources=("nope",)).validate()


def test_results_of_runs_over_parts_add_up(tmp_path):
    path, cfg = str(tmp_path / "results_defaults.json"), BenchConfig()
    row = lambda src, k, tv: {"source": src, "process": "masked", "k": k, "tv": tv}  # noqa: E731
    merge_results(path, cfg, [row("chain4x6", 2, 0.1), row("chain4x6", 4, 0.2)], 5)
    merge_results(path, cfg, [row("soft4x6", 2, 0.3)], 6)  # another source: added
    merge_results(path, cfg, [row("chain4x6", 4, 0.25)], 7)  # the same row again: replaced
    with open(path) as f:
        results = json.load(f)
    assert [(r["source"], r["k"], r["tv"]) for r in results["rows"]] == [
        ("chain4x6", 2, 0.1), ("soft4x6", 2, 0.3), ("chain4x6", 4, 0.25)]
    assert [r["seconds"] for r in results["runs"]] == [5, 6, 7]

"""The D-MMD distiller (paper Algorithm 1): one step's generator and auxiliary gradients equal
a hand-written float64 computation of eq. 11 / eq. 12 (and eq. 24 / 26 for the Appendix D
form), the fixed point gives a zero generator gradient, options are checked, a resumed run is
bit-identical, 2-process DDP equals one process, the command line distills and samples."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from dmmd.data import make_source
from dmmd.diffusion.processes import DiffusionProcess
from dmmd.diffusion.sampling import sample
from dmmd.models.denoiser import Denoiser, DenoiserConfig
from dmmd.models.external import as_denoiser
from dmmd.models.noise import NoiseSpec
from dmmd.training.checkpoint import load_tensors
from dmmd.training.distill import (
    CollapseMonitor,
    DistillConfig,
    Distiller,
    distill,
    draw_batch,
    is_student,
    load_student,
    loss_weight,
    student_fn,
)
from dmmd.training.distill.noise import build_generator
from dmmd.training.teacher import TeacherConfig, train_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- hand-written float64 losses

def _teacher_logprobs(a: torch.Tensor, temperature: float, top_p: float, delta: float) -> torch.Tensor:
    """docs/design.md §4 written out: s = a / T; outside the top-p nucleus s -= delta; log_softmax."""
    s = a / temperature
    if top_p < 1:
        p = torch.softmax(s, -1)
        keep = torch.zeros_like(s, dtype=torch.bool)
        for r in range(s.shape[0]):
            order = sorted(range(s.shape[1]), key=lambda c: (-float(p[r, c]), c))
            mass = 0.0
            for c in order:
                if mass < top_p:
                    keep[r, c] = True
                mass += float(p[r, c])
        s = s - delta * (~keep).to(s.dtype)
    return torch.log_softmax(s, -1)


def _xlogy(p: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``p * logq`` with exact zeros where ``p == 0`` (no ``0 * -inf``)."""
    return torch.where(p > 0, p * torch.where(p > 0, logq, 0.0), 0.0)


def _tiny_models(kind: str, v: int = 7, length: int = 5, seed: int = 0):
    """A float64 teacher with random (non-zero) weights and its process."""
    torch.manual_seed(seed)
    num_classes = v + 1 if kind == "masked" else v
    process = DiffusionProcess(kind, num_classes, "linear")
    teacher = Denoiser(DenoiserConfig(num_classes=num_classes, length=length, process=kind, width=16, depth=1,
                                      heads=2)).double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return teacher, process


class _Source:
    """Uniform random token sequences (the distiller only needs ``sample``)."""

    def __init__(self, v, length):
        self.vocab_size, self.length = v, length

    def sample(self, batch, generator, split="train"):
        return torch.randint(0, self.vocab_size, (batch, self.length), generator=generator)


def _perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _setup(kind, **cfg_kw):
    teacher, process = _tiny_models(kind)
    cfg = DistillConfig.from_dict({"batch_size": 6, "student_steps": 2, "draw_block": 3, "seed": 3, **cfg_kw})
    d = Distiller(teacher, process, cfg)
    _perturb(d.generator, 0.2, 1)  # generator and aux away from the teacher: non-trivial gradients
    _perturb(d.aux, 0.2, 2)
    batch = draw_batch(_Source(process.data_classes, 5), process, d.cfg, d.noise, step=4)
    return d, process, d.cfg, batch


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


CASES = [("masked", {}), ("masked", {"soft_target": False, "temperature": 0.7, "top_p": 0.8, "weight": "elbo"}),
         ("masked", {"soft_target": True, "top_p": 0.9}), ("uniform", {}),
         ("uniform", {"temperature": 1.3, "top_p": 0.75, "delta": 3.0}),
         ("masked", {"entropy_penalty": 0.3}), ("uniform", {"entropy_penalty": 0.3}),
         ("masked", {"aux_teacher_weight": 1.0}), ("masked", {"aux_teacher_weight": 0.3, "soft_target": False}),
         ("uniform", {"aux_teacher_weight": 0.5, "top_p": 0.8})]
# The symmetric pull has no fused linear loss: whole logits only.
JEFFREYS = [("masked", {"divergence": "jeffreys"}), ("uniform", {"divergence": "jeffreys", "top_p": 0.8})]


@pytest.mark.parametrize("kind,kw,fused", [(k, kw, f) for k, kw in CASES for f in (False, True)]
                         + [(k, kw, False) for k, kw in JEFFREYS])
def test_one_step_gradients_equal_eq11_and_eq12_in_float64(kind, kw, fused):
    """Both ways to the losses: whole logits, and the fused linear losses on the models' final
    hidden states and output heads (chunked); eq. 11 with either divergence."""
    d, process, cfg, batch = _setup(kind, fused_losses=fused, **kw)
    assert d.fused == fused
    assert_step_matches_eq11_eq12(d, process, batch, step=4)


def assert_step_matches_eq11_eq12(d: Distiller, process, batch, step: int) -> None:
    """The distiller's generator and auxiliary losses and gradients at ``step`` equal eq. 11 and
    eq. 12 written out in float64 on the same draws (``d``'s models are float64)."""
    cfg = d.cfg
    kind = process.kind
    w_seq = loss_weight(process, cfg.weight, batch.s)

    # The distiller: generator step (eq. 11).
    loss, _ = d.generator_loss(batch, step)
    loss.backward()
    got_gen = _grads(d.generator)
    d.generator.zero_grad()

    # By hand: the same draws, then eq. 11 per token, mean over all tokens.
    with torch.no_grad():
        _, x, z_s = d.generate(batch, step)
    u = d.generator(batch.z_t, batch.t.float(), batch.noise)
    with torch.no_grad():
        a = d.teacher(z_s, batch.s.float())
        b = d.aux(z_s, batch.s.float())
    rows = (z_s == process.mask_id) if kind == "masked" else torch.ones_like(z_s, dtype=torch.bool)
    p = torch.softmax(u[rows], -1)
    lt = _teacher_logprobs(a[rows], cfg.temperature, cfg.top_p, cfg.delta)
    la = torch.log_softmax(b[rows], -1)
    if cfg.divergence == "jeffreys":  # half the symmetric KL's pull, r = teacher / aux capped at 20
        log_r = lt - la
        pull = 0.5 * (log_r + log_r.exp().clamp(max=20.0) - 1.0)
        per_token = -(p * torch.where(p > 0, pull, 0.0)).sum(-1)  # the mask class: p = 0, log r undefined
    else:
        per_token = -(_xlogy(p, lt) - _xlogy(p, la)).sum(-1)
    w = w_seq.unsqueeze(-1).expand_as(z_s)[rows]
    hand = (w * per_token).sum() / z_s.numel()
    if cfg.entropy_penalty:  # plus the weight times the output entropy at every undecided z_t position
        choice = (batch.z_t == process.mask_id) if kind == "masked" else torch.ones_like(z_s, dtype=torch.bool)
        q = torch.softmax(u[choice], -1)
        hand = hand - cfg.entropy_penalty * _xlogy(q, torch.log_softmax(u[choice], -1)).sum() / z_s.numel()
    torch.testing.assert_close(loss.double(), hand, rtol=1e-10, atol=1e-12)
    hand.backward()
    want_gen = _grads(d.generator)
    assert sum(float(g.abs().sum()) for g in want_gen) > 1e-6  # the check is not vacuous
    for g, h in zip(got_gen, want_gen, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None for p in d.teacher.parameters())

    # The auxiliary step (eq. 12).
    d.aux.zero_grad()
    loss, _ = d.aux_loss(batch, step)
    loss.backward()
    got_aux = _grads(d.aux)
    d.aux.zero_grad()
    b = d.aux(z_s, batch.s.float())
    with torch.no_grad():
        u = d.generator(batch.z_t, batch.t.float(), batch.noise)
    target = torch.softmax(u[rows], -1) if cfg.soft_target else \
        torch.nn.functional.one_hot(x[rows], process.num_classes).double()
    q = _teacher_logprobs(a[rows], cfg.temperature, cfg.top_p, cfg.delta).exp()
    la = torch.log_softmax(b[rows], -1)
    hand = (w * -(_xlogy(target, la) + cfg.aux_teacher_weight * _xlogy(q, la)).sum(-1)).sum() / z_s.numel()
    torch.testing.assert_close(loss.double(), hand, rtol=1e-10, atol=1e-12)
    hand.backward()
    want_aux = _grads(d.aux)
    assert sum(float(g.abs().sum()) for g in want_aux) > 1e-6
    for g, h in zip(got_aux, want_aux, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-12)


def _pi(process, probs, z_s, s_prev, s):
    """Appendix D's pi_{s'}(probs, z_s) for uniform diffusion, from eq. 4 written out:
    sum_x probs(x) q(z_{s'} | z_s, x), q proportional to [a_ss' z_s + (1 - a_ss')/V] * [a_s' x + (1 - a_s')/V]."""
    v = process.num_classes
    a_sp = process.alpha(s_prev).unsqueeze(-1).unsqueeze(-1)
    a_s = process.alpha(s).unsqueeze(-1).unsqueeze(-1)
    a_ratio = a_s / a_sp
    zs = torch.nn.functional.one_hot(z_s, v).double()
    eye = torch.eye(v, dtype=torch.float64)
    out = torch.zeros(*z_s.shape, v, dtype=torch.float64)
    for xc in range(v):  # each clean class x, weighted by probs(x)
        num = (a_ratio * zs + (1 - a_ratio) / v) * (a_sp * eye[xc] + (1 - a_sp) / v)
        out = out + probs[..., xc:xc + 1] * num / num.sum(-1, keepdim=True)
    return out


@pytest.mark.parametrize("fused", [False, True])
def test_auxiliary_steps_without_the_teacher_term_do_not_run_the_teacher(fused):
    d, process, cfg, batch = _setup("masked", fused_losses=fused)  # the masked default: weight 0
    assert cfg.aux_teacher_weight == 0
    calls = []
    d.teacher.register_forward_hook(lambda *_: calls.append(1))
    d.aux_loss(batch, 5)
    assert not calls
    d.generator_loss(batch, 4)  # the generator's eq. 11 still needs it
    assert calls


@pytest.mark.parametrize("aux_teacher_weight,divergence", [(1.0, "reverse_kl"), (0.4, "reverse_kl"),
                                                           (1.0, "jeffreys")])
def test_appendix_d_posterior_form_equals_eq24_and_eq26(aux_teacher_weight, divergence):
    d, process, cfg, batch = _setup("uniform", form="posterior", posterior_ds=0.1, top_p=0.8,
                                    aux_teacher_weight=aux_teacher_weight, divergence=divergence)
    step = 4
    loss, _ = d.generator_loss(batch, step)
    loss.backward()
    got = _grads(d.generator)
    d.generator.zero_grad()
    with torch.no_grad():
        _, x, z_s = d.generate(batch, step)
        a = d.teacher(z_s, batch.s.float())
        b = d.aux(z_s, batch.s.float())
    s_prev = (batch.s - 0.1).clamp_min(0)
    u = d.generator(batch.z_t, batch.t.float(), batch.noise)
    q_t = _teacher_logprobs(a.flatten(0, 1), 1.0, 0.8, 2.0).exp().view_as(a)
    pi_g = _pi(process, torch.softmax(u, -1), z_s, s_prev, batch.s)
    pi_t = _pi(process, q_t, z_s, s_prev, batch.s)
    pi_a = _pi(process, torch.softmax(b, -1), z_s, s_prev, batch.s)
    log_r = pi_t.log() - pi_a.log()
    pull = log_r if divergence == "reverse_kl" else 0.5 * (log_r + log_r.exp().clamp(max=20.0) - 1.0)
    hand = -(pi_g * pull).sum() / z_s.numel()  # eq. 24
    torch.testing.assert_close(loss.double(), hand, rtol=1e-10, atol=1e-12)
    hand.backward()
    for g, h in zip(got, _grads(d.generator), strict=True):
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-12)

    loss, _ = d.aux_loss(batch, step)
    pi_x = _pi(process, torch.nn.functional.one_hot(x, process.num_classes).double(), z_s, s_prev, batch.s)
    hand = -((pi_x + aux_teacher_weight * pi_t) * pi_a.log()).sum() / z_s.numel()  # eq. 26
    torch.testing.assert_close(loss.double(), hand, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["masked", "uniform"])
def test_fixed_point_gives_zero_generator_gradient(kind):
    """Generator = the teacher's own sampler, auxiliary = teacher: eq. 11 is exactly zero."""
    teacher, process = _tiny_models(kind)
    cfg = DistillConfig.from_dict(dict(batch_size=6, student_steps=2, draw_block=3, noise_dim=0))
    d = Distiller(teacher, process, cfg)
    batch = draw_batch(_Source(process.data_classes, 5), process, cfg, None, step=0)
    loss, _ = d.generator_loss(batch, 0)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in d.generator.parameters())
    # Control: an auxiliary model that differs from the teacher moves the generator.
    _perturb(d.aux, 0.2, 2)
    d.generator.zero_grad()
    loss, _ = d.generator_loss(batch, 0)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 1e-8 for p in d.generator.parameters())


def test_generator_starts_as_the_teacher_and_noise_is_on_for_masked():
    teacher, process = _tiny_models("masked")
    d = Distiller(teacher, process, DistillConfig.from_dict(dict(batch_size=4)))
    assert d.noise == NoiseSpec(32, "sequence", "blocks") == d.generator.noise_spec
    assert d.generator.config.noise_per == "sequence" and d.generator.config.noise_into == "blocks"
    projections = d.generator.noise_projections()
    assert len(projections) == 1 + teacher.config.depth  # the embedding's and one before each block
    assert all(0.05 < float(p.weight.std()) < 0.2 for p in projections)  # noise_init 0.1, each its own draw
    assert not torch.equal(projections[0].weight, projections[1].weight)
    d = Distiller(teacher, process, DistillConfig.from_dict(dict(batch_size=4, noise_init=0.0)))
    z = torch.full((2, 5), process.mask_id)
    t = torch.tensor([0.7, 1.0])
    noise = torch.randn(2, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(d.generator(z, t, noise), teacher(z, t))
    torch.testing.assert_close(d.aux(z, t), teacher(z, t))
    teacher_u, process_u = _tiny_models("uniform")
    d_u = Distiller(teacher_u, process_u, DistillConfig.from_dict(dict(batch_size=4)))
    assert d_u.noise is None and d_u.generator.noise_projections() == [] and not d_u.cfg.soft_target
    # a generator is never called without its noise (it would silently be the teacher), nor with the wrong one
    with pytest.raises(ValueError, match=r"noise: this model takes Gaussian noise \[B, L, 32\]"):
        d.generator(z, t)
    with pytest.raises(ValueError, match=r"noise: shape \[2, 5, 3\]; this model takes .* = \[2, 5, 32\]"):
        d.generator(z, t, torch.zeros(2, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="noise: this model has no noise input"):
        teacher(z, t, noise)
    # noise_init > 0: a small random projection, the teacher again when the noise is zero
    d = Distiller(teacher, process, DistillConfig.from_dict(dict(batch_size=4, noise_dim=8, noise_init=0.1)))
    assert 0.05 < float(d.generator.noise_proj.weight.std()) < 0.2
    assert not torch.allclose(d.generator(z, t, torch.randn(2, 5, 8, dtype=torch.float64)), teacher(z, t))
    torch.testing.assert_close(d.generator(z, t, torch.zeros(2, 5, 8, dtype=torch.float64)), teacher(z, t))
    # noise only at the embedding: one projection
    d = Distiller(teacher, process, DistillConfig.from_dict(dict(batch_size=4, noise_dim=8, noise_into="embedding")))
    assert d.generator.noise_projections() == [d.generator.noise_proj]
    # into the adaLN conditioning too: one more projection, of the tokens' mean noise
    d = Distiller(teacher, process, DistillConfig.from_dict(dict(batch_size=4, noise_dim=8, noise_into="conditioning")))
    gen = d.generator
    assert gen.noise_projections()[-1] is gen.cond_noise and len(gen.noise_projections()) == 2 + teacher.config.depth
    torch.testing.assert_close(gen(z, t, torch.zeros(2, 5, 8, dtype=torch.float64)), teacher(z, t))
    with torch.no_grad():
        for proj in gen.noise_projections()[:-1]:
            proj.weight.zero_()  # only the conditioning path left
    shared = torch.randn(2, 1, 8, dtype=torch.float64).expand(2, 5, 8)
    assert not torch.allclose(gen(z, t, shared), teacher(z, t))
    # it reads the tokens' mean: noise with the same mean gives the same output on that path
    moved = shared + torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0], dtype=torch.float64)[None, :, None]
    torch.testing.assert_close(gen(z, t, moved), gen(z, t, shared))


def test_per_process_defaults_fill_only_unset_options():
    masked = DistillConfig().for_process("masked")
    assert (masked.lr_schedule, masked.soft_target, masked.noise_dim) == ("cosine", True, 32)
    assert (masked.noise_into, masked.aux_per_gen, masked.aux_teacher_weight) == ("blocks", 1, 0.0)
    uniform = DistillConfig().for_process("uniform")
    assert (uniform.lr_schedule, uniform.soft_target, uniform.noise_dim) == ("constant", False, 0)
    assert (uniform.aux_per_gen, uniform.aux_teacher_weight) == (2, 1.0)
    assert DistillConfig.from_dict(dict(aux_teacher_weight=1.0)).for_process("masked").aux_teacher_weight == 1.0
    assert DistillConfig.from_dict(dict(aux_per_gen=3)).for_process("masked").aux_per_gen == 3
    mine = DistillConfig.from_dict(dict(lr_schedule="constant", noise_dim=4)).for_process("masked")
    assert (mine.lr_schedule, mine.noise_dim, mine.noise_into) == ("constant", 4, "blocks")
    with pytest.raises(ValueError, match="lr_schedule"):
        DistillConfig.from_dict(dict(lr_schedule="linear")).for_process("uniform")
    with pytest.raises(ValueError, match="noise_into"):
        DistillConfig.from_dict(dict(noise_into="head")).for_process("masked")


def test_noise_per_sequence_is_shared_by_the_tokens():
    teacher, process = _tiny_models("masked")
    cfg = DistillConfig.from_dict(dict(batch_size=4, noise_dim=3, noise_per="sequence"))
    d = Distiller(teacher, process, cfg)
    assert d.generator.config.noise_per == "sequence"
    b = draw_batch(_Source(7, 5), process, cfg, d.noise, step=0)
    assert b.noise.shape == (4, 5, 3) and torch.equal(b.noise, b.noise[:, :1].expand(4, 5, 3))
    assert not torch.equal(b.noise[0], b.noise[1])
    per_token = draw_batch(_Source(7, 5), process, cfg, NoiseSpec(3, "token"), step=0).noise
    assert not torch.equal(per_token[:, 0], per_token[:, 1])
    seen = []
    d.generator.forward = lambda z, t, noise: seen.append(noise) or teacher(z, t)
    student_fn(d.generator, 0)(torch.full((2, 5), process.mask_id), torch.ones(2))
    assert torch.equal(seen[0], seen[0][:, :1].expand_as(seen[0]))  # the sampler draws the same way
    with pytest.raises(ValueError, match="noise_per"):
        Distiller(teacher, process, DistillConfig.from_dict(dict(noise_per="pixel")))


@pytest.mark.parametrize("kind,window,width", [("masked", 1.0, 1.0), ("masked", 2.0, 2.0),
                                               ("masked", None, 1.0), ("uniform", None, 1.5)])
def test_times_follow_algorithm_1(kind, window, width):
    # unset, the window is the process's default: the paper's for masked, 1.5 steps for uniform
    teacher, process = _tiny_models(kind)
    cfg = DistillConfig.from_dict(dict(batch_size=4000, student_steps=4, step_window=window))
    b = draw_batch(_Source(7, 5), process, cfg, None, step=0)
    delta = b.t - b.s
    h = width / 4  # the window's width: delta ~ U(0, step_window / k)
    assert (b.s >= 0).all() and (b.s < 1).all() and (b.t <= 1).all() and (delta >= 0).all()
    assert h - 0.01 < float(delta.max()) <= h + 1e-12
    assert abs(float((b.t == 1).double().mean()) - h / 2) < 0.02  # P(s + delta >= 1) = E[delta]
    free = b.t < 1
    # given t < 1 (s < 1 - delta) delta's density is proportional to 1 - delta, so E[delta | t < 1]
    # = int d (1 - d) / int (1 - d) over (0, h) = 0.11905 for h = 1/4 (not 1/8)
    expected = (h ** 2 / 2 - h ** 3 / 3) / (h - h ** 2 / 2)
    se = float(delta[free].std()) / float(free.sum()) ** 0.5
    assert abs(float(delta[free].mean()) - expected) < 4 * se


@pytest.mark.parametrize("kw,match", [
    ({"soft_target": True}, "soft_target"), ({"form": "posterior"}, "posterior"),
    ({"weight": "sqrt"}, "weight"), ({"student_steps": 0}, "student_steps"), ({"aux_per_gen": 0}, "aux_per_gen"),
    ({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"), ({"noise_dim": -2}, "noise_dim"),
    ({"noise_init": -0.1}, "noise_init"), ({"draw_block": 0}, "draw_block"),
    ({"entropy_penalty": -0.1}, "entropy_penalty"), ({"extra_blocks": -1}, "extra_blocks"),
    ({"aux_teacher_weight": -0.5}, "aux_teacher_weight"), ({"aux_teacher_weight": float("nan")}, "aux_teacher_weight"),
    ({"step_window": 0.0}, "step_window"), ({"step_window": float("nan")}, "step_window"),
    ({"divergence": "forward_kl"}, "divergence")])
def test_bad_options_name_the_option(kw, match):
    kind = "masked" if kw.get("form") == "posterior" else "uniform"
    teacher, process = _tiny_models(kind)
    with pytest.raises(ValueError, match=match):
        Distiller(teacher, process, DistillConfig.from_dict(dict(**kw)))
    with pytest.raises(ValueError, match="unknown DistillConfig keys"):
        DistillConfig.from_dict({"lr": 1.0})


def test_collapse_warning():
    mon = CollapseMonitor(entropy_floor=0.05)
    for _ in range(100):
        assert not mon.update({"aux_loss": 1.0, "gen_entropy": 0.5})
    with pytest.warns(RuntimeWarning, match="collapsing"):
        for _ in range(300):
            mon.update({"aux_loss": 3.0, "gen_entropy": 0.0})
    healthy = CollapseMonitor(entropy_floor=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(300):  # low entropy alone (a confident generator) is no collapse
            healthy.update({"aux_loss": 1.0, "gen_entropy": 0.0})


def test_extra_blocks_start_as_the_identity_and_then_learn():
    teacher, process = _tiny_models("masked")
    _perturb(teacher, 0.3, 5)  # a teacher whose output is not uniform, so "the same function" says something
    cfg = DistillConfig.from_dict(dict(batch_size=4, noise_init=0.0, extra_blocks=2))
    d = Distiller(teacher, process, cfg)
    gen = d.generator
    assert gen.config.depth == teacher.config.depth + 2 and len(gen.noise_projections()) == 1 + gen.config.depth
    z = torch.tensor([[process.mask_id, 1, process.mask_id, 0, process.mask_id]] * 2)
    t = torch.tensor([0.7, 1.0], dtype=torch.float64)
    noise = torch.randn(2, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(gen(z, t, noise).softmax(-1), teacher(z, t).softmax(-1))
    # the new blocks are not dead: a gradient reaches them (an auxiliary model unlike the teacher)
    d = Distiller(teacher, process, cfg.replace(noise_init=0.1))
    _perturb(d.aux, 0.2, 2)
    batch = draw_batch(_Source(7, 5), process, d.cfg, d.noise, step=0)
    d.generator_loss(batch, 0)[0].backward()
    assert all(d.generator.blocks[i].proj.weight.grad.abs().max() > 0 for i in (-2, -1))
    with pytest.raises(ValueError, match="extra_blocks is for dmmd's own denoiser"):
        build_generator(as_denoiser(torch.nn.Embedding(5, 5), num_classes=5, mask_id=4), None, extra_blocks=1)


# ---------------------------------------------------------------- runs on a trained teacher

@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = TeacherConfig.from_dict(dict(data="markov", vocab_size=4, length=6, width=32, depth=1, heads=2,
                                       batch_size=16, steps=20, warmup=2, eval_every=0, save_every=20, out=str(out),
                                       seed=1))
    train_teacher(cfg, progress=False)
    return str(out / "checkpoint"), cfg


def _distill_cfg(teacher, out, **kw):
    base = dict(teacher=teacher, student_steps=2, batch_size=8, steps=6, warmup=2, save_every=3, out=str(out),
                seed=4, draw_block=4)
    base.update(kw)
    return DistillConfig.from_dict(dict(**base))


def test_resumed_distillation_is_bit_identical(tiny_teacher, tmp_path):
    teacher, _ = tiny_teacher
    full = distill(_distill_cfg(teacher, tmp_path / "full"), progress=False)
    part = distill(_distill_cfg(teacher, tmp_path / "cut"), progress=False, stop_at=3)
    assert part["step"] == 3
    rest = distill(_distill_cfg(teacher, tmp_path / "cut"), progress=False)
    assert full["step"] == rest["step"] == 6
    # training time adds up over the resumes; a run resumed when complete does no work but still says it
    assert rest["seconds"] < rest["train_seconds"] <= part["train_seconds"] + rest["seconds"] + 0.01
    again = distill(_distill_cfg(teacher, tmp_path / "cut"), progress=False)
    assert again["step"] == 6 and again["train_seconds"] == pytest.approx(rest["train_seconds"], abs=0.5)
    for name in ("generator", "aux", "ema", "opt_gen", "opt_aux"):
        a, b = load_tensors(full["checkpoint"], name), load_tensors(rest["checkpoint"], name)
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    init = load_tensors(teacher, "ema")
    gen = load_tensors(full["checkpoint"], "generator")
    assert any(not torch.equal(gen[k], init[k]) for k in init)  # it did train
    log = [json.loads(line) for line in open(tmp_path / "cut" / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert {"gen_loss", "gen_grad_norm", "gen_entropy"} <= set(log[0]) and "aux_loss" in log[1]
    assert 0 < log[0]["gen_entropy"] <= math.log(4) + 1e-6  # nats over the 4 data classes (never the mask)


def test_a_student_with_extra_blocks_is_saved_and_loaded_with_them(tiny_teacher, tmp_path):
    teacher, _ = tiny_teacher
    result = distill(_distill_cfg(teacher, tmp_path, extra_blocks=1), progress=False)
    student, process, _ = load_student(result["checkpoint"])
    assert student.config.depth == 2 and len(student.blocks) == 2  # the teacher's one block, plus one
    x = sample(student_fn(student, 0), process, 3, 6, 2, seed=0)
    assert x.shape == (3, 6) and int(x.max()) < 4


def test_two_process_ddp_equals_one_process(tiny_teacher, tmp_path):
    teacher, _ = tiny_teacher
    one, two = assert_ddp_equals_one_process(teacher, tmp_path)
    init = load_tensors(teacher, "ema")
    for name in ("generator", "aux"):  # step 0 trains the generator, step 1 the auxiliary model
        trained = load_tensors(str(one / "checkpoint"), name)
        assert any(not torch.equal(trained[k], init[k]) for k in init), name


def test_fused_losses_by_default_from_16384_classes_and_refused_where_they_cannot_work():
    cfg = DistillConfig.from_dict(dict(batch_size=4))
    for v, fused in ((300, False), (16384, True)):
        teacher = Denoiser(DenoiserConfig(num_classes=v, length=4, process="uniform", width=8, depth=1, heads=2))
        assert Distiller(teacher, DiffusionProcess("uniform", v, "linear"), cfg).fused == fused
    teacher = Denoiser(DenoiserConfig(num_classes=20, length=4, process="uniform", width=8, depth=1, heads=2))
    process = DiffusionProcess("uniform", 20, "linear")
    assert not Distiller(teacher, process, cfg.replace(fused_losses=False)).fused
    with pytest.raises(ValueError, match="fused_losses: the posterior form"):
        Distiller(teacher, process, cfg.replace(fused_losses=True, form="posterior"))
    with pytest.raises(ValueError, match="fused_losses: divergence='jeffreys' has no fused linear loss"):
        Distiller(teacher, process, cfg.replace(fused_losses=True, divergence="jeffreys"))
    wide = Denoiser(DenoiserConfig(num_classes=16384, length=4, process="uniform", width=8, depth=1, heads=2))
    assert not Distiller(wide, DiffusionProcess("uniform", 16384, "linear"), cfg.replace(divergence="jeffreys")).fused


def assert_ddp_equals_one_process(teacher: str, tmp_path, *extra: str):
    """Two distillation steps of ``teacher`` (with the ``extra`` flags) by one process and by
    2-process DDP (torchrun, gloo) log the same gradient norms and end with the same weights;
    returns both run dirs."""
    args = ["--teacher", teacher, "--student-steps", "2", "--batch-size", "8", "--draw-block", "4", "--steps", "2",
            "--warmup", "1", "--save-every", "2", "--seed", "2", "--no-progress", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "dmmd", "distill", "--out", str(one), *args], check=True, env=env,
                   cwd=ROOT, capture_output=True)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "dmmd", "distill", "--out", str(two), *args], env=env, cwd=ROOT, capture_output=True,
                         text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # Gradients, not only weights: Adam's first steps are sign-like and would hide a wrong
    # gradient scale. The logged norm is of the gradient rank 0 steps with (after DDP's mean).
    logs = [[json.loads(line) for line in open(d / "log.jsonl")] for d in (one, two)]
    for r1, r2, key in zip(*logs, ("gen_grad_norm", "aux_grad_norm"), strict=True):
        assert r1[key] > 0
        assert r2[key] == pytest.approx(r1[key], rel=1e-4), key
    for name in ("generator", "aux"):
        a, b = load_tensors(str(one / "checkpoint"), name), load_tensors(str(two / "checkpoint"), name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    return one, two


def test_command_line_distill_and_sample_student(tiny_teacher, tmp_path):
    teacher, tcfg = tiny_teacher
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    run = lambda *a: subprocess.run([sys.executable, "-m", "dmmd", *a], check=True, env=env, cwd=ROOT,
                                    capture_output=True, text=True).stdout
    helptext = run("distill", "--help")
    for flag in ("--teacher", "--student-steps", "--aux-per-gen", "--soft-target", "--top-p", "--form"):
        assert flag in helptext
    out = tmp_path / "student"
    result = json.loads(run("distill", "--teacher", teacher, "--student-steps", "2", "--batch-size", "8",
                            "--steps", "2", "--soft-target", "true", "--out", str(out), "--no-progress").strip())
    assert result["step"] == 2 and is_student(str(out / "checkpoint"))
    samples = tmp_path / "s.json"
    run("sample", "--checkpoint", str(out / "checkpoint"), "--steps", "2", "--num", "3", "--out", str(samples))
    got = json.loads(samples.read_text())["tokens"]
    assert len(got) == 3 and all(len(r) == 6 and all(0 <= v < 4 for v in r) for r in got)
    # The sampler draws the student's noise from the seed: reproducible.
    model, process, _ = load_student(str(out / "checkpoint"))
    a = sample(student_fn(model, 5), process, 4, 6, 2, seed=5)
    b = sample(student_fn(model, 5), process, 4, 6, 2, seed=5)
    assert torch.equal(a, b)
    assert make_source(tcfg.source).log_prob(a).shape == (4,)


@pytest.mark.parametrize("kind", ["masked", "uniform"])
def test_entropy_is_logged_per_coarse_step_with_the_noise_norm(kind):
    """``gen_entropy_by_step[j]``: the generator's output entropy where t lies in the student's
    sampling step j, (j/k, (j+1)/k]; empty steps are None; the overall mean is their mixture."""
    d, process, cfg, batch = _setup(kind, student_steps=3)
    _, stats = d.generator_loss(batch, 4)
    by = stats["gen_entropy_by_step"]
    assert len(by) == 3 and stats["noise_proj_norm"] >= 0
    steps = (torch.ceil(batch.t * 3).long() - 1).clamp(0, 2)
    for j in range(3):
        assert (by[j] is None) == (not bool((steps == j).any()))
    # all times in the middle step: only that bucket, equal to the overall mean
    batch.s, batch.t = torch.full_like(batch.s, 0.4), torch.full_like(batch.t, 0.5)
    _, stats = d.aux_loss(batch, 5)
    assert stats["gen_entropy_by_step"][0] is None and stats["gen_entropy_by_step"][2] is None
    assert stats["gen_entropy_by_step"][1] == pytest.approx(stats["gen_entropy"])
    # by hand: the mean entropy of the generator's rows where it has a choice
    with torch.no_grad():
        logp = torch.log_softmax(d.generator(batch.z_t, batch.t.float(), batch.noise).double(), -1)
    h = -(torch.where(logp > -math.inf, logp.exp() * logp, 0.0)).sum(-1)
    chosen = batch.z_t == process.mask_id if kind == "masked" else torch.ones_like(batch.z_t, dtype=torch.bool)
    assert stats["gen_entropy"] == pytest.approx(float(h[chosen].mean()), rel=1e-6)
    if kind == "masked":  # the default masked generator has a noise input, started at std 0.1
        norm = math.sqrt(sum(float(p.weight.square().sum()) for p in d.generator.noise_projections()))
        assert stats["noise_proj_norm"] == pytest.approx(norm) and norm > 0


def test_fused_soft_targets_made_chunk_by_chunk_give_the_same_loss(monkeypatch):
    # the fused auxiliary step makes the soft targets' probabilities a chunk of rows at a time
    # (never [rows, V] at once): chunks of 2 rows give eq. 12 as one chunk does
    import dmmd.training.distill.algorithm as algorithm

    d, process, cfg, batch = _setup("masked", fused_losses=True, soft_target=True, top_p=0.9)
    whole, _ = d.aux_loss(batch, 4)
    whole.backward()
    want = _grads(d.aux)
    d.aux.zero_grad()
    monkeypatch.setattr(algorithm, "chunk_rows_for", lambda vocab, models: 2)
    calls = []
    linear = algorithm.dmmd_ops.linear_aux_loss
    monkeypatch.setattr(algorithm.dmmd_ops, "linear_aux_loss", lambda *a, **k: calls.append(a[0].shape[0]) or
                        linear(*a, **k))
    chunked, _ = d.aux_loss(batch, 4)
    chunked.backward()
    assert len(calls) > 2 and max(calls) == 2
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    for g, h in zip(_grads(d.aux), want, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("fused", [False, True])
def test_draws_in_chunks_of_token_rows_stay_exact_and_independent_of_the_split(monkeypatch, fused):
    # a block's logits are made a chunk of token rows at a time (each chunk its own Philox
    # offset, the first the block's own): the first chunk draws as the whole block did, a
    # rank's rows draw what they draw in the whole batch, and the losses are still eq. 11/12
    import dmmd.training.distill.algorithm as algorithm

    d, process, cfg, batch = _setup("masked", fused_losses=fused)  # blocks of 3 sequences x 5 tokens
    _, whole, _ = d.generate(batch, 4)
    monkeypatch.setattr(algorithm, "DRAW_CHUNK_BYTES", 4 * process.num_classes * 4)  # 4 token rows
    _, x, z_s = d.generate(batch, 4)
    assert torch.equal(x.reshape(2, 15)[:, :4], whole.reshape(2, 15)[:, :4])  # chunk 0 of each block
    assert not torch.equal(x, whole) and int(x.max()) < process.mask_id
    half = batch.take(slice(3, 6), "cpu")  # the second block, as the second of two ranks holds it
    _, x_half, z_half = d.generate(half, 4)
    assert torch.equal(x_half, x[3:]) and torch.equal(z_half, z_s[3:])
    assert_step_matches_eq11_eq12(d, process, batch, step=4)


def test_two_process_fsdp_equals_one_process(tiny_teacher, tmp_path):
    """FSDP2 (generator, auxiliary model, EMA and teacher sharded per block) makes the steps one
    process makes; its checkpoint is written by both ranks and read whole by load_tensors."""
    from dmmd.training.sharding import is_sharded_checkpoint

    teacher, _ = tiny_teacher
    one, two = assert_ddp_equals_one_process(teacher, tmp_path, "--parallel", "fsdp")
    assert is_sharded_checkpoint(str(two / "checkpoint")) and not is_sharded_checkpoint(str(one / "checkpoint"))
    a, b = load_tensors(str(one / "checkpoint"), "ema"), load_tensors(str(two / "checkpoint"), "ema")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # the student as ordinary weights (rank 0 at the end): samples what the one-process student samples
    assert not is_sharded_checkpoint(str(two / "student"))
    (s1, process, _), (s2, _, _) = load_student(str(one / "checkpoint")), load_student(str(two / "student"))
    draws = [sample(student_fn(s, 3), process, 16, 6, 2, seed=3) for s in (s1, s2)]
    assert torch.equal(*draws)

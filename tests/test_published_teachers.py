"""Published diffusion teachers as they are published: a remote-code directory per family (MDLM,
DUO, LLaDA, Dream; BD3-LM refused by name), written here with the test's own tiny model that has
that family's model_type, auto_map, forward signature, time argument and output convention.
Nothing is downloaded and no third-party model code is used."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dmmd.apps.cli import main
from dmmd.diffusion.processes import DiffusionProcess, masked_output_rule
from dmmd.models.conventions import FAMILIES, resolve_conventions
from dmmd.training.distill import DistillConfig, Distiller, draw_batch
from dmmd.training.masked_lm import load_masked_lm, source_tokenizer
from tests.test_distill import _perturb, _Source, _teacher_logprobs, _xlogy

transformers = pytest.importorskip("transformers")

CONFIG_PY = '''
from transformers import PretrainedConfig


class TinyConfig(PretrainedConfig):
    model_type = "{model_type}"

    def __init__(self, vocab_size=8, hidden=8, model_length=16, extra_classes=0, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.model_length = model_length
        self.extra_classes = extra_classes
'''

MODEL_PY = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_tiny import TinyConfig


class TinyModel(PreTrainedModel):
    config_class = TinyConfig
    base_model_prefix = "tiny"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.pos = nn.Embedding(config.model_length, config.hidden)
        self.time = nn.Linear(1, config.hidden)
        self.mix = nn.Linear(2 * config.hidden, config.hidden)
        self.out = nn.Linear(config.hidden, config.vocab_size + config.extra_classes)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.5)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.normal_(0.0, 0.5)

    def body(self, input_ids, time=None):
        h = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        if time is not None:
            h = h + self.time(time.to(h.dtype)[:, None, None])
        h = torch.cat([h, h.mean(1, keepdim=True).expand_as(h)], -1)  # every position sees all of them
        return self.out(torch.tanh(self.mix(h)))

{forward}
'''

FORWARDS = {  # each family's forward signature and return value (from its public modelling code)
    "sigma": '''
    def forward(self, input_ids=None, timesteps=None, output_hidden_states=None, return_dict=None):
        if timesteps is None:
            timesteps = torch.zeros(input_ids.shape[0], device=input_ids.device)
        logits = self.body(input_ids, timesteps)
        return MaskedLMOutput(logits=logits) if return_dict else logits
''',
    "bd3lm": '''
    def forward(self, input_ids=None, timesteps=None, sample_mode=False, store_kv=False):
        # training interface: [x_t, x_0]; a block of x_t sees itself and the blocks of x_0 before it
        n = input_ids.shape[1] if sample_mode else input_ids.shape[1] // 2
        block = torch.arange(n, device=input_ids.device) // self.config.block_size
        same = (block[:, None] == block[None, :]).float()
        before = (block[None, :] < block[:, None]).float()
        e = self.embed(input_ids)  # one embedding call on the whole input, as BD3-LM's backbone makes
        et, e0 = (e, e) if sample_mode else (e[:, :n], e[:, n:])
        h = et + self.pos(torch.arange(n, device=input_ids.device)) + (same / same.sum(-1, keepdim=True)) @ et
        if timesteps is not None:
            h = h + self.time(timesteps.to(h.dtype)[:, None, None])
        context = (before / before.sum(-1, keepdim=True).clamp_min(1)) @ e0
        return self.out(torch.tanh(self.mix(torch.cat([h, context], -1))))
''',
    "noise_level": '''
    def forward(self, input_ids, noise_level):
        return self.body(input_ids, noise_level)
''',
    "none": '''
    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return MaskedLMOutput(logits=self.body(input_ids))
''',
}

# family -> (model_type as the family's config spells it, forward, auto classes, vocab, tokenizer)
FAMILY_DIRS = {
    "mdlm": ("mdlm", "sigma", ("AutoModelForMaskedLM",), 9, False),          # 8 tokens + the mask (last)
    "duo": ("DUO", "sigma", ("AutoModelForMaskedLM",), 8, False),            # uniform: no mask class
    "llada": ("llada", "none", ("AutoModel", "AutoModelForCausalLM"), 126464, False),  # mask 126336, padded
    "dream": ("Dream", "none", ("AutoModel",), 10, True),                    # shifted; mask from its tokenizer
    "bd3lm": ("bd3lm", "bd3lm", ("AutoModelForMaskedLM",), 9, False),   # blocks of 2, [x_t, x_0] input
    "fork": ("my-fork", "noise_level", ("AutoModelForMaskedLM",), 10, True),  # no known family: flags only
}


def write_family(root, family: str, *, extra_classes: int = 0, seed: int = 0) -> str:
    """A remote-code directory of a tiny random model of ``family`` (see FAMILY_DIRS)."""
    model_type, forward, autos, vocab, with_tokenizer = FAMILY_DIRS[family]
    path = os.path.join(str(root), f"{family}-teacher")
    os.makedirs(path)
    with open(os.path.join(path, "configuration_tiny.py"), "w") as f:
        f.write(CONFIG_PY.format(model_type=model_type))
    with open(os.path.join(path, "modeling_tiny.py"), "w") as f:
        f.write(MODEL_PY.format(forward=FORWARDS[forward]))
    hidden = 4 if vocab > 1000 else 8
    config = {"model_type": model_type, "vocab_size": vocab, "hidden": hidden, "model_length": 16,
              "extra_classes": extra_classes, "architectures": ["TinyModel"],
              **({"block_size": 2, "cross_attn": True} if family == "bd3lm" else {}),
              "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig",
                           **{auto: "modeling_tiny.TinyModel" for auto in autos}}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    model_cls = transformers.dynamic_module_utils.get_class_from_dynamic_module(
        "modeling_tiny.TinyModel", path, local_files_only=True)
    torch.manual_seed(seed)
    model = model_cls(transformers.AutoConfig.from_pretrained(path, trust_remote_code=True, local_files_only=True))
    model.save_pretrained(path)
    if with_tokenizer:
        source_tokenizer(vocab - 2).save_pretrained(path)  # ids 0 .. 7, [MASK] 8, [PAD] 9
    return path


DISTILL = ["--data", "markov", "--vocab-size", "4", "--length", "6", "--student-steps", "2", "--steps", "2",
           "--batch-size", "8", "--draw-block", "4", "--warmup", "1", "--save-every", "2", "--no-progress"]


@pytest.mark.parametrize("family", ["mdlm", "duo", "llada", "dream", "bd3lm"])
def test_each_family_distils_loads_with_its_own_call_and_samples(tmp_path, capsys, family):
    teacher = write_family(tmp_path, family)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", teacher, "--trust-remote-code", "--out", str(out), *DISTILL]) == 0
    err = capsys.readouterr().err
    expected = resolve_conventions(FAMILY_DIRS[family][0])
    assert f"teacher conventions: family {family}, {expected.process}" in err
    assert f"loaded by {FAMILY_DIRS[family][2][0]}" in err
    student = str(out / "student")
    meta = json.load(open(os.path.join(student, "dmmd.json")))
    assert meta["kind"] == "student" and meta["process"] == expected.process
    assert meta["conventions"]["time_input"] == expected.time_input
    assert meta["conventions"]["shift_logits"] == expected.shift_logits
    # the student loads with the call the family's users make for the teacher
    auto = getattr(transformers, FAMILY_DIRS[family][2][0])
    loaded = auto.from_pretrained(student, trust_remote_code=True, local_files_only=True)
    assert type(loaded).__name__ == "TinyModel"
    weights = dict(loaded.named_parameters())
    model, _, _ = load_masked_lm(student, trust_remote_code=True)
    for name, p in model.model.named_parameters():
        assert torch.equal(p, weights[name]), name
    assert model.noise_proj is not None or expected.process == "uniform"
    samples = tmp_path / "samples.json"
    assert main(["sample", "--checkpoint", student, "--trust-remote-code", "--steps", "2", "--num", "3",
                 "--out", str(samples)]) == 0
    tokens = torch.tensor(json.load(open(samples))["tokens"])
    assert tokens.shape == (3, 6)
    if expected.process == "masked":
        assert not (tokens == model.config.mask_id).any()


def test_remote_code_without_the_flag_is_refused_in_one_line_and_writes_nothing(tmp_path, capsys):
    teacher = write_family(tmp_path, "mdlm")
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["distill", "--teacher", teacher, "--out", str(out), *DISTILL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--trust-remote-code" in err and "mdlm" in err
    assert not out.exists()
    assert main(["sample", "--checkpoint", teacher, "--steps", "2", "--length", "6"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err


def _subs(logits: torch.Tensor, z: torch.Tensor, mask_id: int) -> torch.Tensor:
    return masked_output_rule(logits.double(), z, mask_id)


def test_a_sigma_teacher_is_called_with_minus_log_alpha_t(tmp_path):
    teacher = write_family(tmp_path, "mdlm")
    model, _, meta = load_masked_lm(teacher, trust_remote_code=True)
    assert meta["conventions"]["family"] == "mdlm" and meta["loaded_by"] == "AutoModelForMaskedLM"
    assert model.config.mask_id == 8 and meta["schedule"] == "loglinear"
    torch.manual_seed(1)
    z = torch.randint(0, 9, (3, 6))
    z[:, :2] = 8
    t = torch.tensor([0.05, 0.5, 0.97])
    sigma = -torch.log1p(-(1 - 1e-3) * t.double())  # MDLM's log-linear schedule, in float64
    got = model(z, t)
    want = _subs(model.model(input_ids=z, timesteps=sigma.float()), z, 8)
    assert torch.allclose(got.double(), want, atol=1e-5)
    wrong = _subs(model.model(input_ids=z, timesteps=t), z, 8)  # t passed as sigma: not what the teacher means
    assert not torch.allclose(got.double(), wrong, atol=1e-3)


def test_a_shifted_teacher_is_realigned(tmp_path):
    teacher = write_family(tmp_path, "dream")
    model, tokenizer, meta = load_masked_lm(teacher, trust_remote_code=True)
    assert meta["loaded_by"] == "AutoModel" and model.config.shift_logits
    assert model.config.mask_id == tokenizer.mask_token_id == 8 and model.config.never == []
    torch.manual_seed(2)
    z = torch.randint(0, 8, (2, 6))
    z[:, 1:4] = 8
    raw = model.model(z).logits.double()
    realigned = torch.cat([raw[:, :1], raw[:, :-1]], 1)  # position i's prediction is output i - 1
    got = model(z, torch.rand(2)).double()
    assert torch.allclose(got, _subs(realigned, z, 8), atol=1e-5)
    assert not torch.allclose(got, _subs(raw, z, 8), atol=1e-3)


def test_family_conventions_and_flags_for_an_unknown_model(tmp_path):
    assert FAMILIES["llada"].mask_id == 126336 and FAMILIES["duo"].process == "uniform"
    # the flags alone describe a model of no known family
    conv = resolve_conventions("my-diffusion-lm", time_input="sigma", time_arg="noise_level", shift_logits=True,
                               schedule="loglinear", mask_id=3)
    assert (conv.family, conv.time_input, conv.time_arg, conv.shift_logits, conv.mask_id) == \
        ("", "sigma", "noise_level", True, 3)
    # a flag overrides the family
    assert not resolve_conventions("Dream", shift_logits=False).shift_logits
    assert resolve_conventions("mdlm", time_input="none").time_arg == ""


def test_bad_teachers_are_named_in_one_line(tmp_path, capsys):
    wide = write_family(tmp_path / "wide", "mdlm", extra_classes=3)
    duo = write_family(tmp_path / "duo", "duo")
    bd3 = write_family(tmp_path / "bd3", "bd3lm")
    mdlm = write_family(tmp_path / "mdlm", "mdlm")
    capsys.readouterr()
    cases = [
        ([wide], "its logits have 12 classes, matching neither the config's vocab_size (9)"),
        ([duo, "--mask-id", "3"], "uniform-state"),
        ([bd3, "--length", "7"], "blocks of 2 tokens (its block_size); 7 is not a whole number of blocks"),
        ([mdlm, "--mask-id", "40"], "mask_id 40 is outside the vocabulary"),
        ([mdlm, "--time-input", "sigma", "--schedule", "linear"], "sigma = -log alpha_t is infinite"),
        ([mdlm, "--time-arg", "noise_level"], "noise_level"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        code = main(["distill", "--teacher", extra[0], "--trust-remote-code", "--out", str(out), *DISTILL,
                     *extra[1:]])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (extra, err)
        assert not out.exists()


def test_conventions_describe_every_value():
    line = FAMILIES["mdlm"].describe()
    assert "sigma as timesteps" in line and "loglinear" in line and "aligned" in line
    assert len(line.split(", ")) == 6 and "loaded by" not in line


def _raw_teacher(model, family: str, z: torch.Tensor, s: torch.Tensor, *, right: bool = True) -> torch.Tensor:
    """The family's teacher called as its own code is, written out (``right=False``: t passed as
    sigma, or the logits left unshifted), with the never-drawn classes and the carry-over rule."""
    raw = model.model
    if family == "mdlm":
        # (in float32, as the distiller's times are)
        sigma = -torch.log(1 - (1 - 1e-3) * s.float().double()) if right else s.double()
        logits = raw(input_ids=z, timesteps=sigma.float())
    else:
        logits = raw(z).logits
        if right:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
    logits = logits.double().index_fill(-1, torch.tensor(model.config.never, dtype=torch.long), float("-inf"))
    return masked_output_rule(logits, z, model.config.mask_id)


@pytest.mark.parametrize("family", ["mdlm", "dream"])
def test_one_step_losses_equal_eq11_and_eq12_with_the_familys_call_written_out(tmp_path, family):
    """Eq. 11 and eq. 12 in float64 with the teacher called as its family's code is (MDLM: sigma =
    -log alpha_t as timesteps; Dream: logits realigned); the same with t passed as sigma, or the
    shift left out, does not match (the check can fail)."""
    teacher, _, meta = load_masked_lm(write_family(tmp_path, family), trust_remote_code=True)
    teacher = teacher.double()
    process = DiffusionProcess.of(teacher.config, meta["schedule"])
    # eq. 12 with its teacher term (the masked default leaves it out): the aux loss calls the teacher too
    cfg = DistillConfig.from_dict({"batch_size": 6, "student_steps": 2, "draw_block": 3, "seed": 3,
                                   "aux_teacher_weight": 1.0})
    d = Distiller(teacher, process, cfg)
    _perturb(d.generator, 0.2, 1)
    _perturb(d.aux, 0.2, 2)
    batch = draw_batch(_Source(8, 5), process, d.cfg, d.noise, step=4)
    gen_loss, _ = d.generator_loss(batch, 4)
    aux_loss, _ = d.aux_loss(batch, 4)
    with torch.no_grad():
        _, x, z_s = d.generate(batch, 4)
        u = d.generator(batch.z_t, batch.t.float(), batch.noise)
        b = d.aux(z_s, batch.s.float())
    rows = z_s == process.mask_id
    assert rows.any() and (~rows).any()
    p, la = torch.softmax(u[rows], -1), torch.log_softmax(b[rows], -1)

    def by_hand(right: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            a = _raw_teacher(teacher, family, z_s, batch.s, right=right)
        lt = _teacher_logprobs(a[rows], cfg.temperature, cfg.top_p, cfg.delta)
        gen = -(_xlogy(p, lt) - _xlogy(p, la)).sum(-1).sum() / z_s.numel()
        target = p if d.cfg.soft_target else torch.nn.functional.one_hot(x[rows], process.num_classes).double()
        aux = -(_xlogy(target, la) + _xlogy(lt.exp(), la)).sum(-1).sum() / z_s.numel()
        return gen, aux

    gen, aux = by_hand(right=True)
    torch.testing.assert_close(gen_loss.detach().double(), gen, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux_loss.detach().double(), aux, rtol=1e-10, atol=1e-12)
    wrong_gen, wrong_aux = by_hand(right=False)
    assert abs(float(wrong_gen - gen)) > 1e-4 and abs(float(wrong_aux - aux)) > 1e-4


README_TEACHERS = {"mdlm-owt": "mdlm", "bd3lm-owt": "bd3lm", "duo-owt": "duo", "LLaDA-8B-Base": "llada",
                   "Dream-v0-Base-7B": "dream", "my-fork": "fork"}


def test_the_readme_commands_for_published_teachers_run(tmp_path, monkeypatch, capsys):
    """Each command of the README's "Distill MDLM / BD3-LM / DUO / LLaDA / Dream", on the tiny
    model of its family, with our small data and two steps instead of the user's data and run."""
    import re
    import shlex

    from tests.test_readme_examples import _blocks, _section

    (script,) = _blocks(_section("Distill MDLM / BD3-LM / DUO / LLaDA / Dream"), "bash")
    commands = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 7
    dirs = {name: write_family(tmp_path / name, family) for name, family in README_TEACHERS.items()}
    monkeypatch.chdir(tmp_path)
    for command in commands:
        for name, path in dirs.items():
            command = command.replace(f"path/to/{name}", path)
        assert "path/to/" not in command, command
        argv = shlex.split(command)[1:]
        if argv[0] == "distill":
            command = re.sub(r"--data \S+ --vocab-size \d+ --length \d+", "--data markov --vocab-size 4 --length 6",
                             " ".join(argv))
            argv = [*command.split(), "--steps", "2", "--batch-size", "8", "--draw-block", "4", "--warmup", "1",
                    "--save-every", "2", "--no-progress"]
        assert main(argv) == 0, (argv, capsys.readouterr().err[-2000:])
    runs = ["bd3lm_k4", "dream_k16", "duo_k8", "fork_k4", "llada_k16", "mdlm_k8"]
    assert sorted(os.listdir(tmp_path / "runs")) == runs


class _Counting:
    """Sequences that count modulo V from a random start: each token follows from its neighbour."""

    def __init__(self, v: int, length: int):
        self.vocab_size, self.length = v, length

    def sample(self, batch, generator, split="train"):
        start = torch.randint(0, self.vocab_size, (batch, 1), generator=generator)
        return (start + torch.arange(self.length)) % self.vocab_size


class _Oracle(torch.nn.Module):
    """A trained model of the counting data: output i predicts token i from token i - 1
    (aligned), or token i + 1 from token i (shifted, as Dream's outputs are)."""

    def __init__(self, v: int, shifted: bool):
        super().__init__()
        self.v, self.shifted = v, shifted
        self.scale = torch.nn.Parameter(torch.tensor(8.0))

    def forward(self, ids):
        known = ids if self.shifted else torch.roll(ids, 1, dims=1)
        return self.scale * torch.nn.functional.one_hot((known + 1) % self.v, self.v + 1).float()


@pytest.mark.parametrize("shifted", [False, True])
def test_a_teacher_read_with_the_wrong_alignment_is_refused(shifted):
    from dmmd.models.external import ExternalConfig, ExternalDenoiser
    from dmmd.training.distill.teachers import check_alignment

    source = _Counting(6, 8)

    def wrapped(model, shift):
        return ExternalDenoiser(model, ExternalConfig(num_classes=7, mask_id=6, time_input=False, shift_logits=shift))

    check_alignment(wrapped(_Oracle(6, shifted), shifted), source, "oracle")  # read as it is: fine
    with pytest.raises(ValueError, match=f"looks {'shifted' if shifted else 'aligned'}.*--shift-logits "
                                         f"{'true' if shifted else 'false'}"):
        check_alignment(wrapped(_Oracle(6, shifted), not shifted), source, "oracle")
    torch.manual_seed(0)
    untrained = torch.nn.Sequential(torch.nn.Embedding(7, 8), torch.nn.Linear(8, 7))
    check_alignment(wrapped(untrained, not shifted), source, "untrained")  # nothing to judge by: not refused


def test_a_published_teachers_run_resumes_and_refuses_other_conventions(tmp_path, capsys):
    teacher = write_family(tmp_path, "mdlm")
    out = tmp_path / "run"
    args = ["distill", "--teacher", teacher, "--trust-remote-code", "--out", str(out), *DISTILL]
    assert main(args) == 0
    assert main([*args, "--steps", "4"]) == 0  # the same run, continued
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert json.load(open(out / "student" / "dmmd.json"))["step"] == 4
    capsys.readouterr()
    assert main([*args, "--steps", "6", "--time-input", "t"]) == 2  # another reading of the teacher: another run
    err = capsys.readouterr().err
    assert "time_input" in err and len(err.strip().splitlines()) == 1


def test_a_block_diffusion_teacher_is_distilled_block_by_block(tmp_path):
    """BD3-LM: called through its [x_t, x_0] interface with z_t as both halves (the blocks before
    a noisy one are clean), one block per sequence diffused in each batch, sampled block by block."""
    teacher, _, meta = load_masked_lm(write_family(tmp_path, "bd3lm"), trust_remote_code=True)
    cfg_t = teacher.config
    assert (cfg_t.block_size, cfg_t.clean_context, cfg_t.mask_id) == (2, True, 8)
    torch.manual_seed(3)
    z = torch.randint(0, 8, (3, 6))
    z[:, 2:] = 8  # block 0 clean, blocks 1 and 2 masked
    t = torch.tensor([0.2, 0.6, 0.9])
    sigma = (-torch.log(1 - (1 - 1e-3) * t.double())).float()
    raw = teacher.model(torch.cat([z, z], 1), sigma).double()
    torch.testing.assert_close(teacher(z, t).double(), _subs(raw, z, 8))
    # block 1's logits do not depend on block 2 (block-causal): a sampler's masked later blocks are harmless
    later = z.clone()
    later[:, 4:] = 3
    torch.testing.assert_close(teacher(z, t)[:, :4], teacher(later, t)[:, :4])

    process = DiffusionProcess.of(cfg_t, meta["schedule"])
    cfg = DistillConfig.from_dict({"batch_size": 16, "student_steps": 2, "draw_block": 4, "seed": 5})
    batch = draw_batch(_Source(8, 6), process, cfg, None, step=3, block_size=2)
    changed = (batch.z_t != batch.x0).reshape(16, 3, 2).any(-1)
    assert changed.sum(-1).le(1).all() and changed.any()  # one noisy block per sequence at most
    with pytest.raises(ValueError, match="whole number of blocks of 4"):
        draw_batch(_Source(8, 6), process, cfg, None, step=3, block_size=4)


def test_a_remote_code_students_run_checkpoint_points_to_its_directory(tmp_path, capsys):
    teacher = write_family(tmp_path, "mdlm")
    out = tmp_path / "run"
    assert main(["distill", "--teacher", teacher, "--trust-remote-code", "--out", str(out), *DISTILL]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(out / "checkpoint"), "--trust-remote-code", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "OUT/student" in err and len(err.strip().splitlines()) == 1

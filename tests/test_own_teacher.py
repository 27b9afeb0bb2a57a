"""Bring your own teacher: a transformers masked LM (a tiny ``BertForMaskedLM`` whose config is
made here, trained by ``dmmd train-teacher --model-config`` on the embedded text) and a plain
module without a time input, distilled through the same distiller: one step's gradients equal
eq. 11 / eq. 12 written by hand, the noise projection installed from outside changes outputs
only when non-zero, save / load / sample round-trip identically, 2-process DDP (gloo) equals one
process, bad input is refused by name."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from dmmd.apps.cli import main
from dmmd.data import MarkovSource
from dmmd.diffusion.processes import DiffusionProcess
from dmmd.diffusion.sampling import sample
from dmmd.models import ExternalDenoiser, as_denoiser
from dmmd.training.checkpoint import load_tensors
from dmmd.training.distill import (
    DistillConfig,
    Distiller,
    distill,
    distill_model,
    draw_batch,
    is_student,
    load_distill_teacher,
    load_student,
    student_fn,
)
from dmmd.training.masked_lm import load_masked_lm
from dmmd.training.teacher import TeacherConfig, train_teacher
from tests.test_distill import _perturb, assert_ddp_equals_one_process, assert_step_matches_eq11_eq12

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 32, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}


def _dmmd(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "dmmd", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          **kw)


def _refused_by_a_process(*args) -> str:
    """``dmmd ARGS`` as its own process: it must exit with status 2 and one line on stderr, which
    is returned."""
    r = _dmmd(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def _refused(capsys, *args) -> str:
    """``dmmd ARGS`` run in this process (one subprocess per test shows the real command's
    stderr; the rest need no interpreter start-up each): it must exit with status 2 and one line
    on stderr, which is returned."""
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory):
    """A tiny BertForMaskedLM trained for 60 steps as a masked-diffusion teacher on the embedded
    text: its run directory (OUT/model is the transformers directory)."""
    out = tmp_path_factory.mktemp("bert_teacher")
    config = out / "bert.json"
    config.write_text(json.dumps(BERT))
    cfg = TeacherConfig.from_dict(dict(model_config=str(config), data="text", length=16, batch_size=16, steps=60,
                                       lr=3e-3, warmup=5, eval_every=0, save_every=60, out=str(out / "run")))
    result = train_teacher(cfg, progress=False)
    assert result["model"] == str(out / "run" / "model")
    return out / "run"


def test_bert_teacher_trains_as_masked_diffusion(bert_teacher):
    log = [json.loads(line) for line in open(bert_teacher / "log.jsonl")]
    first, last = (sum(r["loss"] for r in part) / len(part) for part in (log[:10], log[-10:]))
    assert last < 0.8 * first  # it learns
    model, tokenizer, meta = load_masked_lm(str(bert_teacher / "model"))
    assert isinstance(model.model, transformers.BertForMaskedLM)
    assert tokenizer.mask_token_id == 256 == model.config.mask_id  # 256 bytes, then the mask, then padding
    assert model.config.num_classes == 258 and model.config.never == [257]
    assert meta["kind"] == "teacher" and meta["source"]["data"] == "text" and meta["source"]["length"] == 16
    z = torch.full((2, 16), 256)
    z[:, 3] = 65
    logits = model(z, torch.rand(2))
    assert logits.shape == (2, 16, 258) and logits.dtype == torch.float32
    assert torch.isneginf(logits[..., 256]).all() and torch.isneginf(logits[..., 257]).all()  # never drawn
    assert (logits[:, 3].argmax(-1) == 65).all() and torch.isfinite(logits[:, 3]).sum() == 2  # carried over
    # the dmmd checkpoint of the same run rebuilds the same model
    from dmmd.training.teacher import load_teacher

    same, process, _ = load_teacher(str(bert_teacher / "checkpoint"))
    torch.testing.assert_close(same(z, torch.rand(2)), logits, rtol=0, atol=0)
    assert process.kind == "masked" and process.mask_id == 256


@pytest.mark.parametrize("config", [{"model_type": "roberta"}, {"model_type": "modernbert", "global_rope_theta": 1e4,
                                                                 "local_attention": 8}])
def test_other_masked_lm_architectures_train_distill_and_sample(config, tmp_path):
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    (tmp_path / "c.json").write_text(json.dumps({**small, **config}))
    cfg = TeacherConfig.from_dict(dict(model_config=str(tmp_path / "c.json"), data="markov", vocab_size=6, length=8,
                                       batch_size=8, steps=3, eval_every=0, out=str(tmp_path / "teacher")))
    result = train_teacher(cfg, progress=False)
    model, tokenizer, _ = load_masked_lm(result["model"])
    assert type(model.model).__name__.lower().startswith(config["model_type"]) and tokenizer.mask_token_id == 6
    out = distill(DistillConfig.from_dict(dict(teacher=result["model"], student_steps=2, steps=2, batch_size=4,
                                               out=str(tmp_path / "student"))), progress=False)
    student, process, _ = load_student(out["student"])
    x = sample(student_fn(student, 0), process, 4, 8, 2, seed=0)
    assert x.shape == (4, 8) and int(x.max()) < 6


def _bert_distiller(bert_teacher, **kw):
    cfg = DistillConfig.from_dict(dict(teacher=str(bert_teacher / "model"), batch_size=6, student_steps=2,
                                       draw_block=3, seed=3, **kw))
    teacher = load_distill_teacher(cfg)
    teacher.model.double()
    d = Distiller(teacher.model, teacher.process, cfg)
    _perturb(d.generator, 0.2, 1)
    _perturb(d.aux, 0.2, 2)
    return d, teacher


@pytest.mark.parametrize("kw", [{}, {"soft_target": False, "top_p": 0.8, "temperature": 0.7, "noise_per": "token"},
                                {"fused_losses": True}, {"fused_losses": True, "soft_target": False, "top_p": 0.8}])
def test_bert_one_step_gradients_equal_eq11_and_eq12(bert_teacher, kw):
    """Whole logits, or (fused_losses) the fused linear losses on BERT's hidden states and its
    output embeddings."""
    d, teacher = _bert_distiller(bert_teacher, **kw)
    assert d.fused == kw.get("fused_losses", False)
    assert d.noise.dim == 32 and d.generator.noise_proj is not None  # masked: noise on by default
    batch = draw_batch(teacher.source, teacher.process, d.cfg, d.noise, 4)
    assert_step_matches_eq11_eq12(d, teacher.process, batch, step=4)
    d.generator.zero_grad()
    loss, _ = d.generator_loss(batch, 4)
    loss.backward()
    assert float(d.generator.noise_proj[0].weight.grad.abs().sum()) > 0  # the noise projection learns


def test_noise_projection_changes_outputs_only_when_nonzero(bert_teacher):
    teacher, _, _ = load_masked_lm(str(bert_teacher / "model"))
    gen = load_masked_lm(str(bert_teacher / "model"))[0]
    gen.install_noise(8, "token", module="bert.embeddings,bert.encoder.layer.0")
    assert len(gen.noise_projections()) == 2
    z = torch.full((3, 16), 256)
    z[:, ::3] = 70
    t = torch.rand(3)
    noise = torch.randn(3, 16, 8)
    base = teacher(z, t)
    torch.testing.assert_close(gen(z, t, noise), base, rtol=0, atol=0)  # zero projections: the teacher
    with torch.no_grad():
        gen.noise_proj[1].weight.normal_()
    assert not torch.equal(gen(z, t, noise), base)
    with pytest.raises(ValueError, match=r"noise: this model takes Gaussian noise \[B, L, 8\]"):
        gen(z, t, None)  # not silently the teacher
    torch.testing.assert_close(gen(z, t, torch.zeros_like(noise)), base, rtol=0, atol=0)
    torch.testing.assert_close(teacher(z, t), base, rtol=0, atol=0)  # the teacher is untouched


def test_bert_distill_save_load_sample_round_trip(bert_teacher, tmp_path):
    out = tmp_path / "student"
    result = _dmmd("distill", "--teacher", str(bert_teacher / "model"), "--student-steps", "2", "--steps", "4",
                   "--batch-size", "8", "--save-every", "4", "--out", str(out), "--no-progress", check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["student"] == str(out / "student")
    assert is_student(str(out / "student")) and is_student(str(out / "checkpoint"))
    # what each directory holds, decided in one place
    from dmmd.training import artifacts

    kinds = {p: artifacts.inspect(str(p)).kind for p in (out / "student", out / "checkpoint", bert_teacher / "model",
                                                        bert_teacher / "checkpoint")}
    assert list(kinds.values()) == [artifacts.TRANSFORMERS_STUDENT, artifacts.STUDENT, artifacts.TRANSFORMERS,
                                    artifacts.TEACHER]
    with pytest.raises(ValueError, match=r"is not a D-MMD student \(a transformers directory"):
        load_student(str(bert_teacher / "model"))
    assert {"config.json", "model.safetensors", "noise.safetensors", "dmmd.json", "tokenizer.json"} <= \
        set(os.listdir(out / "student"))
    # one call loads the transformers directory; it is the checkpoint's EMA generator
    from_dir, process, meta = load_student(str(out / "student"))
    from_ckpt, process2, _ = load_student(str(out / "checkpoint"))
    assert isinstance(from_dir.model, transformers.BertForMaskedLM) and meta["student_steps"] == 2
    ema = load_tensors(str(out / "checkpoint"), "ema")
    for k, v in from_dir.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert not all(torch.equal(v, load_tensors(str(bert_teacher / "checkpoint"), "ema")[k])
                   for k, v in from_dir.state_dict().items() if not k.startswith("noise_proj"))  # it trained
    a = sample(student_fn(from_dir, 5), process, 6, 16, 2, seed=9)
    b = sample(student_fn(from_ckpt, 5), process2, 6, 16, 2, seed=9)
    assert torch.equal(a, b)
    cli = _dmmd("sample", "--checkpoint", str(out / "student"), "--steps", "2", "--num", "6", "--seed", "5",
                "--out", str(tmp_path / "s.json"), check=True)
    assert cli.returncode == 0
    drawn = torch.tensor(json.load(open(tmp_path / "s.json"))["tokens"])
    assert drawn.shape == (6, 16) and drawn.max() < 256  # bytes only: never the mask or padding
    assert torch.equal(drawn, sample(student_fn(from_dir, 5), process, 6, 16, 2, seed=5))


@pytest.mark.parametrize("fused", ["false", "true"])
def test_bert_two_process_ddp_equals_one_process(bert_teacher, tmp_path, fused):
    assert_ddp_equals_one_process(str(bert_teacher / "model"), tmp_path, "--fused-losses", fused)


def test_bert_two_process_fsdp_equals_one_process_and_exports_its_student(bert_teacher, tmp_path):
    """FSDP2 shards BERT per layer (its _no_split_modules); the student directory it writes at
    the end, gathered on rank 0, is the one process's."""
    one, two = assert_ddp_equals_one_process(str(bert_teacher / "model"), tmp_path, "--parallel", "fsdp")
    a, _, _ = load_masked_lm(str(one / "student"))
    b, _, _ = load_masked_lm(str(two / "student"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
    process = DiffusionProcess.of(a.config, "linear")
    draws = [sample(student_fn(m, 3), process, 16, 16, 2, seed=3) for m in (a, b)]
    assert torch.equal(*draws)  # the exported students sample alike


# ---------------------------------------------------------------- a module of the user's own

V, L = 4, 6


class TimeFreeNet(nn.Module):
    """A user's masked LM: token ids in, logits out, no time input."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.embed = nn.Embedding(V + 1, width)
        self.pos = nn.Parameter(0.02 * torch.randn(L, width))
        layer = nn.TransformerEncoderLayer(width, 2, 4 * width, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, V + 1)

    def forward(self, ids):
        return self.head(self.body(self.embed(ids) + self.pos[: ids.shape[1]]))


def _train_by_hand(teacher, process, source, steps, seed=0):
    """The user's own teacher training (any masked-diffusion objective would do)."""
    opt = torch.optim.AdamW(teacher.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = source.sample(256, g)
        t = torch.rand(256, dtype=torch.float64, generator=g).clamp_min(1e-3)
        z = process.diffuse(x, t, g)
        loss = process.teacher_loss(teacher(z, t.float()), x, z, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval()


def test_own_module_without_time_input_beats_its_own_teacher(tmp_path):
    from dmmd.metrics import total_variation

    torch.manual_seed(0)
    source = MarkovSource(V, L, fanout=2)
    process = DiffusionProcess("masked", V + 1, "linear")
    teacher = as_denoiser(TimeFreeNet(), num_classes=V + 1)
    assert not teacher.config.time_input  # told from forward(ids)
    _train_by_hand(teacher, process, source, 600)
    # 500 steps: TV 0.171 against the teacher's 0.321 (1000 steps: 0.155)
    cfg = DistillConfig.from_dict(dict(student_steps=2, steps=500, batch_size=256, save_every=500, lr_gen=1e-3,
                                       out=str(tmp_path / "student")))
    result = distill_model(teacher, process, source, cfg, progress=False)
    student, process2, state = load_student(result["checkpoint"], model=TimeFreeNet())
    assert isinstance(student, ExternalDenoiser) and state["model_kind"] == "module"
    with torch.no_grad():
        tv_teacher = total_variation(sample(teacher, process, 20_000, L, 2, seed=1), source)
        tv_student = total_variation(sample(student_fn(student, 2), process2, 20_000, L, 2, seed=1), source)
    print(f"TV at 2 steps: teacher {tv_teacher}, student {tv_student}")
    assert tv_teacher.value > 0.2
    assert tv_student.value < 0.75 * tv_teacher.value


@pytest.mark.parametrize("fused", [False, True])
def test_own_module_one_step_gradients_equal_eq11_and_eq12(fused):
    torch.manual_seed(1)
    net = TimeFreeNet(width=16).double()
    _perturb(net, 0.3, 4)
    teacher = as_denoiser(net, num_classes=V + 1, head="head")
    process = DiffusionProcess("masked", V + 1, "linear")
    cfg = DistillConfig.from_dict(dict(batch_size=6, student_steps=2, draw_block=3, seed=3, fused_losses=fused,
                                       noise_module="body.layers.0"))
    d = Distiller(teacher, process, cfg)
    assert d.fused == fused and len(d.generator.noise_projections()) == 1
    _perturb(d.generator, 0.2, 1)
    _perturb(d.aux, 0.2, 2)
    batch = draw_batch(MarkovSource(V, L, fanout=2), process, d.cfg, d.noise, 4)
    assert_step_matches_eq11_eq12(d, process, batch, step=4)


class FixedLengthNet(nn.Module):
    """A user's model that takes exactly ``L`` tokens (a whole-sequence MLP: its first layer reads
    the flattened embeddings, so another length fails inside the model)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(V + 1, width)
        self.mix = nn.Linear(L * width, L * width)
        self.pool = nn.Linear(L * width, 16)  # a per-sequence summary: [B, 16], no token axis
        self.head = nn.Linear(width + 16, V + 1)
        self.width = width

    def forward(self, ids):
        b = ids.shape[0]
        e = self.embed(ids).reshape(b, -1)
        h = self.mix(e).reshape(b, L, self.width)
        summary = self.pool(e).unsqueeze(1).expand(b, L, 16)
        return self.head(torch.cat([h, summary], -1))


def test_noise_for_a_fixed_length_model_is_installed_with_its_length():
    # the probe that finds the projections' widths used 2 tokens: a fixed-length model failed
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"probe call .* 2 tokens\) failed \(a model that takes a fixed number of "
                                         r"tokens: give it as as_denoiser\(\.\.\., length=L\)\)"):
        as_denoiser(FixedLengthNet(), num_classes=V + 1).install_noise(4, "token")
    gen = as_denoiser(FixedLengthNet(), num_classes=V + 1, length=L)
    gen.install_noise(4, "token", init=0.5, generator=torch.Generator().manual_seed(0))
    assert gen.noise_projections()[0].weight.shape == (8, 4)
    z, t = torch.full((3, L), V), torch.rand(3)
    noise = torch.randn(3, L, 4)
    assert not torch.equal(gen(z, t, noise), gen(z, t, torch.zeros_like(noise)))  # the noise reaches the output
    # and the distiller builds a generator for it (the probe happens there too)
    d = Distiller(as_denoiser(FixedLengthNet(), num_classes=V + 1, length=L),
                  DiffusionProcess("masked", V + 1, "linear"),
                  DistillConfig.from_dict({"batch_size": 4, "draw_block": 2}))
    assert len(d.generator.noise_projections()) == 1


def test_noise_into_a_module_without_per_token_output_is_refused_by_name():
    wrapped = as_denoiser(FixedLengthNet(), num_classes=V + 1, length=L)
    with pytest.raises(ValueError, match=r"noise_module: pool \(Linear\) outputs shape \[1, 16\] for one sequence of 6 "
                                         r"tokens; the noise is added per token, so it needs \[B, L, width\] = "
                                         r"\[1, 6, width\]"):
        wrapped.install_noise(4, "token", module="pool")
    assert wrapped.noise_proj is None and wrapped.config.noise_dim == 0  # nothing half-installed


# ---------------------------------------------------------------- bad input, named

def test_wrong_logits_shape_and_mask_outside_the_vocabulary_are_refused():
    net = TimeFreeNet()
    bad = as_denoiser(lambda ids: net(ids)[..., :V], num_classes=V + 1)
    with pytest.raises(ValueError, match=r"logits of shape \(2, 6, 4\); expected \[B, L, V\] = \[2, 6, 5\]"):
        bad(torch.zeros(2, L, dtype=torch.long), torch.rand(2))
    with pytest.raises(ValueError, match="mask_id 5 is outside the model's vocabulary of 5"):
        as_denoiser(net, num_classes=V + 1, mask_id=V + 1)
    with pytest.raises(ValueError, match="noise_module: the model has no submodule 'nope'"):
        as_denoiser(net, num_classes=V + 1).install_noise(4, module="nope")
    with pytest.raises(ValueError, match="uniform diffusion draws every class"):
        as_denoiser(net, num_classes=V + 1, process="uniform", never=[4])
    process = DiffusionProcess("masked", V + 2, "linear")
    with pytest.raises(ValueError, match="the teacher .5 classes, mask 4. and the process .6 classes, mask 5."):
        Distiller(as_denoiser(net, num_classes=V + 1), process, DistillConfig())
    with pytest.raises(ValueError, match="model: a TimeFreeNet is not a denoiser yet; wrap it first"):
        distill_model(net, DiffusionProcess("masked", V + 1, "linear"), MarkovSource(V, L), DistillConfig())
    with pytest.raises(ValueError, match="fused_losses: the teacher exposes no output layer"):
        Distiller(as_denoiser(net, num_classes=V + 1), DiffusionProcess("masked", V + 1, "linear"),
                  DistillConfig(fused_losses=True))
    with pytest.raises(ValueError, match="head: 'body' is not an nn.Linear to the model's 5 classes"):
        as_denoiser(net, num_classes=V + 1, head="body").output_head()
    with pytest.raises(ValueError, match="noise_into='blocks' is for dmmd's own denoiser"):
        Distiller(as_denoiser(net, num_classes=V + 1), DiffusionProcess("masked", V + 1, "linear"),
                  DistillConfig(noise_into="blocks"))


def test_bad_transformers_directories_are_refused_by_name(bert_teacher, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no transformers model"):
        load_masked_lm(str(empty))
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=20, n_positions=8, n_layer=1, n_embd=8,
                                                         n_head=2, bos_token_id=0,
                                                         eos_token_id=0)).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="holds a gpt2 model, which is not a masked LM"):
        load_masked_lm(str(gpt2))
    with pytest.raises(ValueError, match="mask_id 999 is outside the vocabulary"):
        load_masked_lm(str(bert_teacher / "model"), mask_id=999)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(bert_teacher / "model", mismatched)
    from dmmd.training.masked_lm import source_tokenizer

    source_tokenizer(300).save_pretrained(mismatched)  # 302 tokens for a model of 258 classes
    with pytest.raises(ValueError, match="its tokenizer has 302 tokens but the model outputs 258 classes"):
        load_masked_lm(str(mismatched))
    no_mask = tmp_path / "no_mask"
    shutil.copytree(bert_teacher / "model", no_mask)
    for name in ("tokenizer.json", "tokenizer_config.json", "dmmd.json"):
        os.remove(no_mask / name)
    with pytest.raises(ValueError, match="pass the mask id"):
        load_masked_lm(str(no_mask))
    with pytest.raises(ValueError, match="data: give the data to distil"):
        distill(DistillConfig.from_dict(dict(teacher=str(no_mask), mask_id=256, out=str(tmp_path / "x"))))
    # on the command line: one line naming it, before any work (the first as its own process)
    never = ["--out", str(tmp_path / "never"), "--no-progress"]
    assert "not a masked LM" in _refused_by_a_process("distill", "--teacher", str(gpt2), *never)
    for args, message in [
        (["--teacher", str(bert_teacher / "model"), "--mask-id", "999"], "mask_id 999 is outside"),
        (["--teacher", str(bert_teacher / "model"), "--data", "markov", "--vocab-size", "300"],
         "data: its 300 token ids do not fit the teacher's 258 classes"),
        (["--teacher", str(bert_teacher / "model"), "--length", "64"], "length: the teacher takes at most 32"),
        (["--teacher", str(bert_teacher / "checkpoint"), "--data", "markov"], "data: the dmmd teacher checkpoint"),
        (["--teacher", str(bert_teacher / "model"), "--noise-module", "nope"], "no submodule 'nope'"),
    ]:
        assert message in _refused(capsys, "distill", *args, *never)
    assert not (tmp_path / "never" / "checkpoint").exists()


def test_train_teacher_model_config_is_checked(tmp_path, capsys):
    cfg_file = tmp_path / "c.json"
    for values, message in [({"hidden_size": 8}, "needs a model_type"),
                            ({**BERT, "vocab_size": 100}, "vocab_size 100 leaves no room"),
                            ({**BERT, "max_position_embeddings": 8}, "allows 8 tokens, the data's length is 16"),
                            ({**BERT, "model_type": "gpt2"}, "not a masked LM configuration")]:
        cfg_file.write_text(json.dumps(values))
        assert message in _refused(capsys, "train-teacher", "--model-config", str(cfg_file), "--data", "text",
                                   "--length", "16", "--out", str(tmp_path / "t"), "--no-progress")
    err = _refused_by_a_process("train-teacher", "--model-config", str(cfg_file), "--process", "uniform",
                                "--out", str(tmp_path / "t"))
    assert "masked-diffusion teacher only" in err
    assert not (tmp_path / "t" / "checkpoint").exists()

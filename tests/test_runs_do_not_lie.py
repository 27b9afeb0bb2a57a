"""Runs that cannot silently lie (docs/design.md §10): a resumed run is the run its settings
describe (another setting is refused by name), a step with a non-finite loss or gradient is
skipped and too many in a row fail the run with its last good checkpoint kept, an error during
the steps is a failure (not a user error), and DDP ranks agree on when a time limit stops them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from dmmd.apps.cli import main
from dmmd.training.checkpoint import load_tensors, read_state
from dmmd.training.distill import Distiller
from dmmd.training.loop import RunConfig, RunFailed, RunLoop, Trained, Update, UserError, first_difference, run_context
from dmmd.training.teacher import TeacherConfig, train_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(data="markov", vocab_size=4, length=6, width=32, depth=1, heads=2, batch_size=8, steps=4, warmup=1,
            eval_every=0, save_every=2, seed=5)


def test_resume_with_other_settings_is_refused_by_name(tmp_path):
    out = str(tmp_path / "teacher")
    train_teacher(TeacherConfig.from_dict({**TINY, "out": out}), progress=False)
    with pytest.raises(UserError, match=r"holds a run made with other settings: lr was 0.001 there, 0.002 now"):
        train_teacher(TeacherConfig.from_dict({**TINY, "out": out, "lr": 2e-3}), progress=False)
    with pytest.raises(UserError, match=r"source.vocab_size was 4 there, 5 now"):
        train_teacher(TeacherConfig.from_dict({**TINY, "out": out, "vocab_size": 5}), progress=False)
    assert read_state(os.path.join(out, "checkpoint"))["step"] == 4  # nothing changed
    # what does not change the steps may differ: more steps continue the run, another save interval
    more = train_teacher(TeacherConfig.from_dict({**TINY, "out": out, "steps": 6, "save_every": 3}), progress=False)
    assert more["step"] == 6
    # on the command line: one line, exit status 2, before any work
    student = str(tmp_path / "student")
    args = ["distill", "--teacher", os.path.join(out, "checkpoint"), "--student-steps", "2", "--steps", "2",
            "--batch-size", "8", "--out", student, "--no-progress"]
    assert main(args) == 0
    before = read_state(os.path.join(student, "checkpoint"))
    assert main([*args[:4], "4", *args[5:]]) == 2
    assert read_state(os.path.join(student, "checkpoint")) == before


def test_first_difference_walks_nested_settings():
    saved = {"lr": 1.0, "run": {"steps": 5, "out": "a", "seed": 1}, "ks": [2, 4]}
    assert first_difference(saved, {"lr": 1.0, "run": {"steps": 9, "out": "b", "seed": 1}, "ks": (2, 4)},
                            free=("steps", "out")) is None
    assert first_difference(saved, {"lr": 1.0, "run": {"steps": 5, "out": "a", "seed": 2}}) == ("run.seed", 1, 2)
    assert first_difference(saved, {"new_option": 3, "lr": 1.0}) is None  # added since: not compared
    # ... unless what the writer did in its place is known and differs
    assert first_difference(saved, {"new_option": 3}, absent={"new_option": 1}) == ("new_option", 1, 3)
    assert first_difference(saved, {"new_option": 1}, absent={"new_option": 1}) is None
    assert first_difference(saved, {"run": {"seed": 1, "new": 0}}, absent={"run.new": 2}) == ("run.new", 2, 0)


def test_a_masked_student_from_before_aux_teacher_weight_resumes_only_with_the_teacher_term(tmp_path, capsys):
    """Such a run ran eq. 12 with its teacher term (weight 1); today's masked default is 0, so
    resuming it with the defaults would silently change the run."""
    teacher = str(tmp_path / "teacher")
    train_teacher(TeacherConfig.from_dict({**TINY, "out": teacher}), progress=False)
    student = str(tmp_path / "student")

    def distill(steps: int, *options: str) -> int:
        return main(["distill", "--teacher", os.path.join(teacher, "checkpoint"), "--student-steps", "2",
                     "--steps", str(steps), "--batch-size", "8", "--out", student, "--no-progress", *options])

    assert distill(2, "--aux-teacher-weight", "1") == 0
    state_file = os.path.join(student, "checkpoint", "state.json")
    with open(state_file) as f:
        state = json.load(f)
    assert state["state"]["config"]["aux_teacher_weight"] == 1.0
    del state["state"]["config"]["aux_teacher_weight"]  # as the code before the option wrote it
    with open(state_file, "w") as f:
        json.dump(state, f)
    assert distill(4) == 2  # the masked default: refused, one line, nothing run
    assert "aux_teacher_weight was 1.0 there, 0.0 now" in capsys.readouterr().err
    assert read_state(os.path.join(student, "checkpoint"))["step"] == 2
    assert distill(4, "--aux-teacher-weight", "1") == 0
    assert read_state(os.path.join(student, "checkpoint"))["step"] == 4


class _Scripted:
    """A step function whose loss is NaN on the steps in ``bad`` (and raises on ``boom``)."""

    def __init__(self, model, bad=(), boom=None):
        self.model, self.bad, self.boom = model, set(bad), boom

    def __call__(self, i: int) -> Update:
        if i == self.boom:
            raise ValueError("an op refused its input")
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
        loss = self.model(x).square().mean()
        if i in self.bad:
            loss = loss * float("nan")
        return Update(loss, "model", {})


def _loop(tmp_path, steps=8, **run):
    cfg = RunConfig(batch_size=4, steps=steps, warmup=0, save_every=2, out=str(tmp_path / "run"), **run)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = nn.Linear(3, 2)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    trained = {"model": Trained(model, opt, lambda step: 0.1, ema=ema, ema_decay=0.5)}
    return RunLoop(cfg, run_context(cfg), trained, name="toy"), model, ema, opt


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    loop, model, ema, opt = _loop(tmp_path)
    seen = []

    def step(i):
        seen.append((i, {k: v.clone() for k, v in model.state_dict().items()},
                     {k: v.clone() for k, v in ema.state_dict().items()}))
        return _Scripted(model, bad={3, 4})(i)

    result = loop.run(step, progress=False)
    assert result["step"] == 8 and result["skipped_steps"] == 2
    # steps 3 and 4 changed nothing: what step 5 saw is what step 3 saw
    at = {i: (w, e) for i, w, e in seen}
    for k in at[3][0]:
        assert torch.equal(at[3][0][k], at[5][0][k]) and torch.equal(at[3][1][k], at[5][1][k])
        assert not torch.equal(at[2][0][k], at[3][0][k])  # a good step does change them
    assert all(torch.isfinite(t).all() for t in load_tensors(result["checkpoint"], "model").values())
    log = [line for line in open(os.path.join(tmp_path, "run", "log.jsonl"))]
    assert sum('"skipped": 1' in line for line in log) == 2


def test_too_many_non_finite_steps_in_a_row_fail_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    loop, model, _, _ = _loop(tmp_path, steps=20, max_nonfinite=3)
    with pytest.raises(RunFailed, match=r"toy failed at step 7: 3 steps in a row of the model had a non-finite loss "
                                        r"or gradient \(the last good checkpoint, step 4, is kept"):
        loop.run(_Scripted(model, bad=range(4, 20)), progress=False)
    assert read_state(os.path.join(tmp_path, "run", "checkpoint"))["step"] == 4
    with pytest.raises(ValueError, match="max_nonfinite must be >= 1"):
        RunConfig(max_nonfinite=0).validate()


def test_an_error_during_the_steps_is_a_failure_not_a_user_error(tmp_path, monkeypatch, capsys):
    loop, model, _, _ = _loop(tmp_path)
    with pytest.raises(RunFailed, match=r"toy failed at step 6: ValueError: an op refused its input \(the last good "
                                        r"checkpoint, step 4, is kept") as info:
        loop.run(_Scripted(model, boom=5), progress=False)
    assert not isinstance(info.value, ValueError)
    # on the command line: "failed", exit status 1, the last good checkpoint kept
    teacher = str(tmp_path / "teacher")
    train_teacher(TeacherConfig.from_dict({**TINY, "out": teacher}), progress=False)
    real = Distiller.generator_loss

    def flaky(self, batch, step):
        if step >= 3:
            raise ValueError("generator_loss: student_logits has a NaN")
        return real(self, batch, step)

    monkeypatch.setattr(Distiller, "generator_loss", flaky)
    out = str(tmp_path / "student")
    code = main(["distill", "--teacher", os.path.join(teacher, "checkpoint"), "--student-steps", "2", "--steps", "9",
                 "--aux-per-gen", "2", "--batch-size", "8", "--save-every", "3", "--out", out, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("dmmd distill: failed: distill k=2 failed at step 4: ValueError: ")
    assert "the last good checkpoint, step 3, is kept" in err and len(err.strip().splitlines()) == 1
    assert read_state(os.path.join(out, "checkpoint"))["step"] == 3


DDP_STOP = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    import dmmd.training.loop as loop_module
    from dmmd.training.loop import RunConfig, RunLoop, Trained, Update, run_context

    cfg = RunConfig(batch_size=4, steps=100000, warmup=0, save_every=100000, out=sys.argv[1], time_limit_min=0.02)
    ctx = run_context(cfg)
    if ctx.rank == 1:  # this rank's clock runs 50 times fast: alone, it would stop long before rank 0
        real = time.perf_counter
        start = real()
        loop_module.time = type("T", (), {"perf_counter": staticmethod(lambda: start + 50 * (real() - start))})
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loop = RunLoop(cfg, ctx, {"model": Trained(model, opt, lambda step: 0.01)}, name="toy")
    net = loop.wrap_parallel()["model"]
    result = loop.run(lambda i: Update(net(torch.randn(2, 3)).square().mean(), "model", {}), progress=False)
    print(f"rank {ctx.rank} stopped after step {result['step']}", flush=True)
    loop_module.leave_process_group(0)
""")


def test_ddp_ranks_agree_on_the_time_limit(tmp_path):
    script = tmp_path / "ddp_stop.py"
    script.write_text(DDP_STOP)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(tmp_path / "run")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = sorted(line for line in done.stdout.splitlines() if "stopped after step" in line)
    assert len(steps) == 2 and steps[0].split()[-1] == steps[1].split()[-1], done.stdout



LEAVE = textwrap.dedent("""
    import sys, tempfile, time, torch, torch.distributed as dist
    from dmmd.training.loop import leave_process_group

    dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/store", rank=0, world_size=1)
    # a collective whose completion callback still runs on gloo's thread when the main thread ends:
    # left to the interpreter's shutdown, the process aborts
    dist.all_reduce(torch.ones(3), async_op=True).get_future().then(lambda f: time.sleep(0.5))
    print("done", flush=True)
    leave_process_group(int(sys.argv[1]))
    print("not reached", flush=True)
""")


@pytest.mark.parametrize("code", [0, 3])
def test_leaving_the_process_group_ends_the_process_with_the_runs_status(tmp_path, code):
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    done = subprocess.run([sys.executable, str(script), str(code)], env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (code, "done\n"), done.stderr[-2000:]

def test_distill_model_leaves_the_callers_module_as_it_was(tmp_path):
    from dmmd.data import MarkovSource
    from dmmd.diffusion.processes import DiffusionProcess
    from dmmd.models import as_denoiser
    from dmmd.training.distill import DistillConfig, distill_model

    net = nn.Sequential(nn.Embedding(5, 16), nn.Dropout(0.1), nn.Linear(16, 5))
    net.train()
    net[0].weight.requires_grad_(False)  # the caller froze one part
    cfg = DistillConfig.from_dict(dict(student_steps=2, steps=2, batch_size=8, draw_block=4, out=str(tmp_path / "s")))
    distill_model(as_denoiser(net, num_classes=5), DiffusionProcess("masked", 5, "linear"), MarkovSource(4, 6), cfg,
                  progress=False)
    assert all(m.training for m in net.modules())
    assert not net[0].weight.requires_grad and net[2].weight.requires_grad


@pytest.fixture(scope="module")
def bert_with_dropout(tmp_path_factory):
    """A tiny BertForMaskedLM whose config keeps transformers' default dropout (0.1), trained
    for 20 steps as a masked-diffusion teacher: its transformers directory."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bert_dropout")
    config = out / "bert.json"
    config.write_text('{"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, '
                      '"intermediate_size": 64, "max_position_embeddings": 32, "hidden_dropout_prob": 0.1, '
                      '"attention_probs_dropout_prob": 0.1}')
    cfg = TeacherConfig.from_dict(dict(model_config=str(config), data="text", length=16, batch_size=8, steps=20,
                                       lr=3e-3, warmup=2, eval_every=0, save_every=20, out=str(out / "run")))
    return train_teacher(cfg, progress=False)["model"]


def test_dropout_teacher_resumes_bit_identically_and_ddp_equals_one_process(bert_with_dropout, tmp_path):
    from dmmd.training.distill import DistillConfig, distill
    from tests.test_distill import assert_ddp_equals_one_process

    def run(out, stop_at=None, **kw):
        cfg = DistillConfig.from_dict(dict(teacher=bert_with_dropout, student_steps=2, steps=4, batch_size=8,
                                           draw_block=4, save_every=2, out=str(tmp_path / out), **kw))
        return distill(cfg, progress=False, stop_at=stop_at)

    full = run("full")
    run("cut", stop_at=2)
    torch.manual_seed(123)  # the global random state differs from the uninterrupted run's
    cut = run("cut")
    for name in ("generator", "aux", "ema"):
        a, b = load_tensors(full["checkpoint"], name), load_tensors(cut["checkpoint"], name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert_ddp_equals_one_process(bert_with_dropout, tmp_path)
    # dropout kept on request: the models train in train mode
    kept = DistillConfig.from_dict(dict(teacher=bert_with_dropout, dropout=True, batch_size=8, draw_block=4))
    from dmmd.training.distill import load_distill_teacher

    d = Distiller(load_distill_teacher(kept).model, load_distill_teacher(kept).process, kept)
    assert d.generator.training and d.aux.training and not d.teacher.training


class _CappedLM(nn.Module):
    """A masked LM that soft-caps its logits after its output layer (as Gemma-2 does)."""

    def __init__(self, cap: float | None = 2.0, classes: int = 5, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(classes, width)
        self.body = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)
        self.cap = cap

    def forward(self, ids):
        logits = self.head(torch.tanh(self.body(self.embed(ids))))
        return logits if self.cap is None else self.cap * torch.tanh(logits / self.cap)


def test_fused_losses_refuse_a_model_that_changes_its_logits_after_the_head(tmp_path):
    from dmmd.data import MarkovSource
    from dmmd.diffusion.processes import DiffusionProcess
    from dmmd.models import as_denoiser
    from dmmd.training.distill import DistillConfig, distill_model

    torch.manual_seed(0)
    capped = _CappedLM()
    with torch.no_grad():
        capped.head.weight.mul_(20)  # logits well beyond the cap
    cfg = DistillConfig.from_dict(dict(student_steps=2, steps=2, batch_size=8, draw_block=4, fused_losses=True,
                                       out=str(tmp_path / "s")))
    process = DiffusionProcess("masked", 5, "linear")
    with pytest.raises(ValueError, match=r"fused_losses: the teacher's logits made from its final hidden states and "
                                         r"output layer differ from its own forward's by up to [0-9.]+"):
        distill_model(as_denoiser(capped, num_classes=5, head="head"), process, MarkovSource(4, 6), cfg,
                      progress=False)
    assert not os.path.exists(tmp_path / "s" / "checkpoint")  # refused before any work
    plain = _CappedLM(cap=None)
    result = distill_model(as_denoiser(plain, num_classes=5, head="head"), process, MarkovSource(4, 6), cfg,
                           progress=False)
    assert result["step"] == 2


def test_the_fused_call_restores_a_forward_set_on_the_head():
    from dmmd.models import as_denoiser

    net = _CappedLM(cap=None)
    calls = []

    def traced(x):  # what accelerate's or PEFT's hooks do: a forward set on the instance
        calls.append(1)
        return nn.Linear.forward(net.head, x)

    net.head.forward = traced
    wrapped = as_denoiser(net, num_classes=5, head="head")
    z = torch.full((2, 6), 4)
    h = wrapped(z, torch.rand(2), features=True)
    assert h.shape == (2, 6, 16) and not calls  # the head passed its input through for that call
    assert net.head.forward is traced  # and the user's forward is back
    wrapped(z, torch.rand(2))
    assert calls == [1]

"""The ``dmmd`` command line.

    dmmd train-teacher [--config run.json] [--flag value ...]   train (or resume) a teacher
    dmmd distill --teacher DIR --student-steps K [...]         distill a k-step D-MMD student
    dmmd sample --checkpoint DIR --steps K [...]               sample from a teacher or a student
    dmmd reference train [--flag value ...]                    train a small reference causal LM
    dmmd evaluate --samples S.json [...] --reference DIR       GM, generative perplexity, entropy
    dmmd demo [--quick] [--out DIR] [--device cuda] [...]      the whole story on the embedded text

Each ``train-teacher`` / ``distill`` flag is a field of :class:`dmmd.train.TeacherConfig` /
:class:`dmmd.distill.DistillConfig`; a JSON config file gives defaults that flags override.
``dmmd <command> --help`` explains every flag.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from dmmd.distill import DistillConfig
from dmmd.reference_lm import ReferenceConfig
from dmmd.train import TeacherConfig

TEACHER_HELP = {
    "data": "token source: 'text' (the stdlib docs as bytes), 'markov' (exact synthetic source), "
            "'grids' (2-D token images) or a path to a nanoGPT .bin file",
    "vocab_size": "vocabulary of a .bin file, or V of the markov source",
    "bin_dtype": "uint16 or uint32 ids in the .bin file",
    "markov_fanout": "successors per state of the markov source",
    "markov_seed": "seed that builds the markov source",
    "grid_size": "side of the token grids (length must be its square)",
    "grid_colors": "colours of the token grids (token 0 is the background)",
    "process": "'masked' or 'uniform' diffusion",
    "schedule": "noise schedule: linear, cosine or loglinear",
    "length": "tokens per sequence",
    "width": "transformer width",
    "depth": "transformer blocks",
    "heads": "attention heads",
    "block_size": "block-causal attention with this block size (block-autoregressive diffusion)",
    "batch_size": "sequences per step (the global batch under torchrun)",
    "steps": "optimizer steps in total (a resumed run continues to this count)",
    "lr": "peak learning rate of AdamW",
    "warmup": "linear warm-up steps",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the gradient norm to this value",
    "ema": "decay of the exponential moving average of the weights",
    "t_min": "smallest diffusion time drawn in training",
    "eval_every": "validate (ELBO bits per token, EMA weights) every this many steps",
    "eval_batches": "validation batches",
    "eval_steps": "discretisation steps of the validation ELBO",
    "save_every": "write the checkpoint every this many steps",
    "seed": "seed of the initialisation and of every step's batch",
    "out": "output directory (checkpoint/, log.jsonl)",
    "device": "cpu or cuda",
    "time_limit_min": "stop and save after this many minutes (0: no limit)",
}


DISTILL_HELP = {
    "teacher": "the teacher's checkpoint directory (from train-teacher)",
    "student_steps": "k, the student's sampling steps",
    "teacher_raw_weights": "distill the teacher's raw weights instead of its EMA",
    "batch_size": "sequences per step (the global batch under torchrun)",
    "steps": "optimizer steps in total, generator and auxiliary together",
    "aux_per_gen": "auxiliary-model steps after each generator step",
    "lr_gen": "AdamW learning rate of the generator",
    "lr_aux": "AdamW learning rate of the auxiliary model",
    "warmup": "linear learning-rate warm-up steps",
    "beta1": "AdamW beta1 of both optimizers",
    "beta2": "AdamW beta2 of both optimizers",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip each model's gradient norm to this value",
    "ema": "decay of the generator's exponential moving average",
    "weight": "loss weight w(s): constant or elbo",
    "soft_target": "masked diffusion: train the auxiliary model on x_hat_eta(z_t) instead of the sample x",
    "temperature": "teacher temperature (paper section 3.3)",
    "top_p": "teacher top-p, applied as a soft mask",
    "delta": "logit drop outside the teacher's top-p nucleus",
    "noise_dim": "Gaussian noise input of the generator (default: 32 masked, 0 uniform)",
    "noise_init": "std of the generator's initial noise projection (0: the generator starts as the teacher)",
    "noise_per": "token: independent noise per token; sequence: one noise vector shared by a sequence's tokens",
    "form": "xhat (eq. 11/12) or posterior (Appendix D, uniform diffusion)",
    "posterior_ds": "Appendix D: s - s' of the posterior vectors (default 1/(2k))",
    "draw_block": "sequences per random stream (keeps draws independent of the process count)",
    "collapse_entropy": "warn when the generator's output entropy (nats) falls below this",
    "save_every": "write the checkpoint every this many steps",
    "seed": "seed of every step's batch, times, noise and draws",
    "out": "output directory (checkpoint/, log.jsonl)",
    "device": "cpu or cuda",
    "time_limit_min": "stop and save after this many minutes (0: no limit)",
}


REFERENCE_HELP = {
    "data": "token source (as for train-teacher): text, markov, grids or a .bin path",
    "vocab_size": "vocabulary of a .bin file, or V of the markov source",
    "length": "tokens per training sequence (and the model's context)",
    "n_layer": "GPT-2 blocks", "n_embd": "GPT-2 width", "n_head": "attention heads",
    "batch_size": "sequences per step", "steps": "optimizer steps", "lr": "peak AdamW learning rate",
    "out": "output directory: OUT/model is the transformers directory, OUT/checkpoint resumes",
}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_or_none(kind):
    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        return kind(text)
    return parse


def _field_default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _config_parser(sub, name: str, config_cls, helps: dict, *, resumable: bool = True, **kw):
    """A sub-command whose flags are the fields of ``config_cls`` (plus --config, --no-progress
    and, for ``resumable`` ones, --no-resume); tuple fields take several ints, dict fields JSON."""
    p = sub.add_parser(name, **kw)
    p.add_argument("--config", help="JSON file of defaults (keys are the flag names with underscores)")
    if resumable:
        p.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in fields(config_cls):
        default = _field_default(f)
        extra = {}
        if isinstance(default, tuple):
            kind, extra = int, {"nargs": "+"}
        elif isinstance(default, dict):
            kind = json.loads
        else:
            kind = _parse_bool if isinstance(default, bool) else type(default) if default is not None else int
        if f.name in ("posterior_ds",):
            kind = float
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                       type=_parse_or_none(kind), help=f"{helps.get(f.name, '')} (default: {default})", **extra)
    return p


def _values_from_args(args, config_cls) -> dict:
    """The --config file's values, overridden by the flags given."""
    values = {}
    if args.config:
        with open(args.config) as f:
            values.update(json.load(f))
    values.update({f.name: getattr(args, f.name) for f in fields(config_cls) if getattr(args, f.name) is not None})
    return values


def _config_from_args(args, config_cls):
    return config_cls.from_dict(_values_from_args(args, config_cls))


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample sequences from a teacher or a D-MMD student",
                       description="k-step ancestral sampling (SPEC section 1) from a checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="a teacher or student checkpoint directory (e.g. runs/teacher/checkpoint)")
    p.add_argument("--steps", type=int, default=16, help="denoising steps k (default: 16)")
    p.add_argument("--num", type=int, default=4, help="sequences to draw (default: 4)")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence (default: the model's)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default: 1, no truncation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    p.add_argument("--block-size", type=int, default=None,
                   help="block-autoregressive sampling with this block size (default: the model's, if any)")
    p.add_argument("--raw-weights", action="store_true",
                   help="use the raw weights (a student: the generator) instead of the EMA")
    p.add_argument("--out", help="write the samples as JSON here (token ids, and text for byte data)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def cmd_train_teacher(args) -> int:
    from dmmd.train import train_teacher

    cfg = _config_from_args(args, TeacherConfig)
    result = train_teacher(cfg, resume=not args.no_resume, progress=not args.no_progress)
    print(json.dumps(result))
    return 0


def cmd_distill(args) -> int:
    from dmmd.distill import distill

    cfg = _config_from_args(args, DistillConfig)
    result = distill(cfg, resume=not args.no_resume, progress=not args.no_progress)
    print(json.dumps(result))
    return 0


def cmd_sample(args) -> int:
    from dmmd.data import ByteText
    from dmmd.distill import is_student, load_student, student_fn
    from dmmd.sampling import sample
    from dmmd.train import load_teacher

    if is_student(args.checkpoint):
        model, process, state = load_student(args.checkpoint, use_ema=not args.raw_weights, device=args.device)
        model_fn, data = student_fn(model, args.seed), state["teacher_config"]["data"]
    else:
        model, process, state = load_teacher(args.checkpoint, use_ema=not args.raw_weights, device=args.device)
        model_fn, data = (lambda z, t: model(z, t)), state["config"]["data"]
    length = args.length or model.config.length
    block = args.block_size if args.block_size is not None else model.config.block_size
    x = sample(model_fn, process, args.num, length, args.steps, seed=args.seed,
               temperature=args.temperature, top_p=args.top_p, block_size=block, device=args.device,
               progress=True)
    result = {"steps": args.steps, "tokens": x.tolist()}
    if data == "text":
        result["text"] = [ByteText.decode(row) for row in x]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    for i, row in enumerate(x):
        shown = result["text"][i] if "text" in result else " ".join(map(str, row.tolist()))
        print(f"--- sample {i} ({args.steps} steps)\n{shown}")
    return 0


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="Gradient Moment, generative perplexity and entropy of samples",
                       description="Evaluate sample files (from `dmmd sample --out`) against held-out data "
                                   "of a token source under a reference causal LM (a local transformers "
                                   "directory); exact NLL and TV too when the source is the Markov source.")
    p.add_argument("--samples", nargs="+", required=True, help="JSON sample files (key 'tokens')")
    p.add_argument("--reference", required=True, help="a local transformers causal-LM directory")
    p.add_argument("--checkpoint", help="take the data source from this teacher or student checkpoint")
    p.add_argument("--data", default="text", help="token source when no --checkpoint (default: text)")
    p.add_argument("--vocab-size", type=int, default=0, help="for .bin or markov data")
    p.add_argument("--num-data", type=int, default=256, help="held-out data sequences (default 256)")
    p.add_argument("--estimator", default="ustat", choices=["ustat", "pairs"], help="GM estimator")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per reference-model pass")
    p.add_argument("--prompt-length", type=int, default=0, help="score only tokens after this prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here (and a markdown table beside it)")


def cmd_reference(args) -> int:
    from dmmd.reference_lm import train_reference

    cfg = _config_from_args(args, ReferenceConfig)
    print(json.dumps(train_reference(cfg, resume=not args.no_resume, progress=not args.no_progress)))
    return 0


def cmd_evaluate(args) -> int:
    import torch

    from dmmd.checkpoint import read_state
    from dmmd.evaluate import evaluate_samples, markdown_table
    from dmmd.train import TeacherConfig, make_source

    if args.checkpoint:
        state = read_state(args.checkpoint)
        tcfg = TeacherConfig.from_dict(state.get("teacher_config", state.get("config")))
    else:
        tcfg = TeacherConfig(data=args.data, vocab_size=args.vocab_size)
    named = {}
    for path in args.samples:
        with open(path) as f:
            named[path] = torch.tensor(json.load(f)["tokens"], dtype=torch.long)
    length = next(iter(named.values())).shape[1]
    tcfg.length = length
    rows = evaluate_samples(named, make_source(tcfg), args.reference, num_data=args.num_data,
                            estimator=args.estimator, batch_size=args.batch_size,
                            prompt_length=args.prompt_length, seed=args.seed)
    table = markdown_table(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(table + "\n")
    return 0


DEMO_HELP = {
    "out": "output directory; every stage resumes from what is there",
    "device": "cpu or cuda",
    "seed": "seed of every stage",
    "length": "bytes per sequence",
    "teacher_width": "teacher transformer width", "teacher_depth": "teacher transformer blocks",
    "teacher_steps": "teacher training steps", "teacher_batch": "teacher batch size",
    "teacher_lr": "teacher peak learning rate",
    "reference_width": "reference LM width", "reference_layers": "reference LM blocks",
    "reference_steps": "reference LM training steps",
    "ks": "student step counts k (one student each)",
    "distill_steps": "D-MMD steps per student", "distill_batch": "D-MMD batch size",
    "temperature": "teacher temperature, in distillation and in teacher sampling",
    "top_p": "teacher top-p (soft mask in distillation, nucleus in teacher sampling)",
    "distill": "further DistillConfig fields as JSON, e.g. '{\"lr_gen\": 1e-4}'",
    "teacher_ks": "step counts the teacher is evaluated at",
    "num_samples": "samples per sampler for the metrics", "num_data": "held-out sequences for the metrics",
}


def _demo_parser(sub) -> None:
    from dmmd.demo import QUICK, DemoConfig

    p = _config_parser(sub, "demo", DemoConfig, DEMO_HELP, resumable=False,
                       help="teacher, reference LM, D-MMD students and the GM table on the embedded text",
                       description="The whole story on the embedded text with no downloads: train a masked "
                                   "teacher and a reference LM, distill students for each k, evaluate GM, "
                                   "generative perplexity and entropy; table (JSON, markdown) and plot (PNG). "
                                   "Re-running resumes every stage.")
    p.add_argument("--quick", action="store_true",
                   help="tiny models, few steps (under 3 minutes on 2 cores); quick defaults: "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items()))


def cmd_demo(args) -> int:
    from dmmd.demo import DemoConfig, demo_config, run_demo

    values = _values_from_args(args, DemoConfig)
    if "distill" in values:
        values["distill"] = {**DemoConfig().distill, **values["distill"]}
    run_demo(demo_config(args.quick, **values), progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dmmd", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    _config_parser(sub, "train-teacher", TeacherConfig, TEACHER_HELP, help="train (or resume) a diffusion teacher",
                   description="Train a masked or uniform diffusion denoiser; resumes from OUT/checkpoint "
                               "when it exists.")
    _config_parser(sub, "distill", DistillConfig, DISTILL_HELP, help="distill a k-step D-MMD student",
                   description="D-MMD (paper Algorithm 1): a k-step student generator from a teacher "
                               "checkpoint; resumes from OUT/checkpoint when it exists.")
    _sample_parser(sub)
    ref = sub.add_parser("reference", help="reference causal LMs for the metrics").add_subparsers(
        dest="reference_command", required=True)
    _config_parser(ref, "train", ReferenceConfig, REFERENCE_HELP, help="train a small GPT-2-configured causal LM",
                   description="Train a GPT-2-configured causal LM on a token source and save it as a "
                               "transformers directory (OUT/model); resumes from OUT/checkpoint.")
    _evaluate_parser(sub)
    _demo_parser(sub)
    args = ap.parse_args(argv)
    commands = {"train-teacher": cmd_train_teacher, "distill": cmd_distill, "sample": cmd_sample,
                "reference": cmd_reference, "evaluate": cmd_evaluate,
                "demo": cmd_demo}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``dmmd`` command line.

    dmmd train-teacher [--config run.json] [--flag value ...]   train (or resume) a teacher
    dmmd sample --checkpoint DIR --steps K [...]               sample from a teacher

Each ``train-teacher`` flag is a field of :class:`dmmd.train.TeacherConfig`; a JSON config
file gives defaults that flags override. ``dmmd <command> --help`` explains every flag.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

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


def _parse_or_none(kind):
    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        return kind(text)
    return parse


def _teacher_parser(sub) -> None:
    p = sub.add_parser("train-teacher", help="train (or resume) a diffusion teacher",
                       description="Train a masked or uniform diffusion denoiser; resumes from "
                                   "OUT/checkpoint when it exists.")
    p.add_argument("--config", help="JSON file of defaults (keys are the flag names with underscores)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in fields(TeacherConfig):
        default = f.default if f.default is not MISSING else None
        kind = type(default) if default is not None else int
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                       type=_parse_or_none(kind),
                       help=f"{TEACHER_HELP.get(f.name, '')} (default: {default})")


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample sequences from a trained teacher",
                       description="k-step ancestral sampling (SPEC section 1) from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (e.g. runs/teacher/checkpoint)")
    p.add_argument("--steps", type=int, default=16, help="denoising steps k (default: 16)")
    p.add_argument("--num", type=int, default=4, help="sequences to draw (default: 4)")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence (default: the model's)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default: 1, no truncation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    p.add_argument("--block-size", type=int, default=None,
                   help="block-autoregressive sampling with this block size (default: the model's, if any)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", help="write the samples as JSON here (token ids, and text for byte data)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def cmd_train_teacher(args) -> int:
    from dmmd.train import train_teacher

    values = {}
    if args.config:
        with open(args.config) as f:
            values.update(json.load(f))
    values.update({f.name: getattr(args, f.name) for f in fields(TeacherConfig) if getattr(args, f.name) is not None})
    cfg = TeacherConfig.from_dict(values)
    result = train_teacher(cfg, resume=not args.no_resume, progress=not args.no_progress)
    print(json.dumps(result))
    return 0


def cmd_sample(args) -> int:
    from dmmd.data import ByteText
    from dmmd.sampling import sample
    from dmmd.train import load_teacher

    model, process, state = load_teacher(args.checkpoint, use_ema=not args.raw_weights, device=args.device)
    length = args.length or model.config.length
    block = args.block_size if args.block_size is not None else model.config.block_size
    x = sample(lambda z, t: model(z, t), process, args.num, length, args.steps, seed=args.seed,
               temperature=args.temperature, top_p=args.top_p, block_size=block, device=args.device,
               progress=True)
    result = {"steps": args.steps, "tokens": x.tolist()}
    if state["config"]["data"] == "text":
        result["text"] = [ByteText.decode(row) for row in x]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    for i, row in enumerate(x):
        shown = result["text"][i] if "text" in result else " ".join(map(str, row.tolist()))
        print(f"--- sample {i} ({args.steps} steps)\n{shown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dmmd", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    _teacher_parser(sub)
    _sample_parser(sub)
    args = ap.parse_args(argv)
    return {"train-teacher": cmd_train_teacher, "sample": cmd_sample}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

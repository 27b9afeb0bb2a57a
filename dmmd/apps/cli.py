"""dmmd: distill discrete diffusion models into few-step generators (D-MMD).

    dmmd train-teacher [--config run.json] [--flag value ...]   train (or resume) a teacher
    dmmd distill --teacher DIR --student-steps K [...]         distill a k-step D-MMD student (DIR: a
                                                               checkpoint or a transformers masked LM)
    dmmd sample --checkpoint DIR --steps K [...]               sample from a teacher or a student
    dmmd reference train [--flag value ...]                    train a small reference causal LM
    dmmd evaluate --samples S.json [...] --reference DIR       GM, generative perplexity, entropy
    dmmd demo [--quick] [--out DIR] [--data digits words text] the main job: D-MMD's effect, shown

Each ``train-teacher`` / ``distill`` / ``reference train`` / ``demo`` flag is an option of its
config (:class:`dmmd.training.teacher.TeacherConfig` and so on), with its help beside the
field; a JSON config file gives defaults that flags override. A user error (a bad value, a
missing or damaged file, a busy output directory or one holding a run made with other
settings, a missing optional dependency) is one line, ``dmmd <command>: error: ...``, exit
status 2, before any work. A run that started and could not go on (an error during its steps,
too many non-finite steps in a row) is ``dmmd <command>: failed: ...`` naming the step and the
last good checkpoint (kept), exit status 1. ``--debug`` shows the traceback of either.
"""
from __future__ import annotations

import os

# Idle OpenMP workers sleep instead of spinning (read when torch loads, so before any import
# of it). Measured with bench/under_load.py on 2 cores: a small distillation made 17.1 steps/s
# alone and 4.1 beside a copy of itself with spinning workers, 11.4 and 11.4 with sleeping
# ones. OMP_WAIT_POLICY=ACTIVE restores spinning (faster alone, collapses on a shared machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from dmmd.training.distill import DistillConfig
from dmmd.training.loop import RunFailed, leave_process_group
from dmmd.training.reference import CLASSIFIER_DEFAULTS, ReferenceConfig
from dmmd.training.teacher import TeacherConfig

# a boolean flag takes true or false, and alone means true (--trust-remote-code)
BARE_TRUE = {"metavar": "{true,false}", "nargs": "?", "const": True}


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


def _config_parser(sub, name: str, config_cls, *, resumable: bool = True, **kw):
    """A sub-command whose flags are the options of ``config_cls`` (nested configs flattened;
    help and default from each field), plus --config, --no-progress and, for ``resumable``
    ones, --no-resume; tuple fields take several ints, dict fields JSON."""
    p = sub.add_parser(name, **kw)
    _common_flags(p)
    p.add_argument("--config", help="JSON file of defaults (keys are the flag names with underscores)")
    if resumable:
        p.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f, default in config_cls.flat_fields():
        extra = {}
        if isinstance(default, tuple) or "tuple[" in str(f.type):
            kind, extra = (str if "tuple[str" in str(f.type) else int), {"nargs": "+"}
        elif isinstance(default, dict) or str(f.type).startswith("dict"):
            kind = json.loads
        elif isinstance(default, bool):
            kind, extra = _parse_bool, BARE_TRUE
        elif default is None:  # optional values: the annotation names the type
            kind = next((k for k in (float, bool, str, int) if k.__name__ in str(f.type)), int)
            if kind is bool:
                kind, extra = _parse_bool, BARE_TRUE
        else:
            kind = type(default)
        help_text = f.metadata.get("help", "")
        if "(default: " not in help_text:  # per-process defaults name themselves
            help_text += f" (default: {default})"
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, type=_parse_or_none(kind),
                       help=help_text, **extra)
    return p


def _common_flags(p) -> None:
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback")


def _values_from_args(args, config_cls) -> dict:
    """The --config file's values, overridden by the flags given (flat keys)."""
    values = {}
    if args.config:
        try:
            with open(args.config) as f:
                values.update(json.load(f))
        except OSError as e:
            raise ValueError(f"--config {args.config}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {args.config}: not valid JSON ({e})") from None
    values.update({f.name: getattr(args, f.name) for f, _ in config_cls.flat_fields()
                   if getattr(args, f.name) is not None})
    return values


def _config_from_args(args, config_cls):
    return config_cls.from_dict(_values_from_args(args, config_cls))


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample sequences from a teacher or a D-MMD student",
                       description="k-step ancestral sampling (docs/design.md) from a checkpoint.")
    _common_flags(p)
    p.add_argument("--checkpoint", required=True,
                   help="a teacher or student: a checkpoint directory (e.g. runs/teacher/checkpoint) or a "
                        "transformers directory dmmd wrote (e.g. runs/student/student)")
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
    p.add_argument("--png", help="image data: write the samples as a PNG grid here")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="a transformers directory whose model is code shipped with it (an MDLM, DUO, LLaDA or Dream "
                        "teacher, or its student): run that code")


def cmd_train_teacher(args) -> int:
    from dmmd.training.teacher import train_teacher

    cfg = _config_from_args(args, TeacherConfig)
    result = train_teacher(cfg, resume=not args.no_resume, progress=not args.no_progress)
    print(json.dumps(result))
    return 0


def cmd_distill(args) -> int:
    from dmmd.training.distill import distill

    cfg = _config_from_args(args, DistillConfig)
    result = distill(cfg, resume=not args.no_resume, progress=not args.no_progress, dry_run=args.dry_run)
    print(json.dumps(result))
    return 0


def _check_sample_args(args) -> None:
    """Refuse bad sampling options (and an unreadable checkpoint) before loading anything."""

    for name in ("steps", "num"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("length", "block_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    data_of(args.checkpoint)  # a missing or damaged checkpoint, named


def data_of(path: str):
    """The data config a teacher or student at ``path`` (a dmmd checkpoint or a transformers
    directory) was trained on; ``None`` when it does not say."""
    from dmmd.training.artifacts import inspect

    return inspect(path).data()


def cmd_sample(args) -> int:
    from dmmd.data import ByteText
    from dmmd.diffusion.sampling import sample
    from dmmd.training.artifacts import inspect
    from dmmd.training.distill import load_student, student_fn
    from dmmd.training.teacher import load_teacher

    _check_sample_args(args)
    artifact = inspect(args.checkpoint)
    source_cfg = artifact.data()
    if source_cfg is None and args.length is None:
        raise ValueError(f"--length: {args.checkpoint} does not say what data it was trained on; give the length")
    load = load_student if artifact.is_student else load_teacher
    model, process, _ = load(args.checkpoint, use_ema=not args.raw_weights, device=args.device,
                             trust_remote_code=args.trust_remote_code)
    data = None if source_cfg is None else source_cfg.data
    pictures = None
    from dmmd.data.config import is_image_data

    if args.png or (source_cfg is not None and is_image_data(source_cfg)):
        from dmmd.data import make_source

        if source_cfg is None:
            raise ValueError(f"--png: {args.checkpoint} does not say what data it was trained on")
        pictures = make_source(source_cfg)
        if not hasattr(pictures, "to_images"):
            raise ValueError(f"--png: the checkpoint's data ({data}) is not image data")
    length = args.length or (source_cfg.length if source_cfg is not None and source_cfg.length else
                             model.config.length)
    block = args.block_size if args.block_size is not None else model.config.block_size
    x = sample(student_fn(model, args.seed), process, args.num, length, args.steps, seed=args.seed,
               temperature=args.temperature, top_p=args.top_p, block_size=block, device=args.device,
               progress=True)
    result = {"steps": args.steps, "tokens": x.tolist()}
    if data == "text":
        result["text"] = [ByteText.decode(row) for row in x]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    if pictures is not None:
        if args.png:
            from dmmd.data.images import save_grid

            save_grid(pictures.to_images(x), args.png)
            print(f"wrote {args.png}")
        else:
            print("(image data: --png PATH writes the samples as a picture grid)")
    for i, row in enumerate(x):
        shown = result["text"][i] if "text" in result else " ".join(map(str, row.tolist()))
        print(f"--- sample {i} ({args.steps} steps)\n{shown}")
    return 0


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="Gradient Moment, generative perplexity and entropy of samples "
                                        "(images: FID)",
                       description="Evaluate sample files (from `dmmd sample --out`) against held-out data "
                                   "of a token source under a reference causal LM (a local transformers "
                                   "directory); exact NLL and TV too when the source is the Markov source. "
                                   "Image data (--data digits, image files): FID under the feature classifier "
                                   "of `dmmd reference train --data ...` (--reference OUT/model), one PNG grid "
                                   "per sample file and an FID-by-steps plot beside --out.")
    _common_flags(p)
    p.add_argument("--samples", nargs="+", required=True, help="JSON sample files (key 'tokens')")
    p.add_argument("--reference", required=True,
                   help="a local transformers causal-LM directory (image data: the feature classifier's)")
    p.add_argument("--checkpoint", help="take the data source from this teacher or student checkpoint")
    p.add_argument("--data", default="text", help="token source when no --checkpoint (default: text)")
    p.add_argument("--vocab-size", type=int, default=0, help="for .bin or markov data")
    p.add_argument("--levels", type=int, default=256, help="tokens per channel value of image files (default 256)")
    p.add_argument("--num-data", type=int, default=256, help="held-out data sequences (default 256)")
    p.add_argument("--estimator", default="ustat", choices=["ustat", "pairs"], help="GM estimator")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per reference-model pass")
    p.add_argument("--prompt-length", type=int, default=0, help="score only tokens after this prefix")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out data draws (default: 0)")
    p.add_argument("--out", help="write the results as JSON here (and a markdown table beside it)")


def cmd_reference(args) -> int:
    from dmmd.training.reference import reference_config, train_reference

    cfg = reference_config(_values_from_args(args, ReferenceConfig))
    print(json.dumps(train_reference(cfg, resume=not args.no_resume, progress=not args.no_progress)))
    return 0


def cmd_evaluate(args) -> int:
    import torch

    from dmmd.data import DataConfig, make_source
    from dmmd.data.config import is_image_data
    from dmmd.metrics.evaluate import evaluate_samples, markdown_table

    for path in args.samples:
        if not os.path.isfile(path):
            raise ValueError(f"--samples {path}: no such file")
    if not os.path.isdir(args.reference):
        raise ValueError(f"--reference {args.reference}: not a directory (a local transformers causal LM)")
    if args.num_data < 2:
        raise ValueError(f"--num-data must be >= 2 (the GM needs pairs), got {args.num_data}")
    if args.checkpoint:
        source = data_of(args.checkpoint)
        if source is None:
            raise ValueError(f"--checkpoint {args.checkpoint} does not say what data it was trained on; give --data")
    else:
        source = DataConfig(data=args.data, vocab_size=args.vocab_size, levels=args.levels)
    named, steps = {}, {}
    for path in args.samples:
        try:
            with open(path) as f:
                content = json.load(f)
            named[path] = torch.tensor(content["tokens"], dtype=torch.long)
            steps[path] = content.get("steps")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--samples {path}: not a sample file of dmmd sample --out ({e})") from None
    length = next(iter(named.values())).shape[1]
    source = source.replace(length=length)
    if is_image_data(source):
        return _evaluate_images(args, named, steps, make_source(source))
    rows = evaluate_samples(named, make_source(source), args.reference, num_data=args.num_data,
                            estimator=args.estimator, batch_size=args.batch_size,
                            prompt_length=args.prompt_length, seed=args.seed)
    _print_and_write(args.out, rows, markdown_table(rows))
    return 0


def _print_and_write(out: str | None, rows: list[dict], table: str) -> None:
    """The table on stdout; with ``out``, the rows as JSON there and the table beside it (.md)."""
    print(table)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(table + "\n")


def _evaluate_images(args, named: dict, steps: dict, source) -> int:
    from dmmd.metrics.evaluate import evaluate_image_samples, image_markdown_table

    out_dir = None  # grids and plot: beside --out, in a folder named after it
    if args.out:
        stem, ext = os.path.splitext(args.out)
        out_dir = stem if ext else args.out + "_figures"
    rows = evaluate_image_samples(named, source, args.reference, steps=steps, out_dir=out_dir, seed=args.seed)
    _print_and_write(args.out, rows, image_markdown_table(rows))
    if args.out:
        print(f"wrote {args.out}, {os.path.splitext(args.out)[0]}.md and the grids and plot in {out_dir}/")
    return 0


def _demo_parser(sub) -> None:
    from dmmd.apps.demo import QUICK, DemoConfig

    p = _config_parser(sub, "demo", DemoConfig, resumable=False,
                       help="the main job: teachers and D-MMD students on digits, tables, grids and plots",
                       description="D-MMD's effect in numbers and pictures, with no downloads: on scikit-learn's "
                                   "digits (uniform and masked diffusion: FID by steps, side-by-side grids), a "
                                   "teacher sampled with few to many steps against few-step D-MMD students, with a "
                                   "verdict per student; --data digits words adds a Markov chain over words (exact "
                                   "metrics), --data text runs the embedded English text (needs a GPU or a long "
                                   "run). Re-running resumes every stage.")
    p.add_argument("--quick", action="store_true",
                   help="tiny models and few steps (the smoke test; 50 s by make on a 2-core AMD EPYC, idle); "
                        "per part: "
                        + "; ".join(f"{part} " + ", ".join(f"{k}={v}" for k, v in q.items())
                                    for part, q in QUICK.items()))


def cmd_demo(args) -> int:
    from dmmd.apps.demo import DemoConfig, run_demo

    run_demo(DemoConfig.from_dict(_values_from_args(args, DemoConfig)), quick=args.quick,
             progress=not args.no_progress)
    return 0


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and each command's own parser (for its usage line in errors)."""
    ap = argparse.ArgumentParser(prog="dmmd", description=__doc__.splitlines()[0],
                                 epilog="dmmd <command> --help explains every flag of a command.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    parsers = {
        "train-teacher": _config_parser(sub, "train-teacher", TeacherConfig,
                                        help="train (or resume) a diffusion teacher",
                                        description="Train a masked or uniform diffusion denoiser; resumes from "
                                                    "OUT/checkpoint when it exists."),
        "distill": _config_parser(sub, "distill", DistillConfig, help="distill a k-step D-MMD student",
                                  description="D-MMD (paper Algorithm 1): a k-step student generator from a "
                                              "teacher checkpoint; resumes from OUT/checkpoint when it exists. "
                                              "A transformers masked-LM directory as --teacher distils on "
                                              "--data / --length (default: the data dmmd trained it on) and "
                                              "also writes the student as a transformers directory, "
                                              "OUT/student."),
    }
    parsers["distill"].add_argument("--dry-run", action="store_true",
                                    help="load the teacher, check every option, print the memory plan per rank and "
                                         "stop (nothing written)")
    _sample_parser(sub)
    ref = sub.add_parser("reference", help="reference causal LMs for the metrics")
    parsers["reference train"] = _config_parser(
        ref.add_subparsers(dest="reference_command", required=True, metavar="command"), "train", ReferenceConfig,
        help="train a small GPT-2-configured causal LM (image data: the FID feature classifier)",
        description="Train a GPT-2-configured causal LM on a token source and save it as a transformers "
                    "directory (OUT/model); resumes from OUT/checkpoint. On labelled image data (--data "
                    "digits) train the FID feature classifier instead (an MLP; OUT/model, with its held-out "
                    "accuracy), with " + ", ".join(f"{k} {v}" for k, v in CLASSIFIER_DEFAULTS.items())
                    + " unless given.")
    _evaluate_parser(sub)
    _demo_parser(sub)
    for name, p in sub.choices.items():
        parsers.setdefault(name, p)
    return ap, parsers


def _user_errors() -> tuple[type[BaseException], ...]:
    from dmmd.extras import MissingExtra
    from dmmd.training.loop import OutputInUse

    return ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OutputInUse, MissingExtra


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status (under ``torchrun``: end the process with it,
    leave_process_group says why)."""
    try:
        code = _command(argv)
    except BaseException:
        leave_process_group()
        raise
    return leave_process_group(code)


def _command(argv: list[str] | None) -> int:
    ap, parsers = _parser()
    args, unknown = ap.parse_known_args(argv)
    name = args.command + (f" {args.reference_command}" if args.command == "reference" else "")
    if unknown:  # the command's own usage, not the top-level one
        parsers[name].error(f"unrecognized arguments: {' '.join(unknown)}")
    commands = {"train-teacher": cmd_train_teacher, "distill": cmd_distill, "sample": cmd_sample,
                "reference": cmd_reference, "evaluate": cmd_evaluate, "demo": cmd_demo}
    try:
        return commands[args.command](args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except RunFailed as e:  # a run that started and could not go on: not the user's input
        if args.debug:
            raise
        print(f"dmmd {name}: failed: {' '.join(str(e).split())} (--debug shows the traceback)", file=sys.stderr)
        return 1
    except _user_errors() as e:
        if args.debug:
            raise
        message = " ".join(str(e).split())  # one line
        print(f"dmmd {name}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

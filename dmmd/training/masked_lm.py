"""transformers masked LMs (BERT, RoBERTa, ModernBERT, ...) as masked-diffusion teachers and
D-MMD students.

A directory ``save_pretrained`` wrote (``config.json``, the weights, optionally a tokenizer)
loads with :func:`load_masked_lm` as an :class:`~dmmd.models.external.ExternalDenoiser` without
a time input; the mask id comes from the caller or from the tokenizer's mask token; the
classes past the tokenizer's vocabulary (padding of the output layer) are never drawn. dmmd
writes a ``dmmd.json`` beside what it saves (:func:`save_masked_lm`): the process, schedule,
data and, for a student, its noise input, so that :func:`load_masked_lm` rebuilds a student in
one call (its noise projection from ``noise.safetensors``).

:func:`build_masked_lm` makes a fresh one from a transformers config JSON for
``dmmd train-teacher --model-config``, with a tokenizer for our sources' token ids.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import replace

from dmmd.extras import require
from dmmd.models.conventions import OVERRIDES, TeacherConventions, resolve_conventions
from dmmd.models.external import ExternalConfig, ExternalDenoiser
from dmmd.training.checkpoint import make_readable, replace_directory, write_json_atomic

META = "dmmd.json"
NOISE = "noise.safetensors"
MASK_TOKEN = "[MASK]"
PAD_TOKEN = "[PAD]"


def _transformers():
    return require("transformers", "a transformers masked LM")


@contextlib.contextmanager
def _quiet():
    """transformers' own progress bars off while it loads or saves (dmmd's bars say what runs)."""
    logging = _transformers().utils.logging
    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def is_masked_lm_dir(path: str) -> bool:
    """Whether ``path`` is a transformers model directory (not a dmmd checkpoint)."""
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "state.json"))


def is_masked_lm(model) -> bool:
    """Whether ``model`` wraps a transformers model (one ``save_pretrained`` can write)."""
    return isinstance(model, ExternalDenoiser) and hasattr(model.model, "save_pretrained")


def read_meta_file(file: str) -> dict:
    """A JSON object file, every failure a ``ValueError`` naming it."""
    try:
        with open(file) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is unreadable ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{file} is not a JSON object")
    return values


def read_meta(path: str) -> dict:
    """The ``dmmd.json`` dmmd saved in a transformers directory (``{}`` when there is none)."""
    file = os.path.join(path, META)
    return read_meta_file(file) if os.path.isfile(file) else {}


def _tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer saved in ``path``, or ``None`` when there is none."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                               "vocab.txt", "vocab.json")):
        return None
    try:
        return _transformers().AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: its tokenizer does not load ({e})") from None


def load_masked_lm(path: str, *, mask_id: int | None = None, device: str = "cpu", trust_remote_code: bool = False,
                   conventions: dict | None = None) -> tuple[ExternalDenoiser, object, dict]:
    """The diffusion LM in the transformers directory ``path`` as a denoiser, its tokenizer
    (``None`` when none is saved there) and dmmd's ``dmmd.json`` (``{}`` if none), with the
    conventions it was used by under ``meta["conventions"]``.

    A model of a known family (:data:`dmmd.models.conventions.FAMILIES`, by the config's
    ``model_type``) is called as that family is (its time input, shifted logits, mask, schedule,
    process); ``conventions`` (keys of :data:`~dmmd.models.conventions.OVERRIDES`) and
    ``mask_id`` override them. Code shipped in the directory (``auto_map``) runs only with
    ``trust_remote_code``. The model classes tried, in order: AutoModelForMaskedLM, AutoModel,
    AutoModelForCausalLM (``meta["loaded_by"]`` says which).

    Raises ``ValueError`` naming what is wrong: no such directory, no model in it, remote code
    without ``trust_remote_code``, logits whose width matches neither the config nor the
    tokenizer, a mask id outside the vocabulary or none to be found, a tokenizer larger than
    the model's output, a mask id for a uniform-state model."""
    if not os.path.isdir(path):
        raise ValueError(f"teacher {path!r}: no such directory")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"teacher {path}: holds no transformers model (no config.json) and no dmmd checkpoint")
    transformers = _transformers()
    raw = read_meta_file(file)
    model_type = str(raw.get("model_type", ""))
    remote = "auto_map" in raw and model_type not in transformers.CONFIG_MAPPING
    if remote and not trust_remote_code:
        raise ValueError(f"teacher {path}: its {model_type or 'model'} is code shipped in the directory (config.json "
                         f"auto_map); running it needs --trust-remote-code (trust_remote_code=True in Python)")
    meta = read_meta(path)
    # what dmmd saved with the model (a student's conventions, a teacher's schedule), then the caller's
    given = {k: meta.get(k) for k in ("schedule", "mask_id")} | meta.get("conventions", {})
    given = {k: v for k, v in given.items() if k in OVERRIDES and v is not None}
    given |= {k: v for k, v in (conventions or {}).items() if v is not None and v != ""}
    if mask_id is not None:
        given["mask_id"] = mask_id
    conv = resolve_conventions(model_type, **given)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True,
                                                         trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ValueError(f"teacher {path}: its config.json does not load ({e})") from None
    # a diffusion LM's code may register it as any of the Auto classes; a plain transformers
    # architecture is a teacher only as a masked LM (a GPT-2 is not a diffusion model)
    block_size = _block_size(path, config, conv)
    model, loaded_by = _load_model(path, config, trust_remote_code, LOADERS if remote or conv.family else LOADERS[:1])
    tokenizer = _tokenizer(path, trust_remote_code)
    num_classes = _num_classes(path, model, config, tokenizer, conv, block_size)
    never: list[int] = list(meta.get("never", []))
    if conv.process == "uniform":
        never, mask = [], None
    else:
        if tokenizer is not None:
            if len(tokenizer) > num_classes:
                raise ValueError(f"teacher {path}: its tokenizer has {len(tokenizer)} tokens but the model outputs "
                                 f"{num_classes} classes; the tokenizer does not belong to the model")
            never += range(len(tokenizer), num_classes)  # padding of the output layer
        mask = conv.mask_id
        if mask is None:
            mask = getattr(tokenizer, "mask_token_id", None)
        if mask is None and conv.mask_is_last:
            mask = num_classes - 1
        if mask is None:
            raise ValueError(f"teacher {path}: no tokenizer with a mask token there; pass the mask id (--mask-id)")
        if not 0 <= mask < num_classes:
            raise ValueError(f"mask_id {mask} is outside the vocabulary of {path} ({num_classes} classes)")
    conv = replace(conv, mask_id=mask, mask_is_last=False, loaded_by=loaded_by)
    noise = meta.get("noise", {})
    denoiser = ExternalDenoiser(model, ExternalConfig(
        num_classes=num_classes, process=conv.process, mask_id=mask, never=never, **_call_options(conv, block_size),
        shift_logits=conv.shift_logits, noise_module=noise.get("module", ""), length=_max_length(config)))
    if noise.get("dim", 0) > 0:
        safetensors = require("safetensors.torch", "a student's noise weights")
        denoiser.install_noise(noise["dim"], noise["per"])
        weights = os.path.join(path, NOISE)
        try:
            denoiser.noise_proj.load_state_dict(safetensors.load_file(weights))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{weights}: the student's noise weights do not load ({e})") from None
    meta = {**meta, "conventions": conv.to_dict(), "loaded_by": loaded_by, "remote_code": remote,
            "schedule": conv.schedule}
    return denoiser.to(device).eval(), tokenizer, meta


LOADERS = ("AutoModelForMaskedLM", "AutoModel", "AutoModelForCausalLM")


def _load_model(path: str, config, trust_remote_code: bool, loaders: tuple[str, ...]):
    """The model in ``path`` and the Auto class that loaded it (the first of ``loaders`` that
    has a class for its config)."""
    transformers = _transformers()
    for name in loaders:
        try:
            with _quiet():
                model = getattr(transformers, name).from_pretrained(path, local_files_only=True,
                                                                    trust_remote_code=trust_remote_code)
            return model, name
        except ValueError as e:
            if "Unrecognized configuration class" in str(e) or "does not appear to have" in str(e):
                continue
            raise ValueError(f"teacher {path}: the model does not load ({e})") from None
        except OSError as e:
            raise ValueError(f"teacher {path}: the model's weights do not load ({e})") from None
    if loaders == LOADERS[:1]:
        raise ValueError(f"teacher {path}: holds a {config.model_type} model, which is not a masked LM "
                         f"(AutoModelForMaskedLM has no class for it)")
    raise ValueError(f"teacher {path}: holds a {config.model_type} model that none of {', '.join(loaders)} loads")


def _call_options(conv: TeacherConventions, block_size: int | None) -> dict:
    """The :class:`ExternalConfig` fields that say how the model is called: its time input and
    its block-diffusion input."""
    return {"time_input": conv.time_input != "none", "time_as": "t" if conv.time_input == "none" else conv.time_input,
            "time_arg": conv.time_arg, "schedule": conv.schedule, "block_size": block_size,
            "clean_context": block_size is not None}


def _block_size(path: str, config, conv: TeacherConventions) -> int | None:
    """A block-diffusion model's block size (its config's ``block_size``), ``None`` for others;
    only the ``[x_t, x_0]`` training interface (``cross_attn``) is supported."""
    if not conv.block_diffusion:
        return None
    if conv.process != "masked":
        raise ValueError(f"teacher {path}: block diffusion is distilled as masked diffusion")
    if not getattr(config, "cross_attn", True):
        raise ValueError(f"teacher {path}: a {conv.family} model without cross_attn (its [x_t, x_0] training "
                         f"interface) cannot be called block by block")
    size = getattr(config, "block_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"teacher {path}: a {conv.family} model needs a block_size >= 1 in its config, got {size!r}")
    return size


def _num_classes(path: str, model, config, tokenizer, conv: TeacherConventions, block_size: int | None) -> int:
    """The width of the model's logits, from one call on a short all-zero sequence; it must be
    the config's vocab_size or the tokenizer's length (else the model is not what its directory
    says)."""
    import torch

    # (the probe's class count and mask are placeholders: only the call matters)
    probe = ExternalDenoiser(model, ExternalConfig(num_classes=2, process="masked", mask_id=1,
                                                   **_call_options(conv, block_size)))
    ref = next(model.parameters(), None)
    z = torch.zeros((1, block_size or 2), dtype=torch.long, device=ref.device if ref is not None else "cpu")
    try:
        with torch.no_grad():
            width = int(probe.raw_logits(z, torch.full((1,), 0.5, device=z.device)).shape[-1])
    except Exception as e:
        raise ValueError(f"teacher {path}: a call with {conv.describe()} failed ({type(e).__name__}: {e}); set the "
                         f"conventions that fit the model (--time-input, --time-arg)") from None
    expected = {getattr(config, "vocab_size", None), None if tokenizer is None else len(tokenizer)} - {None}
    if expected and width not in expected:
        raise ValueError(f"teacher {path}: its logits have {width} classes, matching neither the config's vocab_size "
                         f"({getattr(config, 'vocab_size', None)}) nor the tokenizer "
                         f"({None if tokenizer is None else len(tokenizer)})")
    return width


def save_masked_lm(denoiser: ExternalDenoiser, path: str, *, meta: dict, tokenizer=None,
                   code_from: str | None = None) -> None:
    """Write ``denoiser``'s masked LM to ``path`` as a transformers directory
    (``save_pretrained``), its tokenizer, its noise projection (``noise.safetensors``) and
    ``meta`` with the noise settings and the conventions it is called by as ``dmmd.json``; the
    ``.py`` files of ``code_from`` (the teacher's directory: a model whose code ships with it)
    too, so the directory loads with the same ``from_pretrained`` call as the teacher's; all or
    nothing (a temporary directory renamed into place)."""
    from safetensors.torch import save_file

    cfg = denoiser.config
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-model-", dir=parent)
    try:
        with _quiet():
            denoiser.model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if code_from is not None:
            for name in sorted(os.listdir(code_from)):
                if name.endswith(".py") and not os.path.exists(os.path.join(tmp, name)):
                    shutil.copyfile(os.path.join(code_from, name), os.path.join(tmp, name))
        noise = {}
        if denoiser.noise_proj is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in denoiser.noise_proj.state_dict().items()},
                      os.path.join(tmp, NOISE))
            noise = {"dim": cfg.noise_dim, "per": cfg.noise_per, "module": cfg.noise_module}
        conventions = {"time_input": cfg.time_as if cfg.time_input else "none", "time_arg": cfg.time_arg,
                       "shift_logits": cfg.shift_logits, "mask_id": cfg.mask_id,
                       "schedule": meta.get("schedule") or cfg.schedule or None}
        write_json_atomic(os.path.join(tmp, META), {**meta, "mask_id": cfg.mask_id, "never": cfg.never,
                                                     "noise": noise, "conventions": conventions})
        make_readable(tmp)
        os.chmod(tmp, 0o755)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def source_tokenizer(vocab_size: int):
    """A word-level tokenizer for a source's ids ``0 .. V-1`` (written as the numbers), then
    ``[MASK]`` (id ``V``) and ``[PAD]`` (id ``V + 1``): what a teacher trained on our sources
    saves, so its directory names its own mask token."""
    transformers = _transformers()
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {str(i): i for i in range(vocab_size)} | {MASK_TOKEN: vocab_size, PAD_TOKEN: vocab_size + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, mask_token=MASK_TOKEN, pad_token=PAD_TOKEN,
                                                unk_token=PAD_TOKEN)


# architectures whose position ids start after the padding id (RoBERTa's convention)
POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert")
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")


def build_masked_lm(config_file: str, vocab_size: int, length: int) -> tuple[ExternalDenoiser, object]:
    """A freshly initialised masked LM (draws from the global torch RNG: seed it first) from the
    transformers config JSON ``config_file`` (its ``model_type`` names the architecture), for a
    source of ``vocab_size`` tokens: ids ``0 .. V-1`` are the data, ``V`` the mask, ``V + 1``
    padding (every special token id of the config points there; never drawn), classes past it
    too. The config's ``vocab_size``, if given, must leave room for them; without it the model
    has exactly ``V + 2`` classes. Returns the denoiser and its tokenizer."""
    transformers = _transformers()
    try:
        with open(config_file) as f:
            values = json.load(f)
    except OSError as e:
        raise ValueError(f"model_config {config_file}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"model_config {config_file}: not valid JSON ({e})") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f"model_config {config_file}: a transformers config needs a model_type (e.g. \"bert\")")
    need = vocab_size + 2
    values.setdefault("vocab_size", need)
    if values["vocab_size"] < need:
        raise ValueError(f"model_config {config_file}: vocab_size {values['vocab_size']} leaves no room for the "
                         f"data's {vocab_size} tokens, the mask and padding (at least {need})")
    pad = vocab_size + 1
    if values["model_type"] in POSITIONS_AFTER_PADDING:
        values.setdefault("max_position_embeddings", pad + 1 + length)
        if values["max_position_embeddings"] < pad + 1 + length:
            raise ValueError(f"model_config {config_file}: {values['model_type']} numbers positions after its padding "
                             f"id ({pad} here), so max_position_embeddings must be at least {pad + 1 + length} for "
                             f"length {length}, got {values['max_position_embeddings']}")
    for name in SPECIAL_IDS:
        if name == "pad_token_id" or not 0 <= (values.get(name) or 0) < values["vocab_size"]:
            values[name] = pad
    try:
        config = transformers.AutoConfig.for_model(**values)
        model = transformers.AutoModelForMaskedLM.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"model_config {config_file}: not a masked LM configuration ({e})") from None
    denoiser = ExternalDenoiser(model, ExternalConfig(
        num_classes=values["vocab_size"], process="masked", mask_id=vocab_size, time_input=False,
        never=list(range(pad, values["vocab_size"]))))
    limit = _max_length(model.config)
    if limit is not None and limit < length:
        raise ValueError(f"model_config {config_file}: max_position_embeddings allows {limit} tokens, "
                         f"the data's length is {length}")
    denoiser.config.length = limit
    return denoiser, source_tokenizer(vocab_size)


def _max_length(config) -> int | None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and getattr(config, "model_type", "") in POSITIONS_AFTER_PADDING:
        limit -= config.pad_token_id + 1  # RoBERTa's positions start after its padding index
    return limit


def masked_lm_state(denoiser: ExternalDenoiser) -> dict:
    """What a dmmd checkpoint saves to rebuild a masked LM's architecture (:func:`rebuild_masked_lm`)."""
    return {"external": denoiser.config.to_dict(), "transformers_config": denoiser.model.config.to_dict()}


def rebuild_masked_lm(state: dict) -> ExternalDenoiser:
    """An untrained denoiser of the architecture :func:`masked_lm_state` recorded (load the
    checkpoint's weights into it)."""
    transformers = _transformers()
    if "auto_map" in state["transformers_config"]:
        raise ValueError("this model is code shipped with its teacher (config auto_map), which a run's checkpoint "
                         "does not hold: load the run's transformers directory (OUT/student) with trust_remote_code")
    config = transformers.AutoConfig.for_model(**state["transformers_config"])
    model = transformers.AutoModelForMaskedLM.from_config(config)
    return ExternalDenoiser.from_config(model, state["external"])

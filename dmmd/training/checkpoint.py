"""Checkpoints: a directory with ``weights.safetensors`` (every tensor: model, EMA, optimizer
state) and ``state.json`` (configs, step, scalar optimizer state); an FSDP run's holds the same
tensors in ``torch.distributed.checkpoint``'s files instead (:mod:`dmmd.training.sharding`),
read whole by the same functions.

Writes survive a kill at any moment. The new checkpoint is written and fsynced in a temporary
directory beside ``path``; then the old one is renamed to ``.NAME.old``, the new one renamed to
``path`` and the old one removed (each rename fsynced in the parent). A kill between the two
renames leaves no ``path`` but a complete ``.NAME.old``: :func:`checkpoint_exists` with
``repair=True`` (what a resuming run calls) moves it back, and readers fall back to it. So a
killed run loses at most the steps since its last completed checkpoint.

A missing, truncated or corrupt checkpoint raises :class:`CheckpointError` (a ``ValueError``)
naming the file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


def _old_path(path: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.old")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def checkpoint_exists(path: str, *, repair: bool = False) -> bool:
    """Whether a complete checkpoint is at ``path`` (or left at ``.NAME.old`` by a kill between
    the two renames of a save; ``repair`` moves it back to ``path``). With ``repair``, leftovers
    of interrupted saves are removed."""
    old = _old_path(path)
    if repair:
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(parent):
            for entry in os.listdir(parent):
                if entry.startswith(".tmp-ckpt-"):
                    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
        elif os.path.exists(old):
            os.replace(old, path)
            _fsync_dir(parent)
    return os.path.exists(path) or os.path.exists(old)


def _readable(path: str) -> str:
    """The directory that holds the checkpoint saved at ``path``."""
    if not os.path.exists(path) and os.path.exists(_old_path(path)):
        return _old_path(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: no such directory")
    return path


def flatten_optimizer_state(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's ``state_dict()`` as named tensors (for the weights file) and the JSON
    scalars beside them (param groups, step counts)."""
    tensors, scalars = {}, {"param_groups": opt_state["param_groups"], "state": {}}
    for pid, st in opt_state["state"].items():
        scalars["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.contiguous()
                scalars["state"][str(pid)][k] = {"tensor": f"optim.{pid}.{k}"}
            else:
                scalars["state"][str(pid)][k] = v
    return tensors, scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state = {}
    for pid, st in scalars["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in st.items()}
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_checkpoint(path: str, *, models: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
                    optimizers: dict[str, torch.optim.Optimizer] | None = None, state: dict | None = None) -> None:
    """Write ``path/`` atomically. ``models``: name -> module (or state dict); ``state``: JSON."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"state": state or {}, "optimizers": {}}
    seen: set[int] = set()
    for name, m in models.items():
        sd = m.state_dict() if isinstance(m, torch.nn.Module) else m
        for k, v in sd.items():
            v = v.detach().contiguous().cpu()
            if v.data_ptr() in seen and v.numel():  # tied weights: safetensors stores each tensor once
                v = v.clone()
            seen.add(v.data_ptr())
            tensors[f"{name}/{k}"] = v
    for name, opt in (optimizers or {}).items():
        t, scalars = flatten_optimizer_state(opt.state_dict())
        tensors.update({f"{name}/{k}": v.cpu() for k, v in t.items()})
        meta["optimizers"][name] = scalars
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    checkpoint_exists(path, repair=True)  # a kill between the renames of the last save: undo it
    tmp = tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, "weights.safetensors"))
        finish_checkpoint(tmp, path, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finish_checkpoint(tmp: str, path: str, meta: dict) -> None:
    """Complete a checkpoint whose tensor files are written in ``tmp`` (beside ``path``): its
    ``state.json`` from ``meta``, every file and the directory fsynced, readable like any output
    the user writes (mkdtemp makes the directory 0700, safetensors its files 0600), then moved
    to ``path`` (:func:`replace_directory`)."""
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for entry in os.listdir(tmp):
        if entry != "state.json":
            _fsync_file(os.path.join(tmp, entry))
    make_readable(tmp)
    os.chmod(tmp, 0o755)
    _fsync_dir(tmp)
    replace_directory(tmp, path)


def replace_directory(tmp: str, path: str) -> None:
    """Put the complete directory ``tmp`` at ``path`` (beside it, on the same file system):
    an existing ``path`` is moved to ``.NAME.old`` first (``os.replace`` cannot replace a
    non-empty directory) and removed after; each rename fsynced in the parent."""
    parent = os.path.dirname(os.path.abspath(path))
    old = _old_path(path)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint_meta(path: str) -> dict:
    """A checkpoint's ``state.json`` (``CheckpointError`` naming the file if missing or corrupt)."""
    file = os.path.join(path, "state.json")
    try:
        with open(file) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: {file} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {file} is corrupt ({e})") from None
    if not isinstance(meta, dict) or "state" not in meta:
        raise CheckpointError(f"checkpoint {path}: {file} is not a dmmd checkpoint state")
    return meta


def read_checkpoint_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by name, read whole (an FSDP run's shards gathered)."""
    from dmmd.training.sharding import is_sharded_checkpoint, read_full_tensors

    if is_sharded_checkpoint(path):  # written by every rank of an FSDP run: read whole
        try:
            return read_full_tensors(path)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path}: its sharded files are truncated or corrupt ({e})") from None
    file = os.path.join(path, "weights.safetensors")
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path}: {file} is missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {file} is truncated or corrupt ({e})") from None


def load_checkpoint(path: str, *, models: dict[str, torch.nn.Module] | None = None,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None) -> dict:
    """Load what ``save_checkpoint`` wrote into the given modules and optimizers; returns the
    JSON ``state``. A name missing from the checkpoint, or weights that do not fit the module,
    raise :class:`CheckpointError`."""
    path = _readable(path)
    meta = read_checkpoint_meta(path)
    tensors = read_checkpoint_tensors(path)
    for name, m in (models or {}).items():
        prefix = f"{name}/"
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"checkpoint {path} has no weights for {name!r}")
        try:
            m.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path}: the weights of {name!r} do not fit the model ({e})") from None
    for name, opt in (optimizers or {}).items():
        prefix = f"{name}/"
        t = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if name not in meta["optimizers"]:
            raise CheckpointError(f"checkpoint {path} has no optimizer {name!r}")
        opt.load_state_dict(_unflatten_optimizer(t, meta["optimizers"][name]))
    return meta["state"]


def make_readable(directory: str) -> None:
    """Files under ``directory`` readable like any the user writes (0644): safetensors, and so
    transformers' ``save_pretrained``, write 0600."""
    for root, _, files in os.walk(directory):
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def write_json_atomic(path: str, obj) -> None:
    """``json.dump`` to a temporary file beside ``path``, fsync, then one ``os.replace``; the
    file is readable like any the user writes (0644)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_state(path: str) -> dict:
    """The JSON ``state`` of a checkpoint without loading any tensor."""
    return read_checkpoint_meta(_readable(path))["state"]


def load_tensors(path: str, name: str) -> dict[str, torch.Tensor]:
    """The state dict saved under ``name`` (e.g. ``"model"`` or ``"ema"``)."""
    path = _readable(path)
    prefix = f"{name}/"
    sd = {k[len(prefix):]: v for k, v in read_checkpoint_tensors(path).items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"checkpoint {path} has no weights for {name!r}")
    return sd

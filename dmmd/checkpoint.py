"""Checkpoints: a directory with ``weights.safetensors`` (every tensor: model, EMA, optimizer
state) and ``state.json`` (configs, step, scalar optimizer state), written to a temporary
directory and moved into place with one ``os.replace``, so a crash never leaves half a
checkpoint behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
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
        t, scalars = _flatten_optimizer(opt.state_dict())
        tensors.update({f"{name}/{k}": v.cpu() for k, v in t.items()})
        meta["optimizers"][name] = scalars
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, "weights.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(meta, f, indent=1)
        old = None
        if os.path.exists(path):  # os.replace cannot replace a non-empty directory: swap it out
            old = tempfile.mkdtemp(prefix=".old-ckpt-", dir=parent)
            os.replace(path, os.path.join(old, "ckpt"))
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(path: str, *, models: dict[str, torch.nn.Module] | None = None,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None) -> dict:
    """Load what ``save_checkpoint`` wrote into the given modules and optimizers; returns the
    JSON ``state``. A name missing from the checkpoint raises ``KeyError``."""
    tensors = load_file(os.path.join(path, "weights.safetensors"))
    with open(os.path.join(path, "state.json")) as f:
        meta = json.load(f)
    for name, m in (models or {}).items():
        prefix = f"{name}/"
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not sd:
            raise KeyError(f"checkpoint {path} has no weights for {name!r}")
        m.load_state_dict(sd)
    for name, opt in (optimizers or {}).items():
        prefix = f"{name}/"
        t = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        opt.load_state_dict(_unflatten_optimizer(t, meta["optimizers"][name]))
    return meta["state"]


def write_json_atomic(path: str, obj) -> None:
    """``json.dump`` to a temporary file beside ``path``, then one ``os.replace``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_state(path: str) -> dict:
    """The JSON ``state`` of a checkpoint without loading any tensor."""
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)["state"]


def load_tensors(path: str, name: str) -> dict[str, torch.Tensor]:
    """The state dict saved under ``name`` (e.g. ``"model"`` or ``"ema"``)."""
    prefix = f"{name}/"
    return {k[len(prefix):]: v for k, v in load_file(os.path.join(path, "weights.safetensors")).items()
            if k.startswith(prefix)}

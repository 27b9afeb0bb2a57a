"""FSDP2 for the run loop: a run's models sharded across the ranks with PyTorch's own
``fully_shard`` (``--parallel fsdp``), and their checkpoints written with
``torch.distributed.checkpoint`` (every rank writes its shards).

Each model is sharded per unit (a transformer block: dmmd's ``Block``, a transformers model's
``_no_split_modules`` classes, or the classes named by ``shard_modules``), then as a whole for
what is left (embeddings, output layer, and any unit holding a weight tied to one outside it):
a unit's parameters are gathered for its forward and backward only. Gradients are
reduce-scattered, so every rank's optimizer steps its own shard; the EMA is sharded like the
model it follows, the frozen teacher too. Activation checkpointing (``checkpoint_units``)
wraps the same units.

A sharded checkpoint keeps the layout of an ordinary one (``models/param`` and
``optimizer/optim.<index>.<name>`` tensors, ``state.json`` beside them) in
``torch.distributed.checkpoint``'s files, so it resumes at any world size, sharded or not, and
:func:`read_full_tensors` reads it whole without a process group (``load_student``,
``dmmd sample``).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

PARALLEL = ("ddp", "fsdp")
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a checkpoint directory


def is_sharded_run(parallel: str) -> bool:
    """Whether a run with this ``parallel`` option shards its models: fsdp in a process group
    (torchrun; a group of one too)."""
    return parallel == "fsdp" and dist.is_available() and dist.is_initialized()


def is_sharded_checkpoint(path: str) -> bool:
    """Whether the checkpoint directory ``path`` was written by :func:`save_sharded`."""
    return os.path.isfile(os.path.join(path, DCP_METADATA))


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a sharded tensor gathered (a collective: every rank must call it), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself when it is not sharded)."""
    return t.to_local() if is_dtensor(t) else t


def unit_classes(module: nn.Module, names: str = "") -> set[str]:
    """The class names whose instances are sharded on their own: ``names`` (comma-separated),
    else dmmd's ``Block`` and every ``_no_split_modules`` class a transformers model inside
    ``module`` declares."""
    given = {n.strip() for n in names.split(",") if n.strip()}
    if given:
        return given
    found = {"Block"}
    for m in module.modules():
        found.update(getattr(m, "_no_split_modules", None) or [])
    return found


def units_of(module: nn.Module, names: str = "") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each unit of ``module`` (:func:`unit_classes`)."""
    classes = unit_classes(module, names)
    units = [(n, m) for n, m in module.named_modules() if type(m).__name__ in classes and m is not module]
    if names and not units:
        have = sorted({type(m).__name__ for m in module.modules()})
        raise ValueError(f"shard_modules: the model has no module of the classes {sorted(classes)}; it has "
                         f"{have[:20]}")
    return units


def checkpoint_units(module: nn.Module, names: str = "") -> int:
    """Activation checkpointing of each unit of ``module`` (its forward recomputed in the
    backward pass, only its input kept); returns how many. Before :func:`shard`."""
    from torch.distributed._composable import checkpoint

    units = [m for _, m in units_of(module, names)]
    for m in units:
        checkpoint(m)
    return len(units)


def shard(module: nn.Module, mesh, names: str = "") -> int:
    """Shard ``module`` in place (its units, then the rest); returns how many units were sharded
    on their own (``ValueError`` when ``names`` names classes the model does not have). On CUDA
    the gathered weights are bf16 for compute, gradients reduced and master weights kept in
    float32 (FSDP2's MixedPrecisionPolicy); on the CPU everything stays float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mesh.device_type == "cuda" else MixedPrecisionPolicy()

    units = units_of(module, names)
    # where each parameter occurs: a unit holding a weight tied to one outside it (BERT's input
    # embedding and output layer) is left to the whole model's group, which holds both
    places: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        places.setdefault(id(p), []).append(name)
    sharded = 0
    for prefix, m in units:
        inside = [p for p in m.parameters()]
        if not inside or any(not all(n.startswith(prefix + ".") for n in places[id(p)]) for p in inside):
            continue
        fully_shard(m, mesh=mesh, mp_policy=policy)
        sharded += 1
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return sharded


def all_finite(module: nn.Module, world: int) -> bool:
    """Whether every parameter of ``module`` is finite on every rank (one all-reduce when sharded)."""
    params = [local(p) for p in module.parameters()]
    ok = all(bool(torch.isfinite(p).all()) for p in params)
    if world > 1:  # on the parameters' device: NCCL reduces CUDA tensors only
        flag = torch.tensor([float(ok)], device=params[0].device if params else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag[0] > 0)
    return ok


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its state tensors (zeros; shaped and sharded like its parameters)
    without changing any parameter, so a checkpoint can be loaded into them in place."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(optimizer)


def checkpoint_tensors(models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
                       ) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a checkpoint (the models' state and the optimizers' state tensors, by the
    names an ordinary checkpoint gives them; sharded ones stay sharded) and the optimizers'
    scalars for ``state.json``."""
    from dmmd.training.checkpoint import flatten_optimizer_state

    tensors: dict[str, torch.Tensor] = {}
    for name, m in models.items():
        tensors.update({f"{name}/{k}": v for k, v in m.state_dict().items()})
    scalars = {}
    for name, opt in optimizers.items():
        t, scalars[name] = flatten_optimizer_state(opt.state_dict())
        tensors.update({f"{name}/{k}": v for k, v in t.items()})
    return tensors, scalars


def save_sharded(path: str, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                 state: dict, rank: int) -> None:
    """Write the checkpoint ``path`` from every rank (each writes its shards), atomically: into a
    temporary directory beside it, then completed and moved into place by rank 0 as an ordinary
    checkpoint is (:func:`~dmmd.training.checkpoint.finish_checkpoint`)."""
    import shutil

    import torch.distributed.checkpoint as dcp

    from dmmd.training.checkpoint import checkpoint_exists, finish_checkpoint

    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".tmp-ckpt-sharded-{os.path.basename(os.path.abspath(path))}")
    if rank == 0:
        os.makedirs(parent, exist_ok=True)
        checkpoint_exists(path, repair=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    tensors, scalars = checkpoint_tensors(models, optimizers)
    dcp.save(tensors, checkpoint_id=tmp)
    dist.barrier()
    try:
        if rank == 0:
            finish_checkpoint(tmp, path, {"state": state, "optimizers": scalars, "format": "sharded"})
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        dist.barrier()


def load_into(path: str, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
              scalars: dict) -> None:
    """Load the checkpoint ``path`` (sharded or ordinary) into sharded ``models`` and
    ``optimizers`` in place, at any world size: a sharded one through
    ``torch.distributed.checkpoint`` (each rank reads what its shards need), an ordinary one
    read whole and cut into this rank's shards."""
    from torch.distributed.tensor import distribute_tensor

    from dmmd.training.checkpoint import CheckpointError, read_checkpoint_tensors

    for opt in optimizers.values():
        init_optimizer_state(opt)
    template, _ = checkpoint_tensors(models, optimizers)
    if is_sharded_checkpoint(path):
        import torch.distributed.checkpoint as dcp

        try:
            dcp.load(template, checkpoint_id=path)
        except Exception as e:  # a missing key or a shape that does not fit, named by DCP
            raise CheckpointError(f"checkpoint {path}: does not fit the run's models ({e})") from None
    else:
        tensors = read_checkpoint_tensors(path)
        missing = sorted(set(template) - set(tensors))
        if missing:
            raise CheckpointError(f"checkpoint {path} has no {missing[0]!r}")
        with torch.no_grad():
            for key, t in template.items():
                whole = tensors[key].to(dtype=t.dtype, device=local(t).device)
                if tuple(whole.shape) != tuple(t.shape):
                    raise CheckpointError(f"checkpoint {path}: {key} is {list(whole.shape)}, the run's is "
                                          f"{list(t.shape)}")
                part = distribute_tensor(whole, t.device_mesh, t.placements).to_local() if is_dtensor(t) else whole
                local(t).copy_(part)
    for name, opt in optimizers.items():  # hyper-parameters as saved (the learning rate is set each step)
        for group, saved in zip(opt.param_groups, scalars.get(name, {}).get("param_groups", []), strict=False):
            group.update({k: v for k, v in saved.items() if k != "params"})


def read_full_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, whole, on the CPU, without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path)
    meta = reader.read_metadata()
    out = {key: torch.empty(tuple(m.size), dtype=m.properties.dtype)
           for key, m in meta.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, storage_reader=reader, no_dist=True)
    return out

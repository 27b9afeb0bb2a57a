"""Any model as a denoiser: the protocol the distiller, the run loop and the sampler work with.

A teacher is any ``nn.Module`` (or callable) mapping ``(z_t [B, L] int64, t [B] float)`` to
logits ``[B, L, V]``, or ``z_t`` alone for a model without a time input (most transformers
masked LMs; masked diffusion tells the time by the masks). :func:`as_denoiser` wraps one into
:class:`ExternalDenoiser`, which speaks the same language as dmmd's own
:class:`~dmmd.models.denoiser.Denoiser`: ``(z_t, t, noise=None) -> float32 logits``, with

- classes that must never be drawn (the mask class, padding of the vocabulary to a multiple of
  64) at ``-inf`` (the ops' rule for impossible classes), and for masked diffusion an unmasked
  position carrying its own token;
- the generator's Gaussian noise entering through learned projections added to the outputs of
  submodules the user names (default: the input embeddings; naming every block's output is
  what ``noise_into="blocks"`` does for dmmd's denoiser), installed from outside by
  :meth:`ExternalDenoiser.install_noise` (forward hooks that act during the call), so the
  user's model class is never edited. The projections are parameters of the wrapper, saved
  with the student.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dmmd.diffusion.processes import masked_output_rule
from dmmd.diffusion.schedules import get_schedule
from dmmd.models.noise import NOISE_PER, NoiseSpec, check_noise, init_projections


@dataclass
class ExternalConfig:
    """What dmmd knows about a wrapped model (saved with its checkpoints as JSON)."""

    num_classes: int                 # V, the model's output classes (with the mask and any padding)
    process: str = "masked"
    mask_id: int | None = None       # masked: the mask class (default V - 1)
    time_input: bool = True          # whether the model takes a time
    time_as: str = "t"               # the time it takes: t in [0, 1], or sigma = -log alpha_t (MDLM, DUO)
    time_arg: str = ""               # the time's keyword argument ("": the second positional argument)
    schedule: str = ""               # the schedule that turns t into sigma (time_as "sigma")
    shift_logits: bool = False       # output i predicts token i + 1 (Dream): realigned before use
    never: list[int] = field(default_factory=list)  # classes never drawn (logit -inf), besides the mask
    noise_dim: int = 0
    noise_per: str = "sequence"
    noise_module: str = ""           # submodules (comma-separated) the noise is added to ("": input embeddings)
    head: str = ""                   # the output layer (an nn.Linear): "" its output embeddings, if it has them
    length: int | None = None        # the most tokens the model takes (None: not known)
    # block diffusion (BD3-LM): blocks of this many tokens, each denoised given the clean blocks
    # before it; with clean_context the model takes [z_t, x_0] (2L tokens) and returns the first
    # L positions' logits, and the wrapper passes z_t as both halves (the blocks before a noisy
    # one are clean in z_t, and a block sees only the clean blocks before it)
    block_size: int | None = None
    clean_context: bool = False
    # what dmmd's own denoiser has and a wrapped model does not
    image_shape = None

    def __post_init__(self):
        if self.process not in ("masked", "uniform"):
            raise ValueError(f"process must be 'masked' or 'uniform', got {self.process!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.process == "masked":
            if self.mask_id is None:
                self.mask_id = self.num_classes - 1
            if not 0 <= self.mask_id < self.num_classes:
                raise ValueError(f"mask_id {self.mask_id} is outside the model's vocabulary of "
                                 f"{self.num_classes} classes")
        elif self.mask_id is not None:
            raise ValueError("mask_id is only meaningful for masked diffusion")
        self.never = sorted({int(c) for c in self.never} - {self.mask_id})
        bad = [c for c in self.never if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"never: classes {bad[:5]} are outside the model's vocabulary of {self.num_classes}")
        if self.process == "uniform" and self.never:
            raise ValueError("uniform diffusion draws every class of the model (its prior is uniform over them): "
                             "classes that are never drawn need masked diffusion")
        if self.clean_context and (self.block_size is None or self.process != "masked"):
            raise ValueError("clean_context (block diffusion's [x_t, x_0] input) needs masked diffusion and a "
                             "block_size")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.time_as not in ("t", "sigma"):
            raise ValueError(f"time_as must be 't' or 'sigma', got {self.time_as!r}")
        if self.time_input and self.time_as == "sigma":
            schedule = get_schedule(self.schedule)  # names the schedule when it is unknown
            if not float(schedule.alpha(torch.ones(()))) > 0:
                raise ValueError(f"schedule: sigma = -log alpha_t is infinite at t = 1 under the {self.schedule} "
                                 f"schedule; a model that takes sigma was trained with another (MDLM: loglinear)")
        if self.noise_per not in NOISE_PER or self.noise_per == "pyramid":
            raise ValueError(f"noise_per must be 'token' or 'sequence' for a wrapped model, got {self.noise_per!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def takes_time(model: Callable) -> bool:
    """Whether ``model``'s call takes a second positional argument (the time)."""
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2


class _Callable(nn.Module):
    """A plain callable as a module (its parameters, if any, are not dmmd's to train)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class ExternalDenoiser(nn.Module):
    """A user's model under dmmd's denoiser protocol; see the module docstring."""

    def __init__(self, model: nn.Module | Callable, config: ExternalConfig):
        super().__init__()
        self.model = model if isinstance(model, nn.Module) else _Callable(model)
        self.config = config
        self.noise_proj: nn.ModuleList | None = None  # one projection per target module
        self._noise: torch.Tensor | None = None  # the current call's noise, read by the hook
        if config.noise_dim > 0:
            self._build_noise()

    @classmethod
    def from_config(cls, model: nn.Module | Callable, config: dict) -> ExternalDenoiser:
        """``model`` (freshly built, weights to be loaded) under the saved ``config`` dict, its
        noise input rebuilt (with zero projections)."""
        values = dict(config)
        dim, per = values.pop("noise_dim"), values.pop("noise_per")
        wrapped = cls(model, ExternalConfig(**values))
        if dim > 0:
            wrapped.install_noise(dim, per)
        return wrapped

    # ---------------------------------------------------------------- noise

    def noise_targets(self) -> list[nn.Module]:
        """The submodules whose outputs the noise projections are added to: those named in
        ``noise_module`` (comma-separated dotted names), by default the input embeddings."""
        names = self._noise_module_names()
        if names:
            found = []
            for name in names:
                try:
                    found.append(self.model.get_submodule(name))
                except AttributeError:
                    raise ValueError(f"noise_module: the model has no submodule {name!r}") from None
            return found
        embed = _ask(self.model, "get_input_embeddings")
        if embed is None:
            embed = next((m for m in self.model.modules() if isinstance(m, nn.Embedding)), None)
        if embed is None:
            raise ValueError("noise_module: the model has no input embeddings (nn.Embedding); name the submodule "
                             "whose output the generator's noise should be added to")
        return [embed]

    def _noise_module_names(self) -> list[str]:
        """The submodules named in ``noise_module`` (comma-separated), none for the default."""
        return [n.strip() for n in self.config.noise_module.split(",") if n.strip()]

    def _target_names(self) -> list[str]:
        """How the error messages name the noise targets."""
        return self._noise_module_names() or ["the input embeddings"]

    @torch.no_grad()
    def _output_widths(self, targets: list[nn.Module]) -> list[int]:
        """The last dimension of each target's output, from one probe call of the model on
        ``length`` tokens (2 when the model's length is not known); each output must be per
        token, ``[B, L, width]``, since the noise ``[B, L, noise_dim]`` is projected onto it."""
        shapes: dict[int, tuple[int, ...]] = {}

        def grab(i):
            def hook(module, inputs, output):
                first = output[0] if isinstance(output, tuple) else output
                shapes[i] = tuple(first.shape) if torch.is_tensor(first) else ()
            return hook

        handles = [m.register_forward_hook(grab(i)) for i, m in enumerate(targets)]
        ref = next(self.model.parameters(), None)
        device = ref.device if ref is not None else "cpu"
        fill = self.config.mask_id if self.config.mask_id is not None else 0
        n = 2 if self.config.length is None else self.config.length
        z = torch.full((1, n), fill, device=device)
        wide = 2 * n if self.config.clean_context else n  # what the named modules see
        try:
            self._call(z, torch.full((1,), 0.5, device=device))
        except Exception as e:  # the probe is ours: say what it was and how to make it fit the model
            hint = (" (a model that takes a fixed number of tokens: give it as as_denoiser(..., length=L))"
                    if self.config.length is None else "")
            raise ValueError(f"noise_module: the probe call that finds the noise projections' widths (one all-mask "
                             f"sequence of {n} tokens) failed{hint}: {type(e).__name__}: {e}") from e
        finally:
            for h in handles:
                h.remove()
        names = self._target_names()
        missing = [i for i in range(len(targets)) if i not in shapes]
        if missing:
            raise ValueError(f"noise_module: {names[missing[0]]} ({type(targets[missing[0]]).__name__}) is not called "
                             f"in the model's forward; name a submodule that is")
        for i, shape in shapes.items():
            if len(shape) != 3 or shape[:2] != (1, wide):
                raise ValueError(f"noise_module: {names[i]} ({type(targets[i]).__name__}) outputs shape "
                                 f"{list(shape)} for one sequence of {wide} tokens; the noise is added per token, so "
                                 f"it needs [B, L, width] = [1, {wide}, width]: name a submodule with per-token "
                                 f"outputs")
        return [shapes[i][-1] for i in range(len(targets))]

    def install_noise(self, dim: int, per: str = "sequence", init: float = 0.0,
                      generator: torch.Generator | None = None, module: str | None = None) -> None:
        """Give the model a Gaussian noise input ``[B, L, dim]``: one projection ``dim -> width``
        per named submodule (``module``, comma-separated; default: the input embeddings), added
        to its output; zero or ``N(0, init^2)`` at first (zero leaves the model as it was)."""
        if self.noise_proj is not None:
            raise ValueError("this model already has a noise input")
        if dim < 1:
            raise ValueError(f"noise_dim must be >= 1, got {dim}")
        before = self.config.to_dict()
        self.config.noise_dim, self.config.noise_per = dim, per
        if module is not None:
            self.config.noise_module = module
        try:
            self.config.__post_init__()
            self._build_noise()
        except Exception:
            self.config = ExternalConfig(**before)  # as it was: no noise input
            raise
        init_projections(self.noise_proj, init, generator)

    def _build_noise(self) -> None:
        cfg = self.config
        targets = self.noise_targets()
        widths = self._output_widths(targets)
        ref = next(self.model.parameters(), None)
        self.noise_proj = nn.ModuleList(nn.Linear(cfg.noise_dim, w, bias=False) for w in widths)
        init_projections(self.noise_proj, 0.0, None)
        if ref is not None:
            self.noise_proj.to(device=ref.device, dtype=ref.dtype)
        for i, target in enumerate(targets):
            target.register_forward_hook(functools.partial(self._add_noise, i))

    def _add_noise(self, i, module, inputs, output):
        if self._noise is None:
            return output
        first = output[0] if isinstance(output, tuple) else output
        if first.dim() != 3 or first.shape[:2] != self._noise.shape[:2]:
            raise ValueError(f"noise_module: {self._target_names()[i]} output shape {list(first.shape)} for noise "
                             f"{list(self._noise.shape)}; the noise is added per token and needs [B, L, width]")
        added = first + self.noise_proj[i](self._noise.to(first.dtype))
        return (added, *output[1:]) if isinstance(output, tuple) else added

    def noise_projections(self) -> list[nn.Linear]:
        return [] if self.noise_proj is None else list(self.noise_proj)

    @property
    def noise_spec(self) -> NoiseSpec | None:
        """The noise input (None without one); it enters at ``noise_module``'s outputs."""
        cfg = self.config
        return NoiseSpec(cfg.noise_dim, cfg.noise_per) if self.noise_proj is not None else None

    def draw_noise(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """A batch of this model's noise ``[batch, length, noise_dim]`` (:meth:`NoiseSpec.draw`)."""
        if self.noise_spec is None:
            raise ValueError("this model has no noise input (noise_dim 0)")
        return self.noise_spec.draw(batch, length, generator)

    # ---------------------------------------------------------------- the call

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, *,
                features: bool = False) -> torch.Tensor:
        """``z_t [B, L]`` int64, ``t [B]`` -> float32 logits ``[B, L, V]``; with ``features``
        the hidden states ``[B, L, d]`` its output layer (:meth:`output_head`) takes."""
        cfg = self.config
        if cfg.length is not None and z_t.shape[1] > cfg.length:
            raise ValueError(f"z_t has {z_t.shape[1]} tokens; the model takes at most {cfg.length}")
        head = self.head_layer() if features else None
        if features and head is None:
            raise ValueError("this model exposes no output layer (name it: as_denoiser(..., head=...))")
        check_noise(self.noise_spec, noise, z_t)
        if noise is not None and cfg.clean_context:  # the noise enters the noisy half only
            noise = torch.cat([noise, torch.zeros_like(noise)], dim=1)
        self._noise = noise
        if head is not None:  # the output layer passes its input through for this call
            own = head.__dict__.get("forward", _NONE)  # a forward set on the instance (accelerate, PEFT)
            head.forward = _identity
        try:
            logits = self.raw_logits(z_t, t)
        finally:
            self._noise = None
            if head is not None:  # exactly what was there before
                if own is _NONE:
                    del head.forward
                else:
                    head.forward = own
        if cfg.shift_logits:  # output i predicted token i + 1: position i's is output i - 1 (the first keeps its own)
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        if features:
            return logits
        want = (*z_t.shape, cfg.num_classes)
        if tuple(logits.shape) != want:
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; expected [B, L, V] = "
                             f"{list(want)} (B, L of z_t and the model's {cfg.num_classes} classes)")
        if logits.dtype != torch.float64:
            logits = logits.float()
        if cfg.never:
            logits = logits.index_fill(-1, torch.tensor(cfg.never, device=logits.device), float("-inf"))
        if cfg.process == "masked":
            logits = masked_output_rule(logits, z_t, cfg.mask_id)
        return logits

    def raw_logits(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's logits (or, for the fused losses, its final hidden states) for ``z_t``, as
        it returns them: not realigned, nothing set to ``-inf``."""
        logits = _logits_of(self._call(z_t, t))
        if self.config.clean_context and logits.shape[1] == 2 * z_t.shape[1]:
            logits = logits[:, : z_t.shape[1]]  # the noisy half's
        return logits

    def _call(self, z_t: torch.Tensor, t: torch.Tensor):
        """The wrapped model called as its family expects: no time, ``t``, or ``sigma =
        -log alpha_t``, positional or by keyword."""
        cfg = self.config
        if cfg.clean_context:
            z_t = torch.cat([z_t, z_t], dim=1)
        if not cfg.time_input:
            return self.model(z_t)
        value = t
        if cfg.time_as == "sigma":
            value = -torch.log(get_schedule(cfg.schedule).alpha(t.double())).to(t.dtype)
        return self.model(z_t, **{cfg.time_arg: value}) if cfg.time_arg else self.model(z_t, value)

    @torch.no_grad()
    def alignment_nll(self, x: torch.Tensor, generator: torch.Generator | None = None, *, chunk: int = 4
                      ) -> tuple[float, float]:
        """How well the model predicts a token of clean data ``x [B, L]`` masked alone at an inner
        position ``i`` (masked diffusion): the mean NLL (nats) of ``x_i`` under output ``i`` and
        under output ``i - 1``, i.e. with the logits aligned and with them shifted (output ``i``
        predicting token ``i + 1``), read before any realignment. ``chunk`` sequences per call
        (a large vocabulary's logits are made for few sequences at a time)."""
        cfg = self.config
        b, n = x.shape
        if cfg.process != "masked" or n < 3:
            raise ValueError("alignment_nll needs masked diffusion and sequences of at least 3 tokens")
        i = torch.randint(1, n - 1, (b,), generator=generator).to(x.device)
        never = torch.tensor([*cfg.never, cfg.mask_id], device=x.device)
        aligned, shifted = [], []
        for lo in range(0, b, chunk):
            rows = torch.arange(lo, min(lo + chunk, b), device=x.device)
            z = x[rows].clone()
            local = torch.arange(len(rows), device=x.device)
            z[local, i[rows]] = cfg.mask_id
            logits = self.raw_logits(z, torch.full((len(rows),), 1.0 / n, device=x.device))
            target = x[rows, i[rows]]
            for out, at in ((aligned, i[rows]), (shifted, i[rows] - 1)):
                logp = torch.log_softmax(logits[local, at].double().index_fill(-1, never, float("-inf")), -1)
                out.append(-logp[local, target])
            del logits
        return float(torch.cat(aligned).mean()), float(torch.cat(shifted).mean())

    def head_layer(self) -> nn.Linear | None:
        """The model's output layer: ``head`` by name, else its output embeddings (transformers
        models), if that is an ``nn.Linear`` to the model's classes; else ``None``."""
        if self.config.head:
            try:
                layer = self.model.get_submodule(self.config.head)
            except AttributeError:
                raise ValueError(f"head: the model has no submodule {self.config.head!r}") from None
        else:
            layer = _ask(self.model, "get_output_embeddings")
        if isinstance(layer, nn.Linear) and layer.out_features == self.config.num_classes:
            return layer
        if self.config.head:
            raise ValueError(f"head: {self.config.head!r} is not an nn.Linear to the model's "
                             f"{self.config.num_classes} classes")
        return None

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [V, d], bias [V])`` of the output layer, never-drawn classes and the mask
        at ``-inf`` in the bias (what the logits are where the model has a choice)."""
        layer = self.head_layer()
        if layer is None:
            raise ValueError("this model exposes no output layer (name it: as_denoiser(..., head=...))")
        bias = layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
        never = torch.zeros(bias.shape, dtype=torch.bool, device=bias.device)
        never[self.config.never] = True
        if self.config.process == "masked":
            never[self.config.mask_id] = True
        return layer.weight, bias.masked_fill(never, float("-inf"))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _ask(model: nn.Module, method: str):
    """``model.method()`` (a transformers model's input or output embeddings), or ``None`` when
    the model has no such method or it cannot say (custom code need not implement it)."""
    get = getattr(model, method, None)
    if not callable(get):
        return None
    try:
        return get()
    except NotImplementedError:
        return None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


_NONE = object()  # "no attribute" (a forward set to None would be a value)


def _logits_of(out) -> torch.Tensor:
    """The logits in what a model returned: a tensor, a transformers output or a tuple."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise ValueError(f"the model returned {type(out).__name__}; expected logits [B, L, V] (a tensor, or an "
                     f"output with .logits)")


def as_denoiser(model: nn.Module | Callable, *, num_classes: int, process: str = "masked",
                mask_id: int | None = None, time_input: bool | None = None, never=(),
                noise_module: str = "", head: str = "", length: int | None = None) -> ExternalDenoiser:
    """Wrap ``model`` for dmmd (see the module docstring).

    Args:
        model: ``(z_t, t) -> logits``, or ``z_t -> logits`` (``time_input=False``); the output
            may be a tensor, a transformers output (``.logits``) or a tuple led by the logits.
        num_classes: V, the model's output classes (masked: the mask included).
        mask_id: masked diffusion's mask class (default ``V - 1``).
        time_input: whether the model takes ``t`` (default: whether its call has two required
            positional arguments).
        never: classes that are never drawn besides the mask (padding of the vocabulary).
        noise_module: where a generator's noise enters (default: the input embeddings).
        head: the output layer (an ``nn.Linear`` to the classes), by dotted name, for the fused
            linear losses (default: the output embeddings of a transformers model).
        length: the most tokens the model takes, if it has such a limit.
    """
    if time_input is None:
        time_input = takes_time(model)
    return ExternalDenoiser(model, ExternalConfig(num_classes=num_classes, process=process, mask_id=mask_id,
                                                  time_input=time_input, never=list(never),
                                                  noise_module=noise_module, head=head, length=length))

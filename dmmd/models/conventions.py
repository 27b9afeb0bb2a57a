"""How a published diffusion teacher is called: its time input, whether its logits are shifted,
its mask, its schedule and its process, by family.

Published masked- and uniform-diffusion LMs share the transformers interface but not its
meaning: MDLM, BD3-LM and DUO take the total noise ``sigma = -log alpha_t`` as a ``timesteps``
argument; LLaDA and Dream take no time (masked diffusion tells the time by the masks); Dream was
initialised from an autoregressive LM and its output ``i`` predicts token ``i + 1``; DUO is
uniform-state. :data:`FAMILIES` records that per ``model_type`` (the config's, compared in lower
case); :func:`resolve_conventions` applies what the user sets (a fork that changed something, a
model of no known family) and says which values it used.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

TIME_INPUTS = ("none", "t", "sigma")
PROCESSES = ("masked", "uniform")


@dataclass(frozen=True)
class TeacherConventions:
    """One family's conventions (see the module docstring)."""

    family: str = ""              # the row of FAMILIES ("" for a model of no known family)
    process: str = "masked"
    time_input: str = "none"      # none, t (the diffusion time in [0, 1]) or sigma (-log alpha_t)
    time_arg: str = ""            # the time's keyword argument ("": the second positional argument)
    shift_logits: bool = False    # output i predicts token i + 1: realigned before use
    mask_id: int | None = None    # the mask token; None: the tokenizer's, else (mask_is_last) the last class
    mask_is_last: bool = False    # no tokenizer with the model: the mask is its last class (GPT-2 + mask)
    schedule: str = "loglinear"   # the schedule it was trained with
    block_diffusion: bool = False  # semi-autoregressive blocks (BD3-LM): its own training interface
    loaded_by: str = ""           # the transformers Auto class that loaded the model (set by the loader)

    def __post_init__(self):
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {self.time_input!r}")
        if self.process not in PROCESSES:
            raise ValueError(f"process must be one of {PROCESSES}, got {self.process!r}")
        if self.time_arg and not self.time_arg.isidentifier():
            raise ValueError(f"time_arg must be an argument name, got {self.time_arg!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line: every convention, as the run uses it."""
        time = "none" if self.time_input == "none" else \
            f"{self.time_input} as {self.time_arg or 'the second positional argument'}"
        mask = "-" if self.process == "uniform" else self.mask_id
        loaded = f", loaded by {self.loaded_by}" if self.loaded_by else ""
        return (f"family {self.family or 'none (flags only)'}, {self.process}, time input {time}, logits "
                f"{'shifted (realigned)' if self.shift_logits else 'aligned'}, mask id {mask}, schedule "
                f"{self.schedule}{loaded}")


# Read from each family's public modelling code (model_type as its config class sets it).
FAMILIES = {
    "mdlm": TeacherConventions("mdlm", time_input="sigma", time_arg="timesteps", mask_is_last=True),
    "bd3lm": TeacherConventions("bd3lm", time_input="sigma", time_arg="timesteps", mask_is_last=True,
                                block_diffusion=True),
    "duo": TeacherConventions("duo", process="uniform", time_input="sigma", time_arg="timesteps"),
    "llada": TeacherConventions("llada", mask_id=126336, schedule="linear"),
    "dream": TeacherConventions("dream", shift_logits=True, schedule="linear"),
}
# a transformers masked LM of no diffusion family (BERT, RoBERTa, ...): no time, mask from its tokenizer
PLAIN = TeacherConventions()
OVERRIDES = ("time_input", "time_arg", "shift_logits", "mask_id", "schedule")


def resolve_conventions(model_type: str, **given) -> TeacherConventions:
    """The conventions of a ``model_type`` (its family's, else those of a plain masked LM) with
    the values in ``given`` that are not ``None`` in their place (keys: :data:`OVERRIDES`)."""
    unknown = sorted(set(given) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"conventions: unknown {unknown}; known: {list(OVERRIDES)}")
    base = FAMILIES.get((model_type or "").lower(), PLAIN)
    set_ = {k: v for k, v in given.items() if v is not None and v != ""}
    if "mask_id" in set_:
        if base.process == "uniform":
            raise ValueError(f"mask_id: a {base.family} teacher is uniform-state diffusion (it has no mask); "
                             f"D-MMD distils it as uniform")
        set_["mask_is_last"] = False
    if set_.get("time_input") == "none":
        set_.setdefault("time_arg", "")
    return replace(base, **set_)

"""The options of a distillation run (:class:`DistillConfig`, saved with its checkpoints) and the
defaults that differ by diffusion process. Imports nothing of the distiller."""
from __future__ import annotations

import math
from dataclasses import dataclass

from dmmd.data import DataConfig
from dmmd.diffusion.schedules import SCHEDULES
from dmmd.models.conventions import TIME_INPUTS
from dmmd.models.noise import NoiseSpec, check_noise_options
from dmmd.options import Options, nested, option
from dmmd.training.loop import RunConfig
from dmmd_ops.reference import DIVERGENCES

WEIGHTS = ("constant", "elbo")
FORMS = ("xhat", "posterior")


# The defaults that differ by process, chosen on the exact-source study over seeds (README,
# "D-MMD on a source with an exactly known distribution"): a None option takes its process's.
# aux_per_gen: masked students take the paper's alternation (one auxiliary step per generator
# step), which the benchmark of exact sources measured better on five of its sources and digits
# over three seeds and worse on one (README, "The benchmark of exact sources"); uniform students
# keep two (one auxiliary step helped one of two rows tried and hurt the other).
# aux_teacher_weight: masked students drop eq. 12's teacher term (0), better on 11 of the 14
# masked rows of the benchmark and digits (k = 2 and 4, three seeds), worse on two (README,
# "Ninth round"); uniform students keep the paper's 1 (0 was worse on both sources tried).
# step_window (Algorithm 1's t - s ~ U(0, step_window / k)): masked students keep the paper's 1,
# the best of 0.5, 1 and 2 on both sources tried; uniform students take 1.5, with which every
# uniform row of the benchmark reaches the teacher at 4k steps over three seeds, 6 of 10 with 1
# (README, "Twelfth round"; 8% worse than 1 on soft4x6 at k = 4, still reaching); 2 was better
# still on four sources and 28-35% worse than 1 on soft4x6, losing a row.
PROCESS_DEFAULTS = {
    "masked": {"lr_schedule": "cosine", "soft_target": True, "noise_dim": 32, "noise_init": 0.1,
               "noise_into": "blocks", "aux_per_gen": 1, "aux_teacher_weight": 0.0, "step_window": 1.0},
    "uniform": {"lr_schedule": "constant", "soft_target": False, "noise_dim": 0, "noise_init": 0.02,
                "noise_into": "embedding", "aux_per_gen": 2, "aux_teacher_weight": 1.0, "step_window": 1.5},
}
# What the distiller did in the place of an option added since a checkpoint was written, where
# that differs from the option's default today: such a checkpoint is resumed only with that value
# (a masked run from before aux_teacher_weight existed ran eq. 12 with its teacher term; a run
# from before step_window existed, the paper's window).
ABSENT_OPTIONS = {"aux_teacher_weight": 1.0, "step_window": 1.0}
LR_SCHEDULES = ("constant", "cosine")
# From this many classes on, the distiller takes the fused linear losses by default (their
# chunking saves the [rows, V] logits; below it the whole logits are small and one matmul each
# is simpler).
FUSED_MIN_CLASSES = 16384


def _per_process(name: str) -> str:
    """The help's note on a per-process default."""
    return " (default: " + ", ".join(f"{PROCESS_DEFAULTS[k][name]} for {k}" for k in PROCESS_DEFAULTS) + ")"


@dataclass
class DistillConfig(Options):
    """Everything a distillation run needs; saved in its checkpoints."""

    teacher: str = option("runs/teacher/checkpoint", "the teacher: a checkpoint directory from train-teacher, or a "
                                                     "transformers masked-LM directory (save_pretrained)")
    mask_id: int | None = option(None, "a transformers teacher: its mask token id (default: the mask token of the "
                                       "tokenizer saved with it)")
    trust_remote_code: bool = option(False, "a transformers teacher whose model is code shipped in its directory "
                                            "(MDLM, BD3-LM, DUO, LLaDA, Dream): run that code")
    time_input: str = option("", "a transformers teacher: what its time argument is, none, t or sigma "
                                 "(-log alpha_t) (default: its family's, by model_type; none for others)")
    time_arg: str = option("", "a transformers teacher: the keyword of its time argument (default: its family's; "
                               "none: the second positional argument)")
    shift_logits: bool | None = option(None, "a transformers teacher whose output i predicts token i + 1 (Dream): "
                                             "realign its logits (default: its family's)")
    schedule: str = option("", "a transformers teacher: the noise schedule it was trained with (default: its "
                               "family's, or what dmmd saved with it; loglinear for others)")
    source: DataConfig = nested(DataConfig, data="")
    student_steps: int = option(4, "k, the student's sampling steps")
    # Algorithm 1 draws t - s ~ U(0, 1/k): z_s reveals anything from one of the generator's tokens
    # to a whole sampler step; a wider window lets z_s be cleaner than a sampler step, so the
    # teacher checks more of the generator's joint at once (why it differs by process: above).
    step_window: float | None = option(None, "Algorithm 1's window in student steps: t - s ~ U(0, step_window / "
                                             "k), t clamped at 1 (1: the paper's)" + _per_process("step_window"))
    teacher_raw_weights: bool = option(False, "distill the teacher's raw weights instead of its EMA")
    aux_per_gen: int | None = option(None, "auxiliary-model steps after each generator step"
                                     + _per_process("aux_per_gen"))
    lr_gen: float = option(3e-4, "AdamW learning rate of the generator")
    lr_aux: float = option(1e-3, "AdamW learning rate of the auxiliary model")
    lr_schedule: str | None = option(None, "learning rates after the warm-up: constant, or cosine (decay to a tenth "
                                           "at the last step)" + _per_process("lr_schedule"))
    beta1: float = option(0.0, "AdamW beta1 of both optimizers")
    beta2: float = option(0.99, "AdamW beta2 of both optimizers")
    weight_decay: float = option(0.0, "AdamW weight decay")
    ema: float = option(0.99, "decay of the generator's exponential moving average")
    weight: str = option("constant", "loss weight w(s): constant, or elbo (-alpha'(s) / (1 - alpha(s)))")
    # Eq. 12's second term pulls the auxiliary model towards the teacher: its minimiser is the mean
    # of the generator's and the teacher's conditionals, so where the generator is wrong the
    # auxiliary model reports half the error. Weight 0 leaves the auxiliary model the generator's
    # own conditional (the paper: the term does not change the fixed point).
    aux_teacher_weight: float | None = option(None, "weight of eq. 12's teacher term in the auxiliary loss (1: the "
                                                   "paper's; 0: the auxiliary model learns the generator's samples "
                                                   "alone)" + _per_process("aux_teacher_weight"))
    # Eq. 11 pulls the generator by log(teacher / aux) per class, the gradient of the reverse KL:
    # mode-seeking. Half the symmetric (Jeffreys) divergence's pull was 5-6% better for masked
    # students on the benchmark's three chains, worse on parity2x5 and for uniform students on four
    # sources (README, "Eleventh round"): the paper's stays the default for both processes.
    divergence: str = option("reverse_kl", "the generator's divergence in eq. 11: reverse_kl (the paper's) or "
                                           "jeffreys (half the symmetric KL: also pulls linearly into the classes "
                                           "the generator lacks; no fused linear loss)")
    soft_target: bool | None = option(None, "masked diffusion: train the auxiliary model on x_hat_eta(z_t) "
                                            "instead of the sample x" + _per_process("soft_target"))
    temperature: float = option(1.0, "teacher temperature (paper section 3.3)")
    top_p: float = option(1.0, "teacher top-p, applied as a soft mask")
    delta: float = option(2.0, "logit drop outside the teacher's top-p nucleus")
    noise_dim: int | None = option(None, "Gaussian noise input of the generator" + _per_process("noise_dim"))
    # One noise vector per sequence (shared by its tokens) and a small random initial projection:
    # with a zero projection the expected gradient towards using the noise is zero, and in the
    # masked Markov study (2026-11-28) masked generators left per-token noise unused.
    noise_init: float | None = option(None, "std of the generator's initial noise projections (0: the generator "
                                            "starts exactly as the teacher)" + _per_process("noise_init"))
    noise_per: str | None = option(None, "token: independent noise per token; sequence: one noise vector shared "
                                         "by a sequence's tokens; pyramid (images): Gaussian maps at halving "
                                         "resolutions, upsampled, one vector per pixel (default: pyramid for "
                                         "image teachers, else sequence)")
    noise_into: str | None = option(None, "where the noise's projections enter: the input embedding, also "
                                          "the residual stream before every block (blocks), or that and the time "
                                          "conditioning of every block's adaptive LayerNorm (conditioning)"
                                    + _per_process("noise_into"))
    noise_module: str = option("", "a transformers (or your own) teacher: the submodule, by dotted name, whose "
                                   "output the noise projection is added to (default: its input embeddings)")
    fused_losses: bool | None = option(None, "eq. 11/12 through the fused linear losses (dmmd_ops.linear_*): the "
                                             "logits made chunk by chunk from the models' final hidden states and "
                                             "output layers, never [rows, V] at once (default: on when V >= "
                                             f"{FUSED_MIN_CLASSES} and the models expose their output layer; not with "
                                             "form='posterior' or divergence='jeffreys')")
    form: str = option("xhat", "xhat (eq. 11/12) or posterior (Appendix D, uniform diffusion)")
    posterior_ds: float | None = option(None, "Appendix D: s - s' of the posterior vectors (none: 1/(2k))")
    draw_block: int = option(16, "sequences per random stream (keeps draws independent of the process count)")
    extra_blocks: int = option(0, "dmmd's own teacher: blocks added to the generator after the teacher's, each "
                                  "starting as the identity (the generator starts as the teacher, with more depth)")
    # The paper's few-step masked generators must collapse their factorized output (the noise
    # carrying the randomness); the penalty is zero at a generator whose noise carries all of it,
    # so it moves no such fixed point (README, "Fifth round": it hurt the benchmark's students).
    entropy_penalty: float = option(0.0, "weight of the generator's mean output entropy (nats per undecided "
                                         "z_t position) added to its loss: pushes it to collapse")
    collapse_entropy: float = option(0.02, "warn when the generator's output entropy (nats) falls below this")
    dropout: bool = option(False, "keep the models' dropout on while training generator and auxiliary model "
                                  "(train mode); its masks come from the global random state, so a resumed run is "
                                  "no longer bit-identical and torchrun no longer equals one process")
    run: RunConfig = nested(RunConfig, batch_size=64, steps=2000, warmup=50, save_every=500, out="runs/student")

    def conventions(self) -> dict:
        """The teacher conventions these options set (the others: the teacher's family's)."""
        return {"time_input": self.time_input, "time_arg": self.time_arg, "shift_logits": self.shift_logits,
                "schedule": self.schedule}

    def validate(self, kind: str | None = None) -> None:
        """Raise ``ValueError`` naming the first option out of its domain, or (given the
        process ``kind``, ``"masked"`` or ``"uniform"``) the first that does not fit it."""
        if self.student_steps < 1:
            raise ValueError(f"student_steps must be >= 1, got {self.student_steps}")
        if self.step_window is not None and not 0 < self.step_window < math.inf:  # nan too
            raise ValueError(f"step_window must be > 0 and finite, got {self.step_window}")
        if self.extra_blocks < 0:
            raise ValueError(f"extra_blocks must be >= 0, got {self.extra_blocks}")
        if self.aux_per_gen is not None and self.aux_per_gen < 1:
            raise ValueError(f"aux_per_gen must be >= 1, got {self.aux_per_gen}")
        if self.weight not in WEIGHTS:
            raise ValueError(f"weight must be one of {WEIGHTS}, got {self.weight!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.delta >= 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        for name in ("lr_gen", "lr_aux"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2", "ema"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        check_noise_options(self.noise_per, self.noise_into)
        if self.noise_dim is not None and self.noise_dim < 0:
            raise ValueError(f"noise_dim must be >= 0, got {self.noise_dim}")
        if self.noise_init is not None and self.noise_init < 0:
            raise ValueError(f"noise_init must be >= 0, got {self.noise_init}")
        if self.mask_id is not None and self.mask_id < 0:
            raise ValueError(f"mask_id must be >= 0, got {self.mask_id}")
        if self.time_input not in ("", *TIME_INPUTS):
            raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {self.time_input!r}")
        if self.time_arg and not self.time_arg.isidentifier():
            raise ValueError(f"time_arg must be an argument name, got {self.time_arg!r}")
        if self.schedule and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        for name in ("entropy_penalty", "aux_teacher_weight"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:  # nan too
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.draw_block < 1:
            raise ValueError(f"draw_block must be >= 1, got {self.draw_block}")
        if self.posterior_ds is not None and not 0 < self.posterior_ds <= 1:
            raise ValueError(f"posterior_ds must be in (0, 1], got {self.posterior_ds}")
        self.run.validate()
        if kind == "uniform" and self.soft_target:
            raise ValueError("soft_target is only valid for masked diffusion: a uniform z_s is "
                             "consistent with the hard x only (paper section 3.2)")
        if self.form == "posterior" and kind is not None and kind != "uniform":
            raise ValueError("form='posterior' (Appendix D) is for uniform diffusion")

    def for_process(self, kind: str, image: bool = False) -> DistillConfig:
        """A copy whose unset (None) per-process options take ``kind``'s defaults
        (:data:`PROCESS_DEFAULTS`; noise per pixel pyramid for an ``image`` teacher, else per
        sequence), validated for ``kind``."""
        if kind not in PROCESS_DEFAULTS:
            raise ValueError(f"process must be one of {tuple(PROCESS_DEFAULTS)}, got {kind!r}")
        defaults = {**PROCESS_DEFAULTS[kind], "noise_per": "pyramid" if image else "sequence"}
        unset = {name: value for name, value in defaults.items() if getattr(self, name) is None}
        cfg = self.replace(**unset) if unset else self
        cfg.validate(kind)
        return cfg

    def implicit_settings(self) -> dict:
        """The per-process defaults its unset options will take, for every process (the process
        is the teacher's, not known here): a stage keyed by its settings must change with them."""
        return {name: {kind: defaults[name] for kind, defaults in PROCESS_DEFAULTS.items()}
                for name in PROCESS_DEFAULTS["masked"] if getattr(self, name) is None}

    def noise_spec(self) -> NoiseSpec | None:
        """The generator's noise input these (resolved: :meth:`for_process`) options ask for."""
        if self.noise_dim is None:
            raise ValueError("noise_spec: resolve the per-process options first (for_process)")
        return NoiseSpec(self.noise_dim, self.noise_per, self.noise_into) if self.noise_dim > 0 else None

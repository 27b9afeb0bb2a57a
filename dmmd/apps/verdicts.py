"""The demo's verdict sentences: does a k-step student beat its teacher at k steps, does it
reach the teacher at 4k steps, and how many steps does the teacher need to be as good? One
rule for every metric (lower is better): differences under two standard errors (of the
difference) are ties. And for studies over several distillation seeds: the students' summary
and whether their mean reaches a teacher's estimate."""
from __future__ import annotations

import math
import statistics

Estimate = tuple[float, float]  # (value, standard error)


def _worse(a: Estimate, b: Estimate) -> float:
    """How far ``a`` is above ``b``, in standard errors of the difference (inf when exact and above)."""
    diff, se = a[0] - b[0], math.hypot(a[1], b[1])
    return diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0


def _compare(z: float) -> str:
    return "beats" if z < -2 else "loses to" if z > 2 else "ties with"


def against_teacher(k: int, student: Estimate, teacher: dict[int, Estimate], fmt) -> str:
    """``"; beats the teacher at k steps (..); ties with the teacher at 4k steps (..); as good as
    the teacher at N steps"`` (the parts that apply), ``teacher`` mapping step counts to
    estimates and ``fmt`` writing one. The 4k clause is the few-step distillation target: a
    student at k steps as good as its teacher at four times as many."""
    line = ""
    for n in (k, 4 * k):
        if n in teacher:
            line += f"; {_compare(_worse(student, teacher[n]))} the teacher at {n} steps ({fmt(teacher[n])})"
    level = [n for n, t in sorted(teacher.items()) if _worse(t, student) <= 2]
    if not level:
        line += f"; better than the teacher at every step count up to {max(teacher)}"
    elif k not in teacher or level[0] > k:
        line += f"; as good as the teacher at {level[0]} steps"
    return line


def summarize(values: list[float]) -> dict:
    """Mean, standard deviation, min and max of ``values`` (one per seed)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def reaches(students: dict, teacher: dict) -> str:
    """``reaches`` (the students' mean at most the teacher's, or within two standard errors of
    the difference: the students' spread over seeds and the teacher's sampling error), else
    ``short``; ``students`` from :func:`summarize`, ``teacher`` with ``mean`` and ``stderr``."""
    se = math.sqrt(students["std"] ** 2 / students["n"] + teacher["stderr"] ** 2)
    return "reaches" if students["mean"] <= teacher["mean"] + 2 * se else "short"


__all__ = ["against_teacher", "reaches", "summarize"]

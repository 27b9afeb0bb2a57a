"""Where the applications keep their stages (teachers, students, classifiers, reference LMs,
samples and their scores): each under a name that carries a hash of everything that produced
it, so re-running with the same settings finds every stage finished, and a changed setting
recomputes the stages it changes and those that depend on them (a student's settings name its
teacher's directory, hash included), nothing else, never silently reusing a stale one. May
import :mod:`dmmd.options` and :mod:`dmmd.training`."""
from __future__ import annotations

import hashlib
import json
import os
import time

from dmmd.options import Options
from dmmd.training.checkpoint import write_json_atomic
from dmmd.training.loop import NOT_RESULT, OutputInUse


def settings_key(settings: Options | dict) -> str:
    """A short hash of a run's settings (a config or a plain dict), without its output directory
    and the run options that do not change what its steps compute (:data:`NOT_RESULT`), with
    what a config's unset options will resolve to (its ``implicit_settings()``, where it has one)."""
    d = settings.to_dict() if isinstance(settings, Options) else json.loads(json.dumps(settings))
    implicit = settings.implicit_settings() if hasattr(settings, "implicit_settings") else {}
    if implicit:  # defaults resolved later (per process): a changed default is a changed setting
        d["implicit"] = implicit
    run = d.get("run")
    if isinstance(run, dict):
        for name in NOT_RESULT:
            if name != "save_every":  # kept: the stages set it, some from their own options
                run.pop(name, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def place(cfg: Options, parent: str, name: str) -> Options:
    """``cfg`` (a config with a nested ``run``) with its output directory ``parent/name-<key>``."""
    cfg.run.out = ""
    cfg.run.out = os.path.join(parent, f"{name}-{settings_key(cfg)}")
    return cfg


def keyed_file(parent: str, name: str, key: dict) -> str:
    """``parent/name-<hash of key>.json``: a cached result named by what produced it."""
    return os.path.join(parent, f"{name}-{settings_key(key)}.json")


def cached(path: str, compute) -> dict:
    """The JSON in ``path``, or ``compute()``'s result written there (atomically)."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = compute()
    write_json_atomic(path, result)
    return result


def shared_stage(run, *, log=print, poll: float = 2.0):
    """``run()`` (a resumable stage such as a teacher's training) for a stage that studies run
    side by side share: while another process holds the stage's output directory (training it,
    or finding it finished), wait for that process instead of failing, then run (or find the
    stage finished)."""
    told = False
    while True:
        try:
            return run()
        except OutputInUse as e:
            if not told:
                log(f"waiting: {e}")
                told = True
            time.sleep(poll)


__all__ = ["cached", "keyed_file", "place", "settings_key", "shared_stage"]

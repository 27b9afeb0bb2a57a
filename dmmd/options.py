"""Run configurations: dataclasses whose fields carry their own help.

Every option is declared once, as a field with its default and its help (:func:`option`).
Configs nest instead of copying fields: a teacher's config holds a :class:`dmmd.data.DataConfig`
and a :class:`dmmd.training.loop.RunConfig` (:func:`nested`). The command line builds its flags
from :meth:`Options.flat_fields` (a nested config's fields appear under their own names), and
:meth:`Options.from_dict` reads nested JSON (as checkpoints store it) and flat dicts (as flags
and ``--config`` files give it) alike; an unknown key is an error naming the key.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import MISSING, Field, asdict, field, fields
from typing import Any


def option(default: Any, help: str) -> Any:
    """A config field with its ``help``; a mutable default (dict, list) is copied per instance."""
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def nested(cls: type, **defaults) -> Any:
    """A field holding a nested config ``cls(**defaults)`` (its options keep their own help)."""
    return field(default_factory=lambda: cls(**defaults), metadata={"nested": cls})


def field_default(f: Field) -> Any:
    """The default value of a dataclass field (``None`` when it has none)."""
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


class Options:
    """Base of the run configs (dataclasses): nested fields, flat views, strict ``from_dict``."""

    @classmethod
    def flat_fields(cls, instance: Options | None = None) -> Iterator[tuple[Field, Any]]:
        """Every leaf option as ``(field, default)``, nested configs flattened in place. The
        defaults are those of ``instance`` (by default a fresh ``cls()``), so a nested config
        shows the defaults its owner gives it."""
        instance = cls() if instance is None else instance
        for f in fields(cls):
            value = getattr(instance, f.name)
            if "nested" in f.metadata:
                yield from f.metadata["nested"].flat_fields(value)
            else:
                yield f, value

    @classmethod
    def from_dict(cls, d: dict) -> Options:
        """A config from nested or flat keys (``{"run": {"steps": 5}}`` or ``{"steps": 5}``);
        unknown keys raise ``ValueError`` naming them."""
        own = {f.name: f for f in fields(cls)}
        subs = {name: f.metadata["nested"] for name, f in own.items() if "nested" in f.metadata}
        routed: dict[str, dict] = {name: {} for name in subs}
        values: dict[str, Any] = {}
        unknown = []
        for key, value in d.items():
            if key in subs and isinstance(value, dict):
                routed[key].update(value)
            elif key in own and key not in subs:
                values[key] = value
            else:
                owner = next((name for name, sub in subs.items() if key in sub.leaf_names()), None)
                if owner is None:
                    unknown.append(key)
                else:
                    routed[owner][key] = value
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        for name, sub in subs.items():
            base = asdict(field_default(own[name]))  # the owner's defaults for its nested config
            values[name] = sub.from_dict({**_flatten(base, sub), **routed[name]})
        return cls(**values)

    @classmethod
    def leaf_names(cls) -> set[str]:
        return {f.name for f, _ in cls.flat_fields()}

    def to_dict(self) -> dict:
        """Nested JSON-ready values (what checkpoints store)."""
        return asdict(self)

    def replace(self, **changes) -> Options:
        """A copy with ``changes`` (flat or nested keys, as :meth:`from_dict` takes them)."""
        return type(self).from_dict({**_flatten(self.to_dict(), type(self)), **changes})


def _flatten(d: dict, cls: type) -> dict:
    """Nested values ``d`` of config ``cls`` as flat ``{leaf name: value}``."""
    out = {}
    for f in fields(cls):
        if "nested" in f.metadata:
            out.update(_flatten(d[f.name], f.metadata["nested"]))
        else:
            out[f.name] = d[f.name]
    return out


def check_keys(d: dict, allowed: set[str], what: str, *, owned: dict[str, str] | None = None) -> None:
    """Refuse keys of ``d`` outside ``allowed`` (or set elsewhere: ``owned`` maps such a key to
    the reason), naming each: the check for option dicts passed through to another config."""
    owned = owned or {}
    for key in d:
        if key in owned:
            raise ValueError(f"{what}: {key!r} {owned[key]}")
        if key not in allowed:
            raise ValueError(f"{what}: unknown key {key!r}")


__all__ = ["Options", "check_keys", "field_default", "nested", "option"]

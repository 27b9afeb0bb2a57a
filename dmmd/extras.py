"""Optional dependencies: importing one that is missing raises :class:`MissingExtra`, whose one
line names the pip extra that installs it (the CLI prints just that line)."""
from __future__ import annotations

import importlib
from types import ModuleType

# module -> the extra of pyproject.toml that installs it
EXTRAS = {"transformers": "metrics", "matplotlib": "demo", "sklearn": "images", "PIL": "images"}


# module -> its name on PyPI, where the two differ
PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow"}


class MissingExtra(ImportError):
    """An optional dependency is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or :class:`MissingExtra` saying how to install it for ``purpose``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the module is there; something it imports is not
        extra = EXTRAS.get(top, "demo")
        pip_name = PIP_NAMES.get(top, top)
        raise MissingExtra(f"{purpose} needs {pip_name}, which is not installed: pip install 'dmmd[{extra}]' "
                           f"(or pip install {pip_name})") from None

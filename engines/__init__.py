"""Local engines for development and tests: the development broker (tansu, from PyPI;
``tally broker``, in :mod:`engines.devbroker`) and real servers assembled from Maven
Central that Tally runs on loopback (``tally engines``).

``REGISTRY`` maps each engine's name to the module that implements it (a module whose
``ENGINE`` is an :class:`engines.base.Engine` subclass). A new engine is a new module
and one line here.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from engines.base import Engine

REGISTRY: dict[str, str] = {
    "kafka": "engines.kafka",
    "druid": "engines.druid",
    "opensearch": "engines.opensearch",
}


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str, data_dir: Path, home: Path | None = None) -> Engine:
    """The engine called ``name`` for ``data_dir``; KeyError for an unknown name."""
    cls: type[Engine] = importlib.import_module(REGISTRY[name]).ENGINE
    return cls(data_dir, home)

"""What every ``tally`` subcommand shares: the per-invocation context and options.

It sits below the CLI root (``tally.cli``) and every package's subcommands, so they
import it instead of the root: the root composes them, they never import it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import typer

from tally.logs import LogFormat
from tally.output import Format
from tally.settings import Settings
from tally.specs import SpecRegistry, spec_paths


@dataclass
class Context:
    """Per-invocation state: settings are loaded once, heavy objects lazily."""

    settings: Settings
    _registry: SpecRegistry | None = field(default=None, repr=False)

    @property
    def registry(self) -> SpecRegistry:
        if self._registry is None:
            paths = spec_paths(self.settings.specs)
            self._registry = SpecRegistry.load(paths)
        return self._registry


FormatOption = Annotated[
    Format, typer.Option("--format", help="table for people, json for scripts")
]
LogFormatOption = Annotated[
    LogFormat,
    typer.Option("--log-format", help="daemon logs on stderr: text, or one JSON object a line"),
]


def state(ctx: typer.Context) -> Context:
    obj = ctx.find_root().obj
    assert isinstance(obj, Context)
    return obj

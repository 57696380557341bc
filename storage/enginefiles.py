"""For backends whose engine keeps its own files (``capabilities.checks_files`` false):
Druid reloads a lost segment from deep storage, StarRocks re-replicates a tablet. Tally
has no file of theirs to check or restore, and says so instead of pretending."""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

from storage.protocol import Damage
from tally.errors import InvalidArgument


class EngineKeepsFiles:
    capabilities: object

    def check_files(self, *, full: bool, found_by: str) -> list[Damage]:
        return []

    def restore_partitions(
        self,
        datasource: str,
        tables: Mapping[str, pa.Table],
        read_to: Mapping[tuple[str, int], int] | None = None,
    ) -> None:
        raise InvalidArgument(self._theirs())

    def restore_rollup(self, rollup: str, partition: str) -> None:
        raise InvalidArgument(self._theirs())

    def _theirs(self) -> str:
        name = getattr(self.capabilities, "name", "this")
        return f"the {name} engine keeps and repairs its own files; Tally restores none"

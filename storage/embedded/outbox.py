"""The embedded engine's dead-letter outbox: letters committed in the catalog with
their batch, until the dead-letter topic has acknowledged them."""

from __future__ import annotations

from collections.abc import Sequence

from storage.embedded.core import StoreCore
from storage.protocol import DeadLetterRecord


class EmbeddedOutbox:
    """:class:`storage.protocol.DeadLetterOutbox` in the catalog."""

    def __init__(self, core: StoreCore) -> None:
        self.core = core

    def pending(self, datasource: str) -> list[DeadLetterRecord]:
        with self.core.catalog.read():
            return self.core.catalog.pending_dead_letters(datasource)

    def mark_published(self, published: Sequence[tuple[str, int, int]]) -> None:
        with self.core.catalog.write():
            self.core.catalog.mark_published(published)

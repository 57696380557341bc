"""How a dead letter is encoded on the dead-letter topic: its value is the message's
own bytes, its headers say which message it was and why it failed. Defined once here
for every writer (the outbox publisher, the relay, a store that produces its batch's
letters in its own transaction) and the reader (``ingest.deadletter``)."""

from __future__ import annotations

from storage.protocol import DeadLetterRecord

PREFIX = "tally."
FIELDS = ("id", "reason", "sink", "datasource", "topic", "partition", "offset", "failed_at")

Headers = list[tuple[str, str | bytes | None]]


def headers(letter: DeadLetterRecord) -> Headers:
    return [(PREFIX + f, str(getattr(letter, f)).encode()) for f in FIELDS]

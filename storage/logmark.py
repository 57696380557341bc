"""How a stored position names the log it is of, where Kafka keeps the position.

A position is an offset *in one log*: a topic deleted and recreated, a cluster restored
from a snapshot or another cluster behind the same name all start their offsets again,
and an offset stored from the old log then points at unrelated messages of the new one
(or past its end). Kafka gives each topic an id (KIP-516), new when the topic is
created again; a sink stores it with its offsets and compares it when it takes the
partition over. Where the position is a consumer group's committed offset, the id
travels in the commit's metadata string as ``tally:log=<id>``, with the operator's last
reset after it (``;reset=<note>``). A broker that keeps no metadata (the development
broker) reads back as "not recorded": the position is then checked against the log's
range only.
"""

from __future__ import annotations

from storage.protocol import StoredPosition

_LOG = "tally:log="
_RESET = ";reset="


def encode(log: str | None, reset: str | None = None) -> str:
    """The commit metadata for a position of ``log`` ("" when there is nothing to
    record: the client takes a string, never None)."""
    if log is None and reset is None:
        return ""
    return f"{_LOG}{log or ''}" + (f"{_RESET}{reset}" if reset else "")


def decode(offset: int | None, metadata: str | None) -> StoredPosition | None:
    """A committed offset and its metadata as a position (None: nothing committed)."""
    if offset is None or offset < 0:
        return None
    if not metadata or not metadata.startswith(_LOG):
        return StoredPosition(offset)
    log, _, reset = metadata[len(_LOG) :].partition(_RESET)
    return StoredPosition(offset, log or None, reset or None)

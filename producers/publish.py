"""Publishing events as a domain team would: key = entity id, acknowledged delivery."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from ingest.kafka import flush, producer
from producers.malformed import Wire
from tally.errors import BrokerUnavailable
from tally.settings import Settings


def read_lines(path: Path, key_field: str, counts: dict[str, int]) -> Iterator[Wire]:
    """One message per non-empty line; the key is the entity id when the line parses."""
    with path.open("rb") as fh:
        for line in fh:
            value = line.rstrip(b"\r\n")
            if not value:
                continue
            key: bytes | None = None
            try:
                event = orjson.loads(value)
                if isinstance(event, dict) and isinstance(event.get(key_field), str):
                    key = event[key_field].encode()
            except orjson.JSONDecodeError:
                counts["unparsable"] += 1
            yield Wire(key, value, None)


class Publisher:
    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self._producer = producer(settings)
        self._failed = 0
        self.ends: dict[int, int] = {}  # partition → offset after the last acknowledged message

    def _delivered(self, err: object, msg: Any) -> None:
        if err is not None:
            self._failed += 1
            return
        part, offset = msg.partition(), msg.offset()
        if offset is not None and offset + 1 > self.ends.get(part, 0):
            self.ends[part] = offset + 1

    def send(
        self,
        wires: Iterable[Wire],
        *,
        rate: float | None = None,
        counts: dict[str, int] | None = None,
    ) -> int:
        """Produce everything; with ``rate``, pace to that many events per second."""
        sent = 0
        started = time.monotonic()
        for wire in wires:
            while True:
                try:
                    self._producer.produce(
                        self.topic, key=wire.key, value=wire.value, on_delivery=self._delivered
                    )
                    break
                except BufferError:  # local queue full: let deliveries drain
                    self._producer.poll(0.1)
            sent += 1
            if counts is not None:
                counts["events"] += 1
                counts["malformed"] += wire.malformed is not None
            if sent % 10_000 == 0:
                self._producer.poll(0)
            if rate is not None:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    self._producer.poll(ahead)
        flush(self._producer, f"publishing to {self.topic}", timeout_s=120)
        if self._failed:
            raise BrokerUnavailable(f"{self._failed} of {sent} message(s) were not delivered")
        return sent

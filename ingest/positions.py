"""Whether a stored position belongs to the log being read, and what to say if not.

A sink resumes a partition at the offset it stored (the catalog's, or its group's
committed one). That offset means something only in the log it was read from: a topic
deleted and created again, a cluster restored from a snapshot, or another cluster
behind the same address starts its offsets again, and a stored offset then skips the
new log's first messages without a word (or points past its end). Retention can also
have removed messages the sink never read. None of these is guessed at: the partition
stops with one line saying which it is, a metric shows it, and an operator decides
with ``tally ingest reset`` (ADR 0013).

Three checks, each where it is cheapest and certain:

* **identity** (here, on every assignment): the position's recorded log — Kafka's
  topic id (KIP-516), stored with the offset — against the topic's id now;
* **range** (librdkafka, on every fetch): the runner's consumer has
  ``auto.offset.reset=error``, so a position before the log's start or past its end
  is reported instead of silently moved; ``out_of_range`` says which;
* **recreation while reading** (the runner, every few seconds): the topic's id
  changed under a running consumer.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage import StoredPosition

KINDS = ("another_log", "past_end", "before_start", "recreated")


@dataclass(frozen=True)
class Stop:
    """Why one partition stopped: ``kind`` (one of ``KINDS``, the metric's label) and a
    one-line ``message`` naming the topic, partition and the command that decides."""

    partition: int
    kind: str
    message: str


def reset_hint(datasource: str, sink: str) -> str:
    return (
        f"decide with: tally ingest reset --datasource {datasource} --sink {sink}"
        " --to earliest|latest|stored"
    )


def identity_stop(
    topic: str, partition: int, stored: StoredPosition | None, log_now: str | None, hint: str
) -> Stop | None:
    """A stop when ``stored`` records a log other than ``log_now`` (the topic's id now);
    None when they agree, or either is unknown (a broker without topic ids, a position
    stored before ids were recorded): the range check still applies then."""
    if stored is None or stored.log is None or log_now is None or stored.log == log_now:
        return None
    return Stop(
        partition,
        "another_log",
        f"{topic}[{partition}]: the stored position {stored.offset} is of another log"
        f" (topic id {stored.log}; the topic's id is now {log_now}): the topic was deleted"
        f" and created again, or this is another cluster; nothing is read from it"
        f" until an operator decides; {hint}",
    )


def out_of_range(
    topic: str, partition: int, position: int | None, low: int | None, high: int | None, hint: str
) -> Stop:
    """The broker refused ``position``: before the log's start ``low`` (retention
    removed what the sink never read: a loss) or past its end ``high``."""
    where = f"{topic}[{partition}]"
    if position is not None and low is not None and position < low:
        return Stop(
            partition,
            "before_start",
            f"{where}: retention removed offsets {position}..{low - 1} ({low - position}"
            f" message(s)) before this sink read them: they are lost to it (the log now"
            f" starts at {low}); {hint}",
        )
    if position is not None and high is not None and position > high:
        return Stop(
            partition,
            "past_end",
            f"{where}: the stored position {position} is past the log's end {high}: the"
            f" topic was recreated or the cluster restored from an older state; {hint}",
        )
    return Stop(
        partition,
        "past_end",
        f"{where}: the broker refused position {position} (the log holds {low}..{high}); {hint}",
    )


def recreated(topic: str, partition: int, old: str, new: str, hint: str) -> Stop:
    return Stop(
        partition,
        "recreated",
        f"{topic}[{partition}]: the topic was deleted and created again while this sink"
        f" read it (topic id {old} → {new}); what was read is of the old log; {hint}",
    )


def summary(stops: list[Stop]) -> str:
    """One line for a run's report: the first stop, and how many more."""
    first = sorted(stops, key=lambda s: s.partition)[0].message
    more = len(stops) - 1
    return first if not more else f"{first} (and {more} more partition(s) stopped)"

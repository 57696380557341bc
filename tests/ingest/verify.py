"""Compare every sink with the reference of what was published."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from sqlglot import exp

from ingest.deadletter import list_dead_letters, raw_value, read_topic
from search import open_index
from storage import backend, open_reader
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry
from tests.factories import latest_by_key, normalise, reference_rollup
from tests.ingest.reference import Published, expected_rows


def assert_exact(
    settings: Settings,
    registry: SpecRegistry,
    published: Published,
    *,
    search: bool = True,
    datasource: str = "payments",
) -> None:
    """Store (every column of each key's latest version), rollups, dead-letter topic
    and (with ``search``) the search index, for any datasource's spec."""
    spec = registry.get(datasource)
    reader = open_reader(settings, registry)
    try:
        ds = spec.datasource
        columns = [ds.key, *(c for c in spec.columns if c != ds.key)]
        # Rendered in the engine's own dialect (StarRocks quotes with backticks).
        dialect = backend(settings.store.backend).capabilities.sql_dialect
        select = exp.select(*(exp.column(c, quoted=True) for c in columns))
        sql = select.from_(exp.table_(spec.name, quoted=True)).sql(dialect=dialect)
        rows = reader.query(sql).rows
        got = {r[0]: tuple(normalise(v) for v in r[1:]) for r in rows}
        want = expected_rows(spec, published, columns[1:])
        assert len(got) == len(rows), "a key appears twice in the merged view"
        missing, extra = want.keys() - got.keys(), got.keys() - want.keys()
        wrong = [k for k in want.keys() & got.keys() if want[k] != got[k]]
        assert not (missing or extra or wrong), (len(missing), len(extra), wrong[:5])
        latest = latest_by_key(spec, published.good)
        for rollup in spec.rollups:
            keys = ["bucket", *rollup.dimensions]
            metrics = [m.name for m in spec.parsed_metrics]
            stored = {
                tuple(normalise(v) for v in r[: len(keys)]): tuple(r[len(keys) :])
                for r in reader.query(f"SELECT {', '.join(keys + metrics)} FROM {rollup.name}").rows
                if any(r[len(keys) :])  # a group netting to zero (StarRocks keeps its row)
            }
            reference = {
                tuple(normalise(v) for v in k): v
                for k, v in reference_rollup(spec, rollup.name, latest).items()
            }
            assert stored == reference, f"{rollup.name} differs from its recomputation"
    finally:
        reader.close()

    if search:
        assert_index(settings, spec, latest)
    _assert_dead_letters(settings, spec, published)


def assert_index(
    settings: Settings, spec: DatasourceSpec, latest: dict[str, Mapping[str, Any]]
) -> None:
    index = open_index(settings, spec, readonly=True)  # the backend ``settings`` name
    indexed = index.all_versions()
    index.close()
    want_versions = {k: (r["version"], r["event_id"]) for k, r in latest.items()}
    missing = want_versions.keys() - indexed.keys()
    extra = indexed.keys() - want_versions.keys()
    stale = [k for k in want_versions.keys() & indexed.keys() if indexed[k] != want_versions[k]]
    assert not (missing or extra or stale), (
        f"search index differs: {len(missing)} missing, {len(extra)} extra, {len(stale)} stale"
        f" e.g. {[(k, indexed[k], want_versions[k]) for k in stale[:3]]}"
    )


def _assert_dead_letters(settings: Settings, spec: DatasourceSpec, published: Published) -> None:
    """Each malformed message the source topic holds is dead-lettered once. The source
    itself may hold one twice (a producer without idempotence retried a request the
    broker had appended): those are two messages, each with its own letter."""
    letters = list_dead_letters(settings, spec)
    ids = Counter(d["id"] for d in letters)
    twice = sorted(i for i, n in ids.items() if n > 1)
    assert not twice, f"{len(twice)} dead letters published twice, e.g. {twice[:3]}"
    held = _malformed_held(settings, spec, published)
    values: Counter[bytes] = Counter(raw_value(d) or b"" for d in letters)
    doubled = values - held
    lost = held - values
    assert not doubled and not lost, (
        f"dead-letter topic must hold each malformed message once: {sum(doubled.values())} extra,"
        f" {sum(lost.values())} missing of {sum(held.values())}"
    )
    for d in letters:
        _has_headers(d)


def _malformed_held(
    settings: Settings, spec: DatasourceSpec, published: Published
) -> Counter[bytes]:
    """The malformed messages published, as often as the source topic holds each."""
    held: Counter[bytes] = Counter(
        seen.value or b""
        for seen in read_topic(settings, settings.topic(spec.datasource.topic))
        if (seen.value or b"") in published.malformed
    )
    assert not published.malformed - held, "the source topic lacks published malformed messages"
    return held


def _has_headers(letter: dict[str, Any]) -> None:
    for field in ("reason", "sink", "topic", "partition", "offset"):
        assert letter.get(field) not in (None, ""), f"dead letter lacks {field}"

"""One behaviour contract, run against every search backend.

tantivy runs embedded in a temporary data directory; OpenSearch is a real node
(``tally engines up opensearch``, three shards per index, so routing by tenant is
exercised); Elasticsearch runs against osmem-server, an in-memory OpenSearch-compatible
server (see conftest.py). What the osmem runs do not prove about real Elasticsearch:
osmem makes writes searchable without a refresh, so "commit makes writes searchable" is
proven on tantivy and OpenSearch (test_elastic.py checks that commit does issue the
refresh); and scores come from each engine's own BM25, so only score *order* is
asserted, never values.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.cluster import ClusterIndex
from search.protocol import Doc, Hit, SearchIndex, SearchOrder, UpsertResult
from search.tantivy_index import TantivyIndex
from tally.errors import InvalidArgument, InvalidRow, SearchError
from tally.settings import Settings
from tally.specs import DatasourceSpec
from tally.timeutil import to_micros

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
SEOUL = ZoneInfo("Asia/Seoul")


class Index(SearchIndex, Protocol):
    def all_versions(self) -> dict[str, tuple[int, str]]: ...


class Backend:
    """Opens indices of one backend: ``new()`` is empty, ``reopen()`` shares storage.
    ``make_cluster`` opens a cluster backend's index by prefix (None: tantivy)."""

    def __init__(
        self,
        name: str,
        tmp: Path,
        spec: DatasourceSpec,
        make_cluster: Callable[..., ClusterIndex] | None,
    ) -> None:
        self.name = name
        self.tmp = tmp
        self.spec = spec
        self.make_cluster = make_cluster
        self.opened: list[Index] = []
        self._where: dict[int, str] = {}

    def _open(self, where: str) -> Index:
        index: Index
        if self.make_cluster is not None:
            index = self.make_cluster(prefix=where)
        else:
            index = TantivyIndex(Settings(data_dir=self.tmp / where), self.spec)
        self.opened.append(index)
        self._where[id(index)] = where
        return index

    def new(self) -> Index:
        return self._open(f"t{uuid.uuid4().hex[:16]}-")

    def reopen(self, index: Index) -> Index:
        return self._open(self._where[id(index)])

    def close(self) -> None:
        for index in self.opened:
            index.close()
        self.opened.clear()


# backend → the fixture that opens its indices (tantivy: none, it is embedded)
_MAKERS = {"tantivy": None, "elasticsearch": "make_elastic", "opensearch": "make_opensearch"}


def open_backend(
    name: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    spec: DatasourceSpec = request.getfixturevalue("payments_spec")
    maker = _MAKERS[name]
    # only a backend's own tests start (or reuse) its server
    make_cluster = request.getfixturevalue(maker) if maker is not None else None
    b = Backend(name, tmp_path_factory.mktemp("search"), spec, make_cluster)
    yield b
    b.close()


@pytest.fixture(params=list(_MAKERS))
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    yield from open_backend(request.param, request, tmp_path_factory)


@pytest.fixture
def tantivy_backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    yield from open_backend("tantivy", request, tmp_path_factory)


@pytest.fixture
def elastic_backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    yield from open_backend("elasticsearch", request, tmp_path_factory)


@pytest.fixture
def opensearch_backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    yield from open_backend("opensearch", request, tmp_path_factory)


@pytest.fixture
def index(backend: Backend) -> Index:
    return backend.new()


def doc(
    key: str,
    version: int = 1,
    *,
    event_id: str | None = None,
    tenant: str = "m1",
    time: datetime = T0,
    order_name: str = "Coffee beans",
    customer_name: str = "Kim Minji",
    order_id: str | None = None,
    card_last4: str | None = None,
) -> Doc:
    return Doc(
        key=key,
        tenant=tenant,
        time=time,
        version=version,
        event_id=event_id or f"{key}-v{version}",
        text={
            "order_id": order_id or f"order-{key}",
            "order_name": order_name,
            "customer_name": customer_name,
            "card_last4": card_last4,
        },
    )


def put(index: Index, docs: Sequence[Doc], shard: int = 0) -> UpsertResult:
    """One ingest batch: upsert, then commit (which makes the batch searchable)."""
    result = index.upsert(shard, docs)
    index.commit(shard, max((d.time for d in docs), default=None))
    return result


def keys(hits: list[Hit]) -> set[str]:
    return {h.key for h in hits}


def assert_ranked(hits: list[Hit]) -> None:
    assert hits == sorted(hits, key=lambda h: (-h.score, h.key))


def find(
    index: Index,
    text: str,
    tenant: str = "m1",
    start: datetime | None = None,
    end: datetime | None = None,
) -> set[str]:
    hits = index.search(tenant, text, start=start, end=end)
    assert_ranked(hits)
    return keys(hits)


# --- version guard ---------------------------------------------------------------------

NAMES = {1: "Latte grande", 2: "Mocha venti", 3: "Chai tall"}


def test_newer_version_survives_every_arrival_order_across_batches(index: Index) -> None:
    for order in itertools.permutations([1, 2, 3]):
        key = "k" + "".join(map(str, order))
        best = 0
        for version in order:
            result = put(index, [doc(key, version, order_name=NAMES[version])])
            assert result == (UpsertResult(1, 0) if version > best else UpsertResult(0, 1))
            best = max(best, version)
    all_keys = {"k" + "".join(map(str, p)) for p in itertools.permutations([1, 2, 3])}
    assert index.versions(sorted(all_keys)) == dict.fromkeys(all_keys, 3)
    assert find(index, "chai") == all_keys
    assert find(index, "latte") == set()
    assert find(index, "mocha") == set()


def test_newer_version_survives_within_a_batch(index: Index) -> None:
    batch = []
    for order in itertools.permutations([1, 2, 3]):
        key = "k" + "".join(map(str, order))
        batch += [doc(key, v, order_name=NAMES[v]) for v in order]
    batch.append(doc("k123", 3, order_name=NAMES[3]))  # a redelivery inside the batch
    assert put(index, batch) == UpsertResult(6, len(batch) - 6)
    assert set(index.versions([d.key for d in batch]).values()) == {3}
    assert len(find(index, "chai")) == 6
    assert find(index, "latte") | find(index, "mocha") == set()
    # a later batch of older versions changes nothing
    assert put(index, [doc("k123", 1, order_name="Latte")]) == UpsertResult(0, 1)
    assert find(index, "latte") == set()


def test_equal_version_redelivery_never_overwrites(index: Index) -> None:
    put(index, [doc("k1", 2, event_id="e2", order_name="Original order")])
    # same version and event id: a redelivery; its text must not replace the stored one
    assert put(index, [doc("k1", 2, event_id="e2", order_name="Tampered")]) == UpsertResult(0, 1)
    assert find(index, "original") == {"k1"}
    assert find(index, "tampered") == set()
    assert index.all_versions() == {"k1": (2, "e2")}


@pytest.mark.parametrize("first", ["ea", "eb"])
def test_equal_version_different_event_id_tie_break(index: Index, first: str) -> None:
    """tantivy keeps the greatest event_id (like the OLAP store); Elasticsearch's external
    versions refuse equal versions, so the first writer wins (see ClusterIndex.upsert)."""
    second = "eb" if first == "ea" else "ea"
    put(index, [doc("k1", 2, event_id=first, order_name=f"name {first}")])
    put(index, [doc("k1", 2, event_id=second, order_name=f"name {second}")])
    winner = first if index.capabilities.external_versions else "eb"
    assert index.all_versions() == {"k1": (2, winner)}
    assert find(index, f"name {winner}") == {"k1"}
    assert find(index, f"name {'ea' if winner == 'eb' else 'eb'}") == set()


@pytest.mark.parametrize("cancel_first", [False, True])
def test_canceled_transaction_reindexed_changes_what_search_finds(
    index: Index, cancel_first: bool
) -> None:
    approved = doc("t1", 1, order_name="아메리카노 두 잔", customer_name="이서연")
    canceled = doc("t1", 2, order_name="환불된 주문", customer_name="이서연")
    other = doc("t2", 1, order_name="아메리카노 한 잔", customer_name="최도윤")
    put(index, [other])
    for d in [canceled, approved] if cancel_first else [approved, canceled]:
        put(index, [d])
    assert find(index, "아메리카노") == {"t2"}
    assert find(index, "환불") == {"t1"}
    assert find(index, "서연") == {"t1"}
    hits = index.search("m1", "환불된")
    assert [(h.key, h.time) for h in hits] == [("t1", T0)]  # keeps its partition time
    assert index.versions(["t1", "t2"]) == {"t1": 2, "t2": 1}


# --- finding ---------------------------------------------------------------------------


@pytest.fixture
def shop(index: Index) -> Index:
    put(
        index,
        [
            doc("k1", order_name="아메리카노 Iced Coffee", customer_name="김민지"),
            doc("k2", order_name="Coffee Beans 원두 1kg", customer_name="박지훈"),
            doc("k3", order_name="녹차 라떼", customer_name="Kim Minji", card_last4="4242"),
            doc("x1", tenant="m2", order_name="아메리카노 Coffee", customer_name="김민지"),
            doc("x2", tenant="m2", order_name="원두 2kg", customer_name="Kim Minji"),
        ],
    )
    return index


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("아메", {"k1"}),
        ("아메리카노", {"k1"}),
        ("원두", {"k2"}),
        ("라떼", {"k3"}),  # a 2-char query: the single 2-gram
        ("민지", {"k1"}),  # customer_name, Korean
        ("minji", {"k3"}),
        ("MINJI", {"k3"}),  # case-insensitive
        ("coffee", {"k1", "k2"}),
        ("fee", {"k1", "k2"}),
        ("ee b", {"k2"}),  # spans a space
        ("노 Ic", {"k1"}),  # spans Korean, space and Latin
        ("r-k2", {"k2"}),  # order_id, punctuation included
        ("424", {"k3"}),  # card_last4
        ("원두 2kg", set()),  # that is the other tenant's order
        ("2kg", set()),
        ("없는말", set()),
        ("coffee beans 원두 9kg", set()),  # every gram must match, not just most
    ],
)
def test_substring_finds_the_right_ids_only_in_the_tenant(
    shop: Index, text: str, expected: set[str]
) -> None:
    assert find(shop, text) == expected


def test_other_tenant_sees_only_its_own(shop: Index) -> None:
    assert find(shop, "아메", tenant="m2") == {"x1"}
    assert find(shop, "원두", tenant="m2") == {"x2"}
    assert find(shop, "라떼", tenant="m2") == set()
    assert find(shop, "coffee", tenant="nobody") == set()


@pytest.mark.parametrize("text", ["", "a", " "])
def test_no_keyword_or_one_ascii_character_matches_every_doc_of_the_tenant(
    shop: Index, text: str
) -> None:
    assert find(shop, text) == {"k1", "k2", "k3"}
    assert find(shop, text, tenant="m2") == {"x1", "x2"}


@pytest.mark.parametrize(
    ("text", "mine", "theirs"),
    [
        ("김", {"k1"}, {"x1"}),  # a surname, in customer_name
        ("박", {"k2"}, set()),
        ("원", {"k2"}, {"x2"}),  # in order_name
        ("라", {"k3"}, set()),
        ("커", set(), set()),  # in no document
    ],
)
def test_one_korean_letter_finds_the_docs_containing_it(
    shop: Index, text: str, mine: set[str], theirs: set[str]
) -> None:
    assert find(shop, text) == mine
    assert find(shop, text, tenant="m2") == theirs
    assert {h.key for h in shop.search("m1", text, order="time")} == mine


def test_limit_keeps_the_best_ranked(index: Index) -> None:
    put(index, [doc(f"k{i}", order_name="Same text") for i in range(0, 6, 2)])
    put(index, [doc(f"k{i}", order_name="Same text") for i in range(1, 6, 2)], shard=1)
    put(index, [doc("z", order_name="same same same")], shard=2)
    full = index.search("m1", "same")
    assert keys(full) == {*(f"k{i}" for i in range(6)), "z"}
    assert_ranked(full)
    top = index.search("m1", "same", limit=3)
    assert top == full[:3]


def test_limit_zero_finds_nothing(backend: Backend) -> None:
    index = backend.new()
    put(index, [doc("k1")])
    assert index.search("m1", "coffee", limit=0) == []


def test_time_range_is_half_open(index: Index) -> None:
    h = timedelta(hours=1)
    put(
        index,
        [
            doc("a", time=T0),
            doc("b", time=(T0 + h).astimezone(SEOUL)),  # any zone: compared as instants
            doc("c", time=T0 + 2 * h - timedelta(seconds=1)),
            doc("d", time=T0 + 2 * h),
        ],
    )
    assert find(index, "", start=T0 + h, end=T0 + 2 * h) == {"b", "c"}
    assert find(index, "coffee", start=T0 + h, end=T0 + 2 * h) == {"b", "c"}
    assert find(index, "", start=T0) == {"a", "b", "c", "d"}
    assert find(index, "", end=T0 + h) == {"a"}
    assert find(index, "", start=T0 + 2 * h) == {"d"}
    assert find(index, "", start=(T0 + 2 * h).astimezone(SEOUL)) == {"d"}
    assert find(index, "", start=T0 + h, end=T0 + h) == set()
    times = {hit.key: hit.time for hit in index.search("m1", "", start=T0 + h, end=T0 + 2 * h)}
    assert times == {"b": T0 + h, "c": T0 + 2 * h - timedelta(seconds=1)}
    assert all(t.utcoffset() == timedelta(0) for t in times.values())


def test_range_edges_are_exact_to_the_microsecond(index: Index) -> None:
    us = timedelta(microseconds=1)
    at = T0 + timedelta(milliseconds=500, microseconds=7)
    put(index, [doc("a", time=at)])
    assert find(index, "coffee", start=at, end=at + us) == {"a"}
    assert find(index, "coffee", start=at + us) == set()
    assert find(index, "coffee", end=at) == set()
    assert find(index, "coffee", start=T0 + timedelta(milliseconds=300)) == {"a"}
    assert index.search("m1", "coffee")[0].time == at


def test_newest_first_returns_exactly_the_newest(index: Index) -> None:
    # Several docs in one second and two in one microsecond: ordered by (time, key).
    times = [T0 + timedelta(microseconds=m) for m in (0, 1, 999, 999, 500_000, 1_000_000)]
    times += [T0 + timedelta(hours=h) for h in (-5, 3, 7)]
    docs = [doc(f"k{i}", time=t) for i, t in enumerate(times)]
    for shard in range(3):  # several shards (tantivy merges their top lists), two commits each
        mine = docs[shard::3]
        put(index, mine[:1], shard)
        put(index, mine[1:], shard)
    expected = sorted(((d.time, d.key) for d in docs), reverse=True)
    full = index.search("m1", "coffee", order="time")
    assert [(h.time, h.key) for h in full] == expected
    assert all(h.score == 0.0 for h in full)
    for limit in (1, 3, 5):
        top = index.search("m1", "coffee", limit=limit, order="time")
        # The newest ``limit`` times, in order; which of two docs tied in the last
        # microsecond makes the cut is unspecified.
        assert [h.time for h in top] == [t for t, _ in expected[:limit]]
        assert top == sorted(top, key=lambda h: (h.time, h.key), reverse=True)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    offsets=st.lists(st.integers(0, 5_000), min_size=1, max_size=40),
    page=st.integers(1, 7),
)
def test_paging_newest_first_by_narrowing_end_finds_every_match_once(
    backend: Backend, offsets: list[int], page: int
) -> None:
    """What the hybrid search does: take a page, then ask again with ``end`` at the
    oldest time seen (inclusive, so ties are re-read and skipped by key)."""
    index = backend.new()
    docs = [doc(f"k{i}", time=T0 + timedelta(microseconds=o)) for i, o in enumerate(offsets)]
    for shard in range(3):
        put(index, docs[shard::3], shard)
    seen: list[str] = []
    end: datetime | None = None
    while True:
        hits = index.search("m1", "coffee", end=end, limit=page, order="time")
        fresh = [h for h in hits if h.key not in seen]
        seen += [h.key for h in fresh]
        if len(hits) < page:
            break
        if not fresh:  # a page of one microsecond's ties: widen it
            page *= 2
            continue
        end = hits[-1].time + timedelta(microseconds=1)
    assert sorted(seen) == sorted(d.key for d in docs)


def test_a_reader_opened_earlier_sees_every_later_commit(backend: Backend) -> None:
    writer = backend.new()
    put(writer, [doc("a")])
    reader = backend.reopen(writer)
    assert keys(reader.search("m1", "coffee")) == {"a"}
    for n, key in enumerate(["b", "c", "d"], start=2):
        writer.upsert(0, [doc(key)])
        if backend.name == "tantivy":  # osmem makes writes searchable before a refresh
            assert len(reader.search("m1", "coffee")) == n - 1
        writer.commit(0, T0)
        assert len(reader.search("m1", "coffee", order="time")) == n
        assert set(reader.locate([key])) == {key}


# --- freshness and verification --------------------------------------------------------


def test_freshness_is_the_max_committed_newest(backend: Backend) -> None:
    index = backend.new()
    assert index.freshness() is None
    index.commit(0, T0 + timedelta(hours=1))
    assert index.freshness() == T0 + timedelta(hours=1)
    index.commit(1, T0)  # older, another shard
    assert index.freshness() == T0 + timedelta(hours=1)
    index.commit(0, None)
    assert index.freshness() == T0 + timedelta(hours=1)
    put(index, [doc("k1", time=T0 + timedelta(hours=3))], shard=1)
    assert index.freshness() == T0 + timedelta(hours=3)
    other = backend.reopen(index)  # another process sees the same watermark
    assert other.freshness() == T0 + timedelta(hours=3)
    other.commit(2, T0 + timedelta(hours=2))  # and cannot lower it
    assert index.freshness() == T0 + timedelta(hours=3)


def test_versions_and_all_versions_report_what_is_stored(backend: Backend) -> None:
    index = backend.new()
    assert index.versions(["k1"]) == {}
    assert index.all_versions() == {}
    assert index.search("m1", "coffee") == []
    put(index, [doc("k1", 3), doc("k2", 1, tenant="m2")], shard=0)
    put(index, [doc("k3", 7, event_id="late"), doc("k1", 2)], shard=0)
    put(index, [doc("k4", 2)], shard=1)
    assert index.versions(["k1", "k2", "k3", "k4", "nope", "k1"]) == {
        "k1": 3,
        "k2": 1,
        "k3": 7,
        "k4": 2,
    }
    assert index.versions([]) == {}
    assert index.locate(["k1", "k4", "nope"]) == {"k1": T0, "k4": T0}
    assert index.locate([]) == {}
    expected = {"k1": (3, "k1-v3"), "k2": (1, "k2-v1"), "k3": (7, "late"), "k4": (2, "k4-v2")}
    assert index.all_versions() == expected
    assert backend.reopen(index).all_versions() == expected


# --- times are timezone-aware ----------------------------------------------------------

NAIVE = datetime(2026, 3, 1, 10, 0)  # no zone: which instant it means is unknowable


def test_a_doc_with_a_naive_time_is_refused_with_its_whole_batch(backend: Backend) -> None:
    index = backend.new()
    put(index, [doc("k0")])
    with pytest.raises(InvalidRow, match=r"'k2'.*timezone-aware"):
        index.upsert(0, [doc("k1"), doc("k2", time=NAIVE)])
    with pytest.raises(InvalidRow, match="timezone-aware"):
        index.replace(0, [doc("k0", 9, time=NAIVE)])
    index.commit(0, None)  # nothing of either batch was written, not even k1
    assert index.all_versions() == {"k0": (1, "k0-v1")}
    assert find(index, "coffee") == {"k0"}


@pytest.mark.parametrize("order", ["score", "time"])
@pytest.mark.parametrize("bound", ["start", "end"])
def test_a_naive_search_bound_is_refused(backend: Backend, bound: str, order: SearchOrder) -> None:
    index = backend.new()
    put(index, [doc("k1")])  # at T0, an hour before NAIVE read as UTC
    start, end = (NAIVE, None) if bound == "start" else (None, NAIVE)
    for limit in (10, 0):
        with pytest.raises(InvalidArgument, match=f"{bound}.*timezone-aware"):
            index.search("m1", "coffee", start, end, limit=limit, order=order)
    aware = NAIVE.replace(tzinfo=UTC)
    assert find(index, "coffee", start=aware) == set()
    assert find(index, "coffee", end=aware) == {"k1"}


def test_a_naive_watermark_is_refused(backend: Backend) -> None:
    index = backend.new()
    index.commit(0, T0)
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        index.commit(0, NAIVE)
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        index.commit(1, NAIVE)  # a shard never committed before
    assert index.freshness() == T0
    assert backend.reopen(index).freshness() == T0


def test_a_stored_naive_watermark_is_an_error_not_utc(backend: Backend) -> None:
    """A watermark stored without a zone (written by hand or by an older Tally) is
    reported as broken, never read as UTC."""
    index = backend.new()
    index.commit(0, T0)
    if isinstance(index, TantivyIndex):
        (index.root / "p0" / "tally-meta.json").write_text(
            json.dumps({"newest": NAIVE.isoformat()})
        )
    else:
        assert isinstance(index, ClusterIndex)
        status, _reply = index._send(
            "PUT",
            f"/{index.meta_index}/_doc/{index.spec.name}",
            params={"version": to_micros(T0) + 1, "version_type": "external", "refresh": "true"},
            body={"datasource": index.spec.name, "newest": NAIVE.isoformat()},
        )
        assert status in (200, 201), status
    with pytest.raises(SearchError, match="timezone"):
        backend.reopen(index).freshness()


# --- property: any history, any delivery ------------------------------------------------

KEYS = "abcd"
Event = tuple[str, int, str]  # key, version, event_id


def marker(event: Event) -> str:
    key, version, event_id = event
    return f"q{key}{version}{event_id}z"


def reference(batches: list[list[Event]], *, first_tie_wins: bool) -> dict[str, tuple[int, str]]:
    """What each key must end as: the greatest (version, event_id) delivered, except that
    with external versions an equal version arriving in a later batch is refused."""
    stored: dict[str, tuple[int, str]] = {}
    for batch in batches:
        best: dict[str, tuple[int, str]] = {}
        for key, version, event_id in batch:
            best[key] = max(best.get(key, (0, "")), (version, event_id))
        for key, new in best.items():
            old = stored.get(key)
            if old is None or (new[0] > old[0] if first_tie_wins else new > old):
                stored[key] = new
    return stored


events = st.tuples(st.sampled_from(KEYS), st.integers(1, 5), st.sampled_from(["e1", "e2"]))


def deliver(backend: Backend, history: list[Event], data: st.DataObject) -> None:
    """Deliver the history in any order (duplicates are redeliveries), in batches of
    any size, each key always to its own partition; then compare with the reference."""
    delivered = data.draw(st.permutations(history), label="delivery order")
    batches: list[list[Event]] = []
    rest = delivered
    while rest:
        size = data.draw(st.integers(1, len(rest)), label="batch size")
        batches.append(rest[:size])
        rest = rest[size:]
    index = backend.new()
    try:
        total = 0
        for batch in batches:
            by_shard: dict[int, list[Doc]] = {}
            for key, version, event_id in batch:
                d = doc(
                    key, version, event_id=event_id, order_name=marker((key, version, event_id))
                )
                by_shard.setdefault(KEYS.index(key) % 2, []).append(d)
            for shard, docs in by_shard.items():
                result = put(index, docs, shard)
                assert result.written + result.stale == len(docs)
                total += result.written
        expected = reference(batches, first_tie_wins=index.capabilities.external_versions)
        assert index.all_versions() == expected
        assert index.versions(list(KEYS)) == {k: v for k, (v, _e) in expected.items()}
        assert total >= len(expected)
        for event in set(history):  # only the stored event's text finds its key
            key = event[0]
            stored = (event[1], event[2]) == expected[key]
            assert find(index, marker(event)) == ({key} if stored else set())
    finally:
        index.close()


histories = st.lists(events, min_size=1, max_size=30)
NEW_INDEX_PER_EXAMPLE = [HealthCheck.function_scoped_fixture]


@settings(max_examples=60, deadline=None, suppress_health_check=NEW_INDEX_PER_EXAMPLE)
@given(history=histories, data=st.data())
def test_any_delivery_ends_at_the_reference_versions_tantivy(
    tantivy_backend: Backend, history: list[Event], data: st.DataObject
) -> None:
    deliver(tantivy_backend, history, data)


@settings(max_examples=150, deadline=None, suppress_health_check=NEW_INDEX_PER_EXAMPLE)
@given(history=histories, data=st.data())
def test_any_delivery_ends_at_the_reference_versions_elasticsearch(
    elastic_backend: Backend, history: list[Event], data: st.DataObject
) -> None:
    deliver(elastic_backend, history, data)


@settings(max_examples=30, deadline=None, suppress_health_check=NEW_INDEX_PER_EXAMPLE)
@given(history=histories, data=st.data())
def test_any_delivery_ends_at_the_reference_versions_opensearch(
    opensearch_backend: Backend, history: list[Event], data: st.DataObject
) -> None:
    deliver(opensearch_backend, history, data)

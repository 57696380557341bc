"""The merchant dashboard and the operator console in a real headless Chromium, against
a real ``tally serve`` over a store filled through the broker (the ``live`` fixture).

Every wait is on page state (Playwright's auto-waiting expectations), never a sleep.
Screenshots of both pages, at 1280×800 and phone size, go to the test's temp dir."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, Page, Route, ViewportSize, expect

from producers.malformed import Wire, encode
from tests.query_api.browser import chromium
from tests.query_api.conftest import Live

pytestmark = pytest.mark.slow
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as running:
        yield running


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=DESKTOP)  # its own sessionStorage
    tab = context.new_page()
    expect.set_options(timeout=30_000)
    yield tab
    context.close()


def _sign_in(page: Page, live: Live, path: str, who: str) -> None:
    page.goto(live.url + path)
    page.get_by_test_id("api-key").fill(live.keys[who])
    page.get_by_test_id("sign-in").click()


def _figure(page: Page, name: str) -> str:
    return page.get_by_test_id(name).inner_text()


def _minor(text: str, digits: int) -> int:
    """Minor units from a figure as people read it (``1,234.50`` at two digits)."""
    assert re.fullmatch(r"-?[0-9,]+(\.[0-9]+)?", text), f"not a number as people read it: {text!r}"
    assert len(text.partition(".")[2]) == digits, f"{text!r} should show {digits} decimals"
    return int(text.replace(",", "").replace(".", ""))


def _page_totals(page: Page) -> dict[str, Any]:
    """What the page shows, once its figures have been drawn for the range it names."""
    expect(page.get_by_test_id("freshness")).to_contain_text("answered by")
    rng = page.get_by_test_id("range")
    currency = page.get_by_test_id("currency").input_value()
    digits = 2 if currency == "USD" else 0
    return {
        "from": rng.get_attribute("data-from"),
        "to": rng.get_attribute("data-to"),
        "currency": currency,
        "count": _minor(_figure(page, "count-total"), 0),
        "gross_amount": _minor(_figure(page, "gross-total"), digits),
        "canceled_amount": _minor(_figure(page, "canceled-total"), digits),
        "net_amount": _minor(_figure(page, "net-total"), digits),
        "buckets": int(page.get_by_test_id("sales-chart").get_attribute("data-buckets") or -1),
    }


def _api_totals(live: Live, who: str, shown: dict[str, Any], granularity: str) -> dict[str, Any]:
    with live.client(who) as c:
        resp = c.get(
            "/v1/sales",
            params={
                "from": shown["from"],
                "to": shown["to"],
                "granularity": granularity,
                "group_by": "currency",
            },
        )
    assert resp.status_code == 200, resp.text
    mine = [b for b in resp.json()["buckets"] if b["currency"] == shown["currency"]]
    out: dict[str, Any] = {k: shown[k] for k in ("from", "to", "currency")}
    for field in ("count", "gross_amount", "canceled_amount", "net_amount"):
        out[field] = sum(b[field] for b in mine)
    out["buckets"] = len(mine)
    return out


def test_a_wrong_key_shows_the_apis_error_and_keeps_nothing(page: Page, live: Live) -> None:
    page.goto(live.url + "/dashboard")
    page.get_by_test_id("api-key").fill("tly_nope_nope")
    page.get_by_test_id("sign-in").press("Enter")  # the keyboard signs in too
    expect(page.get_by_test_id("error")).to_have_text("unknown or revoked API key")
    expect(page.get_by_test_id("net-total")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0
    # An admin key is no merchant's: the API's reason is shown, not a blank page.
    page.get_by_test_id("api-key").fill(live.keys["admin"])
    page.get_by_test_id("sign-in").click()
    expect(page.get_by_test_id("error")).to_contain_text("admin key")


def test_the_figures_equal_v1_sales_for_the_range_shown(
    page: Page, live: Live, tmp_path: Path
) -> None:
    who = live.merchants()[0]
    _sign_in(page, live, "/dashboard", who)
    for preset, granularity in (("range-90d", "day"), ("range-7d", "day"), ("range-today", "hour")):
        page.get_by_test_id(preset).click()
        expect(page.get_by_test_id(preset)).to_have_attribute("aria-pressed", "true")
        expect(page.get_by_test_id("granularity")).to_have_value(granularity)
        # The figures follow the API once the refresh for this range has drawn them.
        expected: dict[str, Any] = {}
        _until(
            lambda g=granularity, out=expected: _agrees(page, live, who, g, out),
            f"the {preset} figures to equal /v1/sales",
        )
        if preset == "range-90d":
            assert expected["count"] > 0 and expected["canceled_amount"] > 0
            page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
    key = live.keys[who]
    assert key not in page.url and page.evaluate("document.cookie") == ""
    assert page.evaluate("sessionStorage.getItem('tally.dashboard.key')") == key


def _agrees(page: Page, live: Live, who: str, granularity: str, out: dict[str, Any]) -> bool:
    shown = _page_totals(page)
    out.update(_api_totals(live, who, shown, granularity))
    return shown == out


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _until(condition: Any, what: str, timeout_s: float = 30) -> None:
    """Poll ``condition`` (which reads page state) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _shown_ids(page: Page) -> list[str]:
    """The ids in the table, read at once (a refresh may redraw it between reads)."""
    rows = page.get_by_test_id("txn-table").locator("tbody tr[data-txn-id]")
    ids: list[str] = rows.evaluate_all("rows => rows.map((r) => r.dataset.txnId)")
    return ids


def _api_ids(live: Live, who: str, pages: int, **params: Any) -> list[str]:
    ids: list[str] = []
    cursor = None
    with live.client(who) as c:
        for _ in range(pages):
            resp = c.get("/v1/transactions", params={**params, "limit": 25, "cursor": cursor})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            ids += [i["txn_id"] for i in body["items"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
    return ids


def test_a_keyword_search_shows_exactly_the_apis_rows(page: Page, live: Live) -> None:
    who = live.merchants()[0]
    names = sorted({e["customer_name"] for e in live.events if e["merchant_id"] == who})
    keyword = names[len(names) // 2].split()[0]
    _sign_in(page, live, "/dashboard", who)
    page.get_by_test_id("range-90d").click()
    box = page.get_by_test_id("search-box")
    box.fill(keyword)
    box.press("Enter")
    rng = page.get_by_test_id("range")
    params = {"q": keyword}

    def matches(pages: int) -> bool:
        window = {"from": rng.get_attribute("data-from"), "to": rng.get_attribute("data-to")}
        if not all(window.values()):
            return False  # the first refresh has not drawn the range yet
        return _shown_ids(page) == _api_ids(live, who, pages, **params, **window)

    _until(lambda: matches(1), "the search results to equal the API's first page")
    assert _shown_ids(page), f"{keyword!r} should match some payments"
    if page.get_by_test_id("load-more").is_visible():
        page.get_by_test_id("load-more").click()
        _until(lambda: matches(2), "load more to append the API's second page")


def test_the_status_and_method_filters_show_exactly_the_apis_rows(page: Page, live: Live) -> None:
    who = live.merchants()[0]
    _sign_in(page, live, "/dashboard", who)
    page.get_by_test_id("range-90d").click()
    page.get_by_test_id("status-filter").select_option("CANCELED")
    page.get_by_test_id("method-filter").select_option("CARD")
    rng = page.get_by_test_id("range")

    def matches() -> bool:
        window = {"from": rng.get_attribute("data-from"), "to": rng.get_attribute("data-to")}
        if not all(window.values()):
            return False  # the first refresh has not drawn the range yet
        wanted = _api_ids(live, who, 1, status="CANCELED", method="CARD", **window)
        return bool(wanted) and _shown_ids(page) == wanted

    _until(matches, "the filtered rows to equal the API's")
    statuses = page.locator("#txn-rows tr[data-txn-id]").evaluate_all(
        "rows => rows.map((r) => r.dataset.status)"
    )
    assert set(statuses) == {"CANCELED"}


def test_a_merchant_key_never_shows_another_merchants_data(page: Page, live: Live) -> None:
    first, second = live.merchants()[:2]
    theirs = {e["txn_id"] for e in live.events if e["merchant_id"] == first}
    mine = {e["txn_id"] for e in live.events if e["merchant_id"] == second}
    _sign_in(page, live, "/dashboard", second)
    page.get_by_test_id("range-90d").click()
    table = page.get_by_test_id("txn-table")
    expect(table).to_have_attribute("aria-busy", "false")  # the 90 days' first page drawn
    expect(table.locator("tbody tr[data-txn-id]").first).to_be_visible()
    for _ in range(3):
        more = page.get_by_test_id("load-more")
        if not more.is_visible():
            break
        before = len(_shown_ids(page))
        more.click()
        _until(lambda before=before: len(_shown_ids(page)) > before, "another page")
    shown = set(_shown_ids(page))
    assert shown and shown <= mine and not shown & theirs
    # A keyword only the other merchant's payments hold finds nothing here.
    only_theirs = {e["order_id"] for e in live.events if e["merchant_id"] == first}
    box = page.get_by_test_id("search-box")
    box.fill(sorted(only_theirs)[0])
    box.press("Enter")
    expect(page.get_by_test_id("txn-table")).to_contain_text("no payments match")


def test_a_live_refresh_never_takes_back_the_rows_load_more_added(page: Page, live: Live) -> None:
    """A refresh asked for the first page; "load more" appended the second before that
    answer came back. The late first page must not replace the two pages shown (a CI
    run's click on "load more" was undone this way, and no further page came)."""
    who = live.merchants()[0]
    _sign_in(page, live, "/dashboard", who)
    page.get_by_test_id("range-90d").click()
    table = page.get_by_test_id("txn-table")
    expect(table).to_have_attribute("aria-busy", "false")
    expect(page.get_by_test_id("load-more")).to_be_visible()
    first_page = len(_shown_ids(page))
    held: list[Route] = []

    def hold_first_pages(route: Route) -> None:
        if held or "cursor=" in route.request.url:
            route.continue_()
        else:
            held.append(route)  # answered below, after "load more"

    page.route("**/v1/transactions?*", hold_first_pages)
    _until(lambda: page.evaluate("1") and bool(held), "a refresh to ask for the first page")
    page.get_by_test_id("load-more").click()
    _until(lambda: len(_shown_ids(page)) > first_page, "load more to append a page")
    appended = _shown_ids(page)
    refreshed = int(page.locator("body").get_attribute("data-refreshed") or 0)
    held[0].continue_()
    _until(
        lambda: int(page.locator("body").get_attribute("data-refreshed") or 0) > refreshed,
        "the held refresh to finish",
    )
    assert _shown_ids(page) == appended


def test_a_row_opens_the_payments_details(page: Page, live: Live) -> None:
    who = live.merchants()[0]
    _sign_in(page, live, "/dashboard", who)
    page.get_by_test_id("range-90d").click()
    row = page.get_by_test_id("txn-table").locator("tbody tr[data-txn-id]").first
    txn_id = row.get_attribute("data-txn-id")
    row.focus()
    page.keyboard.press("Enter")  # rows open from the keyboard as well as by click
    details = page.get_by_test_id("details")
    expect(details).to_be_visible()
    expect(details.locator("dd[data-field='txn_id']")).to_have_text(txn_id or "")
    expect(details.locator("dd[data-field='merchant_id']")).to_have_text(who)
    page.get_by_test_id("details-close").click()
    expect(details).to_be_hidden()


def test_the_pages_read_on_a_phone(browser: Browser, live: Live, tmp_path: Path) -> None:
    context = browser.new_context(viewport=PHONE)
    try:
        page = context.new_page()
        for path, who, ready in (
            ("/dashboard", live.merchants()[0], "net-total"),
            ("/console", "admin", "backends"),
        ):
            _sign_in(page, live, path, who)
            expect(page.get_by_test_id(ready)).to_be_visible()
            if path == "/dashboard":
                expect(page.get_by_test_id("freshness")).to_contain_text("answered by")
            else:
                expect(page.get_by_test_id("backends")).to_contain_text("ok")
            wide = page.evaluate(
                """[...document.querySelectorAll('body *')]
                   .filter((e) => e.closest('.scroll') === null && e.getBoundingClientRect()
                     .right > document.documentElement.clientWidth + 1)
                   .map((e) => `${e.tagName}#${e.id}.${e.className}`)"""
            )
            assert not wide, f"{path} is wider than a phone: {wide[:8]}"
            page.screenshot(path=tmp_path / f"{path.strip('/')}-phone.png", full_page=True)
    finally:
        context.close()


def test_the_pages_pass_axes_accessibility_rules(page: Page, live: Live) -> None:
    """axe-core (Deque's rules: labels, contrast, roles, keyboard access) finds no
    serious or critical violation on either page, signed out or signed in with data."""
    axe = Axe()
    found = {}
    for path, who, ready in (
        ("/dashboard", live.merchants()[0], "freshness"),
        ("/console", "admin", "ingestion"),
    ):
        page.goto(live.url + path)
        found[f"{path} sign-in"] = axe.run(page).response["violations"]
        _sign_in(page, live, path, who)
        expect(page.get_by_test_id(ready)).to_contain_text(re.compile(r"answered by|olap"))
        found[path] = axe.run(page).response["violations"]
    serious = {
        where: [
            f"{v['id']}: {v['help']} ({len(v['nodes'])})"
            for v in violations
            if v["impact"] in ("serious", "critical")
        ]
        for where, violations in found.items()
    }
    assert not any(serious.values()), serious


def test_a_slow_api_delays_refreshes_instead_of_piling_them_up(page: Page, live: Live) -> None:
    """Every /v1/sales answer is held back 2 s, longer than the refresh interval (1 s
    on this server): the page must wait for a refresh to end before it starts the next."""
    page.add_init_script(
        """(() => {
          const real = window.fetch;
          window.__inFlight = 0; window.__maxInFlight = 0;
          window.fetch = async (...args) => {
            const slow = String(args[0]).includes('/v1/sales');
            window.__inFlight++;
            window.__maxInFlight = Math.max(window.__maxInFlight, window.__inFlight);
            try {
              const resp = await real(...args);
              if (slow) await new Promise((r) => setTimeout(r, 2000));
              return resp;
            } finally { window.__inFlight--; }
          };
        })()"""
    )
    _sign_in(page, live, "/dashboard", live.merchants()[0])
    refreshes = re.compile(r"^([3-9]|[1-9][0-9]+)$")
    expect(page.locator("body")).to_have_attribute("data-refreshed", refreshes, timeout=60_000)
    # One refresh asks three sales breakdowns and a page of transactions at most.
    assert page.evaluate("window.__maxInFlight") <= 4


def test_a_late_cancellation_shows_live_in_the_row_and_its_old_days_bar(
    page: Page, live: Live
) -> None:
    """A 20-day-old payment is canceled after it was indexed; only the OLAP sink ingests
    the cancellation, so the index still says DONE. The open page, refreshing, shows
    the row as canceled (the API checks hits against the store) and the old day's
    canceled bar grown by the amount."""
    who = live.merchants()[0]
    versions: dict[str, list[dict[str, Any]]] = {}
    for e in live.events:
        versions.setdefault(e["txn_id"], []).append(e)
    now = datetime.now(UTC)
    old = [
        evs[0]
        for evs in versions.values()
        if len(evs) == 1
        and evs[0]["merchant_id"] == who
        and evs[0]["currency"] == "KRW"
        and timedelta(days=19)
        < now - datetime.fromisoformat(evs[0]["approved_at"])
        < timedelta(days=21)
    ]
    assert old, "the history should hold a 20-day-old payment never canceled"
    paid = old[0]
    _sign_in(page, live, "/dashboard", who)
    page.get_by_test_id("range-30d").click()
    page.get_by_test_id("currency").select_option("KRW")
    box = page.get_by_test_id("search-box")
    box.fill(paid["order_id"])  # searchable, and this payment's alone
    box.press("Enter")
    row = page.locator(f"tr[data-txn-id='{paid['txn_id']}']")
    expect(row).to_have_attribute("data-status", "DONE")
    at = datetime.fromisoformat(paid["approved_at"])
    buckets = page.locator("#sales-table tr[data-bucket]")
    expect(buckets.first).to_be_attached()
    starts: list[str] = buckets.evaluate_all("rows => rows.map((r) => r.dataset.bucket)")
    (day,) = [
        b for b in starts if timedelta(0) <= at - datetime.fromisoformat(b) < timedelta(days=1)
    ]
    bar = page.locator(f"#sales-table tr[data-bucket='{day}'] td.canceled")
    before = _minor(bar.text_content() or "", 0)  # the figures table is folded away
    cancel = paid | {
        "event_id": f"{paid['event_id']}-cancel",
        "event_type": "payment.canceled",
        "version": paid["version"] + 1,
        "status": "CANCELED",
        "canceled_amount": paid["amount"],
        "occurred_at": now.isoformat(),
    }
    live.publish([Wire(cancel["txn_id"].encode(), encode(cancel), None)])
    live.ingest("olap")
    expect(row).to_have_attribute("data-status", "CANCELED")
    expect(bar).to_have_text(f"{before + paid['amount']:,}")
    live.ingest("search")  # the index catches up, for the tests after this one


# --- the operator console ------------------------------------------------------------


def test_the_console_tells_a_merchant_key_it_needs_an_admin_key(page: Page, live: Live) -> None:
    _sign_in(page, live, "/console", live.merchants()[0])
    expect(page.get_by_test_id("error")).to_have_text("this route needs an admin key")
    expect(page.get_by_test_id("backends")).to_be_hidden()


def test_the_console_shows_positions_dead_letters_and_replays_them(
    page: Page, live: Live, tmp_path: Path
) -> None:
    _sign_in(page, live, "/console", "admin")
    expect(page.get_by_test_id("backends")).to_contain_text("embedded")
    ingestion = page.get_by_test_id("ingestion")
    expect(ingestion.locator("tr[data-sink='olap']")).to_have_count(6)
    expect(ingestion.locator("tr[data-sink='search']")).to_have_count(6)
    with live.client("admin") as c:
        body = c.get("/v1/admin/ingestion").json()
        letters = c.get("/v1/admin/dead-letters", params={"limit": 1000}).json()
    committed = {
        (s["sink"], str(p["partition"])): str(p["committed"])
        for s in body["sinks"]
        for p in s["partitions"]
    }
    for (sink, partition), offset in committed.items():
        cell = ingestion.locator(
            f"tr[data-sink='{sink}'][data-partition='{partition}'] td.committed"
        )
        expect(cell).to_have_text(f"{int(offset):,}")
    assert len(letters["dead_letters"]) == live.dead_letters == letters["recorded"]
    table = page.get_by_test_id("dead-letters")
    expect(table.locator("tbody tr[data-letter-id]")).to_have_count(min(live.dead_letters, 20))
    newest = letters["dead_letters"][0]
    expect(table.locator("tbody tr[data-letter-id]").first).to_contain_text(newest["reason"])
    page.screenshot(path=tmp_path / "console.png", full_page=True)
    page.get_by_test_id("replay").click()
    expect(page.get_by_test_id("replayed")).to_have_text(f"replayed {live.dead_letters}")
    with live.client("admin") as c:  # once each: a second replay has nothing left to send
        again = c.post("/v1/admin/dead-letters/replay")
    assert again.status_code == 200 and again.json() == {"replayed": 0}
    # The replayed letters are on the source topic again; still malformed, they come
    # back as letters once ingested (which leaves the platform consistent for others).
    live.published += live.dead_letters
    live.ingest()
    live.dead_letters *= 2
    with live.client("admin") as c:
        assert c.get("/v1/admin/dead-letters").json()["recorded"] == live.dead_letters


def test_the_pages_are_served_as_files_and_load_nothing_from_elsewhere(live: Live) -> None:
    """The pages come without a key (they hold no data until one signs in), under a
    policy that allows this origin only, and every asset they name is served here."""
    web = Path(__file__).resolve().parents[2] / "query_api" / "web"
    own = [p for p in web.iterdir() if p.suffix in (".html", ".js", ".css")]
    assert len(own) >= 5
    for path in own:
        assert not re.search(r"https?://", path.read_text()), f"{path.name} names another origin"
    with httpx.Client(base_url=live.url, timeout=30) as c:
        for name in ("/dashboard", "/console"):
            resp = c.get(name)
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
            policy = resp.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "connect-src 'self'" in policy
            config = re.search(
                r'id="tally-config" type="application/json">(.*?)</script>', resp.text
            )
            assert config and json.loads(config.group(1))["timezone"] == "Asia/Seoul"
            assets = re.findall(r'(?:src|href)="([^"]+)"', resp.text)
            assert assets and all(a.startswith("/static/") for a in assets), assets
            for asset in assets:
                assert c.get(asset).status_code == 200, asset

/* The merchant dashboard: totals, sales over time, breakdowns and transactions of the
   signed-in merchant, from /v1/sales and /v1/transactions, refreshed every few
   seconds while it is open. */
"use strict";

(() => {
  const { config, api, money, count, el, render } = Tally;
  const $ = (id) => document.getElementById(id);
  const REFRESH_MS = config.refresh_ms;
  const PAGE = 25;
  const state = {
    key: null,
    range: "30d",
    granularity: "day",
    currency: null,
    filters: { q: "", status: "", method: "" },
    txn: { items: [], cursor: null, pages: 0, appended: 0, signature: "" },
    session: null,
    chart: null,
    generation: 0, // bumped when the range or a filter changes: older answers are dropped
  };

  function rangeOf(name) {
    const t = Tally.today();
    const days = { today: 1, "7d": 7, "30d": 30, "90d": 90 }[name];
    const first = name === "month" ? { ...t, day: 1 } : Tally.addDays(t, 1 - days);
    const end = Tally.addDays(t, 1);
    return {
      from: Tally.iso(Tally.midnight(first.year, first.month, first.day)),
      to: Tally.iso(Tally.midnight(end.year, end.month, end.day)),
    };
  }

  function salesParams(groupBy) {
    const r = rangeOf(state.range);
    return { from: r.from, to: r.to, granularity: state.granularity, group_by: groupBy };
  }

  function sum(buckets) {
    const t = { count: 0, gross_amount: 0, canceled_amount: 0, net_amount: 0 };
    for (const b of buckets) for (const k of Object.keys(t)) t[k] += b[k];
    return t;
  }

  function showError(err) {
    $("error").textContent = err ? err.message : "";
    if (err && err.status === 401) state.session.signOut(err.message);
  }

  /* --- totals, chart, breakdowns ----------------------------------------------- */

  function chooseCurrency(buckets) {
    const gross = new Map();
    for (const b of buckets) gross.set(b.currency, (gross.get(b.currency) || 0) + b.gross_amount);
    const seen = [...gross.keys()].sort();
    if (!seen.length) seen.push(state.currency || "KRW");
    const select = $("currency");
    render(select, seen.join(","), () => seen.map((c) => el("option", { value: c }, c)));
    if (!state.currency || !gross.has(state.currency)) {
      state.currency = [...gross.entries()].sort((a, b) => b[1] - a[1])[0]?.[0] || seen[0];
    }
    select.value = state.currency;
    for (const u of document.querySelectorAll(".cur")) u.textContent = state.currency;
  }

  function showTotals(buckets) {
    const t = sum(buckets);
    const cur = state.currency;
    $("count-total").textContent = count(t.count);
    $("gross-total").textContent = money(t.gross_amount, cur);
    $("canceled-total").textContent = money(t.canceled_amount, cur);
    $("net-total").textContent = money(t.net_amount, cur);
  }

  function chartData(buckets) {
    const rows = [...buckets].sort((a, b) => a.bucket.localeCompare(b.bucket));
    const scale = 10 ** Tally.digits(state.currency);
    return [
      rows.map((b) => new Date(b.bucket).getTime() / 1000),
      rows.map((b) => b.gross_amount / scale),
      rows.map((b) => b.canceled_amount / scale),
      rows.map((b) => b.net_amount / scale),
    ];
  }

  function chartOptions(width) {
    const bars = uPlot.paths.bars;
    const fmt = (v) => (v === null ? "" : new Intl.NumberFormat("en-US").format(v));
    return {
      width,
      height: 280,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), config.timezone),
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true } },
      axes: [{}, { values: (_u, ticks) => ticks.map(fmt), size: 96 }],
      series: [
        {},
        { label: "Gross", stroke: "#0b5cad", fill: "rgba(11,92,173,0.35)", paths: bars({ size: [0.7, 60] }), value: (_u, v) => fmt(v) },
        { label: "Canceled", stroke: "#b42318", fill: "rgba(180,35,24,0.55)", paths: bars({ size: [0.35, 30] }), value: (_u, v) => fmt(v) },
        { label: "Net", stroke: "#1a7f37", width: 2, points: { show: true }, value: (_u, v) => fmt(v) },
      ],
    };
  }

  function showSeriesTable(buckets) {
    const rows = [...buckets].sort((a, b) => a.bucket.localeCompare(b.bucket));
    const cur = state.currency;
    render($("sales-table"), JSON.stringify([cur, rows]), () => rows.map((b) =>
      el("tr", { dataset: { bucket: b.bucket } },
        el("td", {}, Tally.when(b.bucket)),
        el("td", { class: "num" }, count(b.count)),
        el("td", { class: "num" }, money(b.gross_amount, cur)),
        el("td", { class: "num canceled" }, money(b.canceled_amount, cur)),
        el("td", { class: "num" }, money(b.net_amount, cur)))));
  }

  function showChart(buckets) {
    const box = $("sales-chart");
    const data = chartData(buckets);
    const shape = `${state.currency}|${state.granularity}|${state.range}|${data[0].join(",")}`;
    if (state.chart && box.dataset.shape === shape) {
      state.chart.setData(data, false); // same buckets: update the bars in place
      return;
    }
    if (state.chart) state.chart.destroy();
    box.replaceChildren();
    box.dataset.shape = shape;
    box.dataset.buckets = String(data[0].length);
    state.chart = new uPlot(chartOptions(Math.max(280, box.clientWidth - 16)), data, box);
  }

  function showBreakdown(tbodyId, buckets, column) {
    const groups = new Map();
    for (const b of buckets) {
      const g = groups.get(b[column]) || [];
      g.push(b);
      groups.set(b[column], g);
    }
    const rows = [...groups.entries()]
      .map(([name, bs]) => [name, sum(bs)])
      .sort((a, b) => b[1].gross_amount - a[1].gross_amount);
    const cur = state.currency;
    render($(tbodyId), JSON.stringify([cur, rows]), () =>
      rows.map(([name, t]) =>
        el("tr", { dataset: { group: name } },
          el("td", {}, name),
          el("td", { class: "num" }, count(t.count)),
          el("td", { class: "num" }, money(t.gross_amount, cur)),
          el("td", { class: "num" }, money(t.canceled_amount, cur)),
          el("td", { class: "num" }, money(t.net_amount, cur)))));
  }

  function showFreshness(source, freshness) {
    const r = rangeOf(state.range);
    $("range").textContent = `${Tally.when(r.from)} – ${Tally.when(r.to)} (${config.timezone})`;
    $("range").dataset.from = r.from;
    $("range").dataset.to = r.to;
    const parts = [`answered by ${source === "base" ? "the base table" : `rollup ${source}`}`];
    if (freshness) {
      parts.push(`store has events to ${Tally.when(freshness.olap)} (${Tally.ago(freshness.olap)})`);
      parts.push(`search to ${Tally.when(freshness.search)} (${Tally.ago(freshness.search)})`);
    }
    const f = $("freshness");
    f.textContent = parts.join(" · ");
    f.dataset.source = source;
  }

  async function refreshSales(generation) {
    const [series, byMethod, byStatus] = await Promise.all([
      api(state.key, "/v1/sales", { params: salesParams("currency") }),
      api(state.key, "/v1/sales", { params: salesParams("currency,method") }),
      api(state.key, "/v1/sales", { params: salesParams("currency,status") }),
    ]);
    if (generation !== state.generation) return null;
    chooseCurrency(series.buckets);
    const mine = (bs) => bs.filter((b) => b.currency === state.currency);
    showTotals(mine(series.buckets));
    showChart(mine(series.buckets));
    showSeriesTable(mine(series.buckets));
    showBreakdown("by-method", mine(byMethod.buckets), "method");
    showBreakdown("by-status", mine(byStatus.buckets), "status");
    return series.source;
  }

  /* --- transactions -------------------------------------------------------------- */

  function txnParams(cursor) {
    const r = rangeOf(state.range);
    const f = state.filters;
    return { from: r.from, to: r.to, limit: PAGE, q: f.q, status: f.status, method: f.method, cursor };
  }

  function txnRow(item) {
    const cur = item.currency;
    const id = item[config.key];
    return el("tr", { tabindex: "0", dataset: { txnId: id, status: item.status }, "aria-label": `payment ${id}` },
      el("td", {}, Tally.when(item[config.time])),
      el("td", {}, id),
      el("td", { class: "hide-narrow" }, item.order_name ?? ""),
      el("td", { class: "hide-narrow" }, item.customer_name ?? ""),
      el("td", {}, item.method ?? ""),
      el("td", {}, el("span", { class: `badge ${item.status}` }, item.status ?? "")),
      el("td", { class: "num" }, `${money(item.amount ?? 0, cur)} ${cur}`),
      el("td", { class: "num" }, item.canceled_amount ? `${money(item.canceled_amount, cur)} ${cur}` : ""));
  }

  function showTxns() {
    const items = state.txn.items;
    const signature = JSON.stringify(items.map((i) => [i[config.key], i.status, i.canceled_amount, i.version]));
    render($("txn-rows"), signature, () =>
      items.length ? items.map(txnRow) : [el("tr", {}, el("td", { colspan: "8", class: "muted" }, "no payments match"))]);
    $("load-more").hidden = !state.txn.cursor;
    $("txn-table").setAttribute("aria-busy", "false");
    const live = state.txn.pages > 1 ? " (live updates paused while more pages are shown)" : "";
    $("txn-note").textContent = `${count(items.length)} shown${live}`;
  }

  /* The first page, as the live refresh asks it. Its answer is dropped when the
     query changed meanwhile, or when "load more" appended a page after it was asked:
     replacing the list then would take back the rows the user just loaded. */
  async function loadFirstPage(generation) {
    const asked = state.txn.appended;
    const page = await api(state.key, "/v1/transactions", { params: txnParams(null) });
    if (generation !== state.generation) return null;
    if (state.txn.appended !== asked || state.txn.pages > 1) return state.lastFreshness;
    state.txn.items = page.items;
    state.txn.pages = 1;
    state.txn.cursor = page.next_cursor;
    showTxns();
    return page.freshness;
  }

  /* The next page after the rows shown. A live refresh may replace the first page
     (and its cursor) while this one is in flight: the page is then asked again after
     the new cursor, so it never appends rows that follow a list no longer shown. */
  async function loadMore() {
    const generation = state.generation;
    for (;;) {
      const cursor = state.txn.cursor;
      if (!cursor) return;
      const page = await api(state.key, "/v1/transactions", { params: txnParams(cursor) });
      if (generation !== state.generation) return;
      if (state.txn.cursor !== cursor) continue;
      state.txn.items = state.txn.items.concat(page.items);
      state.txn.pages += 1;
      state.txn.appended += 1;
      state.txn.cursor = page.next_cursor;
      showTxns();
      return;
    }
  }

  async function openDetails(id) {
    try {
      const item = await api(state.key, `/v1/transactions/${encodeURIComponent(id)}`);
      const body = $("details-body");
      // A related entity (another datasource's row of this key) is listed field by field.
      const fields = Object.entries(item).flatMap(([k, v]) =>
        v !== null && typeof v === "object"
          ? Object.entries(v).map(([sub, value]) => [`${k}.${sub}`, value])
          : [[k, v]]);
      body.replaceChildren(...fields.flatMap(([k, v]) => [
        el("dt", {}, k), el("dd", { dataset: { field: k } }, v === null ? "—" : String(v))]));
      $("details-title").textContent = `Payment ${id}`;
      $("details").showModal();
    } catch (err) {
      showError(err);
    }
  }

  /* --- the refresh loop ------------------------------------------------------------ */

  async function refresh() {
    const generation = state.generation;
    try {
      const source = await refreshSales(generation);
      if (source === null) return;
      const freshness = state.txn.pages <= 1 ? await loadFirstPage(generation) : state.lastFreshness;
      if (generation !== state.generation) return;
      state.lastFreshness = freshness;
      showFreshness(source, freshness);
      showError(null);
      document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
    } catch (err) {
      showError(err);
    }
  }

  function restart() {
    state.generation += 1;
    state.txn.pages = 0;
    state.txn.cursor = null;
    $("load-more").hidden = true;
    $("txn-table").setAttribute("aria-busy", "true"); // until this query's rows are drawn
    if (state.session) state.session.refreshNow();
  }

  function selectRange(name) {
    state.range = name;
    if (name === "today" && state.granularity !== "hour") state.granularity = "hour";
    if (name !== "today" && state.granularity === "hour") state.granularity = "day";
    $("granularity").value = state.granularity;
    for (const b of document.querySelectorAll("[data-range]")) {
      b.setAttribute("aria-pressed", String(b.dataset.range === name));
    }
    restart();
  }

  function start(key) {
    state.key = key;
    $("who").textContent = `signed in · ${config.datasource}`;
    selectRange(state.range);
  }

  function wire() {
    for (const b of document.querySelectorAll("[data-range]")) {
      b.addEventListener("click", () => selectRange(b.dataset.range));
    }
    $("granularity").addEventListener("change", (ev) => { state.granularity = ev.target.value; restart(); });
    $("currency").addEventListener("change", (ev) => { state.currency = ev.target.value; restart(); });
    for (const s of config.statuses) $("status-filter").append(el("option", { value: s }, s));
    for (const m of config.methods) $("method-filter").append(el("option", { value: m }, m));
    $("txn-filters").addEventListener("submit", (ev) => {
      ev.preventDefault();
      state.filters.q = $("search-box").value.trim();
      restart();
    });
    $("status-filter").addEventListener("change", (ev) => { state.filters.status = ev.target.value; restart(); });
    $("method-filter").addEventListener("change", (ev) => { state.filters.method = ev.target.value; restart(); });
    $("load-more").addEventListener("click", async () => {
      const button = $("load-more");
      button.disabled = true;
      try {
        await loadMore();
      } catch (err) {
        showError(err);
      } finally {
        button.disabled = false;
      }
    });
    const rows = $("txn-rows");
    rows.addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr[data-txn-id]");
      if (tr) openDetails(tr.dataset.txnId);
    });
    rows.addEventListener("keydown", (ev) => {
      const tr = ev.target.closest("tr[data-txn-id]");
      if (tr && (ev.key === "Enter" || ev.key === " ")) {
        ev.preventDefault();
        openDetails(tr.dataset.txnId);
      }
    });
    $("details-close").addEventListener("click", () => $("details").close());
    window.addEventListener("resize", () => {
      if (state.chart) state.chart.setSize({ width: Math.max(280, $("sales-chart").clientWidth - 16), height: 280 });
    });
    const today = rangeOf("today");
    state.session = Tally.signIn({
      storeName: "tally.dashboard.key",
      probe: (key) => api(key, "/v1/sales", { params: { from: today.from, to: today.to, granularity: "day" } }),
      onStart: start,
      refresh,
      everyMs: REFRESH_MS,
    });
  }

  wire();
})();

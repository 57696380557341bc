/* The operator console: backends and their health, per sink and partition positions
   and lag, dead letters with a replay, compaction due and done. Admin routes only
   (/v1/admin/*); a merchant key gets the API's 403 message. */
"use strict";

(() => {
  const { config, api, count, el, render } = Tally;
  const $ = (id) => document.getElementById(id);
  const REFRESH_MS = config.refresh_ms;
  const state = { key: null };
  let session = null;

  function badge(status) {
    return el("span", { class: `badge ${status === "ok" ? "ok" : "bad"}` }, status);
  }

  function showBackends(body) {
    render($("backends"), JSON.stringify(body), () => body.backends.map((b) =>
      el("tr", { dataset: { role: b.role } },
        el("td", {}, b.role),
        el("td", {}, b.backend),
        el("td", {}, badge(b.status)),
        el("td", { class: "hide-narrow muted" },
          Object.entries(b.detail).filter(([, v]) => typeof v !== "boolean" || v)
            .map(([k, v]) => (typeof v === "boolean" ? k : `${k}: ${v}`)).join(", ")))));
  }

  function showIngestion(body) {
    $("topic").textContent = `(${body.topic})`;
    $("sink-freshness").textContent = body.sinks
      .map((s) => `${s.sink}: events to ${Tally.when(s.freshness)} (${Tally.ago(s.freshness)})`)
      .join(" · ");
    const rows = body.sinks.flatMap((s) => s.partitions.map((p) => [s.sink, p]));
    render($("ingestion"), JSON.stringify(rows), () => rows.map(([sink, p]) =>
      el("tr", { dataset: { sink, partition: String(p.partition) } },
        el("td", {}, sink),
        el("td", {}, p.partition),
        el("td", { class: "num committed" }, p.committed === null ? "—" : count(p.committed)),
        el("td", { class: "num" }, p.end === null ? "—" : count(p.end)),
        el("td", { class: `num lag${p.lag ? " error" : ""}` },
          p.lag === null ? el("span", { title: "the broker reported an end below the committed offset" }, "unknown") : count(p.lag)))));
  }

  function showLetters(body) {
    $("letter-counts").textContent =
      `${count(body.recorded)} recorded, ${count(body.unpublished)} not yet published to ${body.topic}`;
    const rows = body.dead_letters;
    render($("dead-letters"), JSON.stringify(rows), () => rows.length ? rows.map((d) =>
      el("tr", { dataset: { letterId: d.id ?? "" } },
        el("td", {}, d.failed_at ? Tally.when(d.failed_at * 1000) : "—"),
        el("td", {}, d.reason ?? ""),
        el("td", {}, d.sink ?? ""),
        el("td", { class: "hide-narrow" }, `${d.topic ?? "?"} [${d.partition ?? "?"}] @${d.offset ?? "?"}`),
        el("td", { class: "hide-narrow muted" }, (d.value ?? "").slice(0, 80))))
      : [el("tr", {}, el("td", { colspan: "5", class: "muted" }, "no dead letters"))]);
  }

  function showCompaction(body) {
    const due = body.partitions.filter((p) => p.due);
    const shown = body.partitions.filter((p) => p.due || p.segments > 1)
      .sort((a, b) => Number(b.due) - Number(a.due) || b.segments - a.segments).slice(0, 50);
    const runs = body.runs;
    const lags = runs.map((r) => r.detect_to_done_s).filter((v) => v !== null).sort((a, b) => a - b);
    const p50 = lags.length ? lags[Math.floor((lags.length - 1) / 2)] : null;
    $("compaction-summary").textContent =
      `${count(due.length)} of ${count(body.partitions.length)} partitions due · ` +
      `${count(runs.length)} recent runs` +
      (p50 === null ? "" : ` · detect → done median ${p50.toFixed(1)} s`);
    render($("compaction"), JSON.stringify(shown), () => shown.length ? shown.map((p) =>
      el("tr", { dataset: { partition: `${p.datasource}/${p.partition}` } },
        el("td", {}, p.datasource),
        el("td", {}, p.partition),
        el("td", { class: "num" }, count(p.segments)),
        el("td", { class: "num" }, count(p.rows)),
        el("td", { class: "num" }, count(p.late_rows)),
        el("td", {}, Tally.when(p.last_compacted_at)),
        el("td", {}, p.due ? el("span", { class: "badge warn" }, "due") : "")))
      : [el("tr", {}, el("td", { colspan: "7", class: "muted" }, "every partition is one segment"))]);
    render($("compaction-runs"), JSON.stringify(runs), () => runs.length ? runs.map((r) =>
      el("tr", {},
        el("td", {}, Tally.when(r.finished_at)),
        el("td", {}, r.datasource),
        el("td", {}, r.partition),
        el("td", {}, r.kind),
        el("td", { class: "num" }, count(r.segments_in)),
        el("td", { class: "num" }, r.detect_to_done_s === null ? "—" : `${r.detect_to_done_s.toFixed(1)} s`)))
      : [el("tr", {}, el("td", { colspan: "6", class: "muted" }, "no compaction has run yet"))]);
  }

  const SECTIONS = [
    ["/v1/admin/backends", showBackends],
    ["/v1/admin/ingestion", showIngestion],
    ["/v1/admin/dead-letters?limit=20", showLetters],
    ["/v1/admin/compaction", showCompaction],
  ];

  async function refresh() {
    const results = await Promise.allSettled(SECTIONS.map(([path]) => api(state.key, path)));
    const failed = [];
    results.forEach((r, i) => {
      if (r.status === "fulfilled") SECTIONS[i][1](r.value);
      else failed.push(r.reason);
    });
    const auth = failed.find((e) => e.status === 401 || e.status === 403);
    if (auth) {
      session.signOut(auth.message);
      return;
    }
    $("error").textContent = failed.map((e) => e.message).join(" · ");
    $("updated").textContent = `updated ${Tally.when(Date.now())}`;
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  }

  async function replay() {
    const button = $("replay");
    button.disabled = true;
    $("replayed").textContent = "replaying…";
    try {
      const body = await api(state.key, "/v1/admin/dead-letters/replay", { method: "POST", timeoutMs: 120000 });
      $("replayed").textContent = `replayed ${body.replayed}`;
    } catch (err) {
      $("replayed").textContent = "";
      $("error").textContent = err.message;
    } finally {
      button.disabled = false;
      session.refreshNow();
    }
  }

  $("replay").addEventListener("click", replay);
  session = Tally.signIn({
    storeName: "tally.console.key",
    probe: (key) => api(key, "/v1/admin/backends"),
    onStart: (key) => { state.key = key; },
    refresh,
    everyMs: REFRESH_MS,
  });
})();

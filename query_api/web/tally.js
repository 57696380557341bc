/* Shared by the dashboard and the console: the API client, the signed-in key,
   number and time formatting in the datasource's zone, and a poller that never
   piles up requests. Plain ES2020, no build step. */
"use strict";

const Tally = (() => {
  const config = JSON.parse(document.getElementById("tally-config").textContent);

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /* The key lives in sessionStorage: this tab only, never in a URL or a cookie. */
  function keyStore(name) {
    return {
      get: () => sessionStorage.getItem(name),
      set: (key) => sessionStorage.setItem(name, key),
      clear: () => sessionStorage.removeItem(name),
    };
  }

  async function api(key, path, { method = "GET", params = {}, timeoutMs = 15000 } = {}) {
    const url = new URL(path, window.location.origin);
    for (const [k, v] of Object.entries(params)) {
      if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
    }
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), timeoutMs);
    let resp;
    try {
      resp = await fetch(url, {
        method,
        headers: { Authorization: `Bearer ${key}`, Accept: "application/json" },
        signal: abort.signal,
        credentials: "omit",
        cache: "no-store",
      });
    } catch (err) {
      const why = err.name === "AbortError" ? `no answer in ${timeoutMs / 1000} s` : err.message;
      throw new ApiError(0, "unreachable", `the API did not answer: ${why}`);
    } finally {
      clearTimeout(timer);
    }
    let body = null;
    try {
      body = await resp.json();
    } catch (_) {
      body = null;
    }
    if (!resp.ok) {
      const e = body && body.error;
      throw new ApiError(resp.status, e ? e.code : "http_error",
        e ? e.message : `HTTP ${resp.status} from ${url.pathname}`);
    }
    return body;
  }

  /* Minor units as people read them: KRW has no decimals, USD two. */
  function digits(currency) {
    try {
      return new Intl.NumberFormat("en", { style: "currency", currency })
        .resolvedOptions().maximumFractionDigits;
    } catch (_) {
      return 0;
    }
  }

  function money(minor, currency) {
    const d = digits(currency);
    return new Intl.NumberFormat("en-US", { minimumFractionDigits: d, maximumFractionDigits: d })
      .format(minor / 10 ** d);
  }

  function count(n) {
    return new Intl.NumberFormat("en-US").format(n);
  }

  const tz = config.timezone;
  const partsFmt = new Intl.DateTimeFormat("en-US", {
    timeZone: tz, hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  });

  function parts(date) {
    const out = {};
    for (const p of partsFmt.formatToParts(date)) {
      if (p.type !== "literal") out[p.type] = Number(p.value);
    }
    return out;
  }

  /* Milliseconds the zone is ahead of UTC at ``date``. */
  function offsetMs(date) {
    const p = parts(date);
    const asUtc = Date.UTC(p.year, p.month - 1, p.day, p.hour, p.minute, p.second);
    return asUtc - Math.floor(date.getTime() / 1000) * 1000;
  }

  /* The instant of a wall-clock midnight in the datasource's zone. */
  function midnight(year, month, day) {
    const guess = Date.UTC(year, month - 1, day);
    let at = guess - offsetMs(new Date(guess));
    at = guess - offsetMs(new Date(at));
    return new Date(at);
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  /* ISO 8601 with the zone's offset, as the API wants its from/to. */
  function iso(date) {
    const p = parts(date);
    const off = Math.round(offsetMs(date) / 60000);
    const sign = off >= 0 ? "+" : "-";
    const a = Math.abs(off);
    return `${p.year}-${pad(p.month)}-${pad(p.day)}T${pad(p.hour)}:${pad(p.minute)}:` +
      `${pad(p.second)}${sign}${pad(Math.floor(a / 60))}:${pad(a % 60)}`;
  }

  function today() {
    const p = parts(new Date());
    return { year: p.year, month: p.month, day: p.day };
  }

  function addDays(ymd, n) {
    const d = new Date(Date.UTC(ymd.year, ymd.month - 1, ymd.day + n));
    return { year: d.getUTCFullYear(), month: d.getUTCMonth() + 1, day: d.getUTCDate() };
  }

  const timeFmt = new Intl.DateTimeFormat("sv-SE", { // 2026-12-01 09:30:00
    timeZone: tz, year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
  });

  function when(value) {
    if (value === null || value === undefined) return "—";
    return timeFmt.format(new Date(value));
  }

  function ago(value) {
    if (!value) return "never";
    const s = Math.max(0, Math.round((Date.now() - new Date(value).getTime()) / 1000));
    if (s < 120) return `${s} s ago`;
    if (s < 7200) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} days ago`;
  }

  /* Run ``task`` now and again ``everyMs`` after each run ends: a slow API delays the
     next refresh instead of stacking requests. */
  function poll(task, everyMs) {
    let timer = null;
    let stopped = false;
    let running = false;
    let again = false; // asked for while a run was in flight: run once more right after
    async function run() {
      if (stopped) return;
      if (running) {
        again = true;
        return;
      }
      running = true;
      clearTimeout(timer);
      try {
        await task();
      } finally {
        running = false;
        if (!stopped) timer = setTimeout(run, again ? 0 : everyMs);
        again = false;
      }
    }
    run();
    return {
      now() { run(); },
      stop() { stopped = true; clearTimeout(timer); },
    };
  }

  /* Build an element: el("td", {class: "num"}, "12"). Text only, never HTML. */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  /* Replace a container's children only when what it shows changed: no flicker,
     and focus and scroll stay where they were. */
  function render(container, signature, build) {
    if (container.dataset.signature === signature) return false;
    container.replaceChildren(...build());
    container.dataset.signature = signature;
    return true;
  }

  /* Sign-in and the page's life after it. Both pages have the same elements: the
     form #signin with #api-key, #error, #app and #sign-out. A key is kept only once
     ``probe`` accepted it; then ``onStart(key)`` runs and ``refresh`` polls every
     ``everyMs``. The returned session's ``signOut(message)`` forgets the key. */
  function signIn({ storeName, probe, onStart, refresh, everyMs }) {
    const $ = (id) => document.getElementById(id);
    const store = keyStore(storeName);
    const error = $("error");
    let poller = null;

    function show(signedIn) {
      $("signin").hidden = signedIn;
      $("app").hidden = !signedIn;
      $("sign-out").hidden = !signedIn;
    }

    function signOut(message) {
      store.clear();
      if (poller) poller.stop();
      poller = null;
      show(false);
      error.textContent = message || "";
    }

    async function accept(key, fromForm) {
      error.textContent = "";
      try {
        await probe(key);
      } catch (err) {
        store.clear();
        error.textContent = err.message;
        if (fromForm) $("api-key").focus();
        return;
      }
      store.set(key);
      show(true);
      onStart(key);
      poller = poll(refresh, everyMs);
    }

    $("signin").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("api-key").value.trim();
      if (!key) error.textContent = "enter an API key";
      else accept(key, true);
    });
    $("sign-out").addEventListener("click", () => signOut(""));
    const kept = store.get();
    if (kept) accept(kept, false);
    return {
      signOut,
      refreshNow() { if (poller) poller.now(); },
    };
  }

  return {
    config, api, ApiError, money, count, digits, iso, midnight, today, addDays,
    when, ago, poll, el, render, signIn,
  };
})();

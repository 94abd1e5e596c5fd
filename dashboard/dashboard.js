/*
 * Chat health dashboard: polls the module's /chat/metrics (Prometheus text
 * format 0.0.4) and /chat/ready, keeps the last 5 minutes in this page and
 * draws them.  No build step, no libraries: a plain script (defer), served
 * as is by nginx next to index.html and dashboard.css.
 *
 * URL options (the page's query string):
 *   metrics=<url>   the exposition to poll        (default ../metrics)
 *   ready=<url>     the readiness JSON to poll    (default ../ready)
 *   interval=<ms>   the poll period, >= 500       (default 2000)
 *   window=<s>      how much history to keep, 60 .. 3600   (default 300)
 * Relative URLs are resolved against the page's own URL, so a page at
 * /chat/dashboard/ reads /chat/metrics and /chat/ready.
 *
 * window.dashboard (for scripts and tests; numbers, not pixels):
 *   config            {metrics, ready, interval, window}: the resolved options
 *   history           the points held, oldest first (one per successful
 *                     scrape within the window), each:
 *       t                    ms since the epoch (the scrape's answer)
 *       dt                   s since the previous successful scrape (null: first)
 *       connections          {websocket, sse, poll, total}  (gauges)
 *       workers              {pid: open connections}
 *       messagesPerSec       rate of chat_messages_total{result="stored"}
 *       duplicatesPerSec, sendErrorsPerSec   the other two results
 *       deliveriesPerSec     {durable, ephemeral}
 *       sendP50, sendP99     s, histogram_quantile over the chat_send_seconds
 *                            bucket increases since the previous scrape
 *                            (null: no send answered in it)
 *       sends                sends observed in that interval
 *       db                   {connections, busy, queue}  (gauges)
 *       dbP99                s, p99 of chat_db_query_seconds, every statement
 *                            summed (null: no statement in the interval)
 *       queries              statements observed in that interval
 *       errorsPerSec         {code: rate} of chat_errors_total
 *       errorsTotalPerSec    their sum
 *       cutLimitedPerSec     rate of chat_closes_total{code="4008"|"4029"}
 *       zone                 {size, free, usedPct}
 *       busLagMax            max of chat_bus_lag over the workers
 *       reconnects           chat_db_reconnects_total (the counter's value)
 *     every rate is null on the first point (a rate needs two scrapes); a
 *     counter that went down was reset (a restart): its increase is its
 *     new value, as Prometheus' rate() does.
 *   points            how many points have rates (history minus the first)
 *   latest            the newest point (or null)
 *   readiness         {state: "ready"|"not-ready"|"unknown", status (HTTP,
 *                     0: no answer), checks: {store: {ok, ...}, ...}, pid,
 *                     error, t}
 *   reconnectsInWindow   increase of chat_db_reconnects_total over the window
 *   lastUpdate        ms since the epoch of the last successful scrape
 *   lastError         the last scrape's failure (string), null after a success
 *   parseErrors       [{line, text, error}] of the last scrape
 *   scrapes, failures counts
 *   parse(text)       the exposition parser: {families: Map(name -> {name,
 *                     type, help}), samples: [{name, labels, value,
 *                     timestamp}], errors: [...]}
 *   histogramQuantile(q, buckets)   buckets [{le, count}] cumulative,
 *                     sorted, ending with le = Infinity; as Prometheus'
 *   compute(prevText, curText, dtMs)   the point two expositions dtMs
 *                     apart make (pure: touches no state; its t is dtMs)
 *   refresh()         polls now; a promise
 *   stop(), start()   pause and resume polling
 */
(function () {
  'use strict';

  // ------------------------------------------------------------ parser --

  const NAME_START = /[a-zA-Z_:]/;
  const NAME_CHAR = /[a-zA-Z0-9_:]/;
  const LABEL_START = /[a-zA-Z_]/;
  const LABEL_CHAR = /[a-zA-Z0-9_]/;
  const FLOAT_RE = /^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$/;

  // Go's strconv.ParseFloat, which the text format uses: NaN, +Inf, -Inf
  // (and Inf, infinity, any case), decimals with an exponent
  function parseValue(s) {
    if (/^nan$/i.test(s)) return NaN;
    const inf = /^([+-]?)inf(?:inity)?$/i.exec(s);
    if (inf) return inf[1] === '-' ? -Infinity : Infinity;
    if (!FLOAT_RE.test(s)) throw new Error('bad value "' + s + '"');
    return Number(s);
  }

  function isBlank(c) {
    return c === ' ' || c === '\t';
  }

  // one sample line (without its newline, leading blanks already gone)
  function parseSample(s) {
    let i = 0;
    const n = s.length;
    const skip = () => { while (i < n && isBlank(s[i])) i++; };

    if (!NAME_START.test(s[0])) throw new Error('bad metric name');
    while (i < n && NAME_CHAR.test(s[i])) i++;
    const name = s.slice(0, i);
    const labels = {};
    if (i < n && !isBlank(s[i]) && s[i] !== '{') throw new Error('bad metric name');
    skip();
    if (s[i] === '{') {
      i++;
      for (;;) {
        skip();
        if (s[i] === '}') { i++; break; }
        if (i >= n || !LABEL_START.test(s[i])) throw new Error('bad label name');
        const ls = i;
        while (i < n && LABEL_CHAR.test(s[i])) i++;
        const lname = s.slice(ls, i);
        skip();
        if (s[i] !== '=') throw new Error('"=" expected after label ' + lname);
        i++;
        skip();
        if (s[i] !== '"') throw new Error('quoted value expected for label ' + lname);
        i++;
        let v = '';
        for (;;) {
          if (i >= n) throw new Error('unterminated value of label ' + lname);
          const c = s[i++];
          if (c === '"') break;
          if (c === '\\') {
            if (i >= n) throw new Error('unterminated value of label ' + lname);
            const e = s[i++];
            if (e === 'n') v += '\n';
            else if (e === '\\' || e === '"') v += e;
            else throw new Error('bad escape \\' + e + ' in label ' + lname);
          } else {
            v += c;
          }
        }
        if (Object.prototype.hasOwnProperty.call(labels, lname)) {
          throw new Error('label ' + lname + ' twice');
        }
        labels[lname] = v;
        skip();
        if (s[i] === ',') { i++; continue; }   // a trailing comma is allowed
        if (s[i] === '}') { i++; break; }
        throw new Error('"," or "}" expected after label ' + lname);
      }
    }
    const rest = s.slice(i).split(/[ \t]+/).filter((x) => x !== '');
    if (rest.length < 1) throw new Error('no value');
    if (rest.length > 2) throw new Error('text after the timestamp');
    const value = parseValue(rest[0]);
    let timestamp = null;
    if (rest.length === 2) {
      if (!/^-?[0-9]+$/.test(rest[1])) throw new Error('bad timestamp "' + rest[1] + '"');
      timestamp = Number(rest[1]);
    }
    return { name, labels, value, timestamp };
  }

  function unescapeHelp(s) {
    return s.replace(/\\(\\|n)/g, (m, c) => (c === 'n' ? '\n' : '\\'));
  }

  // The whole exposition.  A line that does not parse is reported in
  // errors and skipped; the rest is kept.
  function parse(text) {
    const families = new Map();
    const samples = [];
    const errors = [];
    const lines = String(text).split('\n');
    for (let ln = 0; ln < lines.length; ln++) {
      let line = lines[ln];
      if (line.endsWith('\r')) line = line.slice(0, -1);
      const s = line.replace(/^[ \t]+/, '');
      if (s === '') continue;
      if (s[0] === '#') {
        // "# HELP name text", "# TYPE name type"; any other comment is ignored
        const m = /^#[ \t]+(HELP|TYPE)[ \t]+([a-zA-Z_:][a-zA-Z0-9_:]*)(?:[ \t]+(.*))?$/.exec(s);
        if (!m) continue;
        const fam = families.get(m[2]) || { name: m[2], type: 'untyped', help: '' };
        if (m[1] === 'TYPE') {
          const t = (m[3] || '').trim();
          if (!/^(counter|gauge|histogram|summary|untyped)$/.test(t)) {
            errors.push({ line: ln + 1, text: line, error: 'bad type "' + t + '"' });
            continue;
          }
          fam.type = t;
        } else {
          fam.help = unescapeHelp(m[3] || '');
        }
        families.set(m[2], fam);
        continue;
      }
      try {
        samples.push(parseSample(s));
      } catch (e) {
        errors.push({ line: ln + 1, text: line, error: e.message });
      }
    }
    return { families, samples, errors };
  }

  // ------------------------------------------------- reading samples ----

  function matches(labels, want) {
    for (const k in want) {
      if (labels[k] !== want[k]) return false;
    }
    return true;
  }

  function index(parsed) {
    const by = new Map();
    for (const x of parsed.samples) {
      let a = by.get(x.name);
      if (!a) by.set(x.name, (a = []));
      a.push(x);
    }
    return by;
  }

  function series(ix, name, want) {
    return (ix.get(name) || []).filter((x) => !want || matches(x.labels, want));
  }

  // the sum of the matching series; null when there is none
  function sum(ix, name, want) {
    const s = series(ix, name, want);
    if (!s.length) return null;
    let t = 0;
    for (const x of s) t += x.value;
    return t;
  }

  function labelKey(labels, omit) {
    return Object.keys(labels).filter((k) => k !== omit).sort()
      .map((k) => k + '=' + JSON.stringify(labels[k])).join(',');
  }

  // histogram `base` by its labels other than le: Map(key -> {labels,
  // buckets: [{le, count}] sorted by le, count, sum})
  function histograms(ix, base) {
    const out = new Map();
    const get = (labels) => {
      const key = labelKey(labels, 'le');
      let h = out.get(key);
      if (!h) {
        const l = Object.assign({}, labels);
        delete l.le;
        out.set(key, (h = { labels: l, buckets: [], count: null, sum: null }));
      }
      return h;
    };
    for (const x of ix.get(base + '_bucket') || []) {
      if (!('le' in x.labels)) continue;
      let le;
      try { le = parseValue(x.labels.le); } catch (e) { continue; }
      if (Number.isNaN(le)) continue;
      get(x.labels).buckets.push({ le, count: x.value });
    }
    for (const x of ix.get(base + '_count') || []) get(x.labels).count = x.value;
    for (const x of ix.get(base + '_sum') || []) get(x.labels).sum = x.value;
    for (const h of out.values()) h.buckets.sort((a, b) => a.le - b.le);
    return out;
  }

  // the increase of a counter between two scrapes; a value that went down
  // means the counter was reset (a restart): it counted its value since
  function increase(prev, cur) {
    if (cur == null || prev == null || !Number.isFinite(cur) || !Number.isFinite(prev)) return null;
    return cur >= prev ? cur - prev : cur;
  }

  // per-bucket increases of one histogram series; a reset (the count or any
  // bucket went down) counts the whole new histogram
  function histogramDelta(prev, cur) {
    if (!cur) return null;
    if (!prev) return cur.buckets.map((b) => ({ le: b.le, count: b.count }));
    const before = new Map(prev.buckets.map((b) => [b.le, b.count]));
    let reset = cur.count != null && prev.count != null && cur.count < prev.count;
    for (const b of cur.buckets) {
      if (before.has(b.le) && b.count < before.get(b.le)) reset = true;
    }
    return cur.buckets.map((b) => ({
      le: b.le, count: reset ? b.count : b.count - (before.get(b.le) || 0),
    }));
  }

  // bucket lists with the same bounds summed le by le
  function addBuckets(lists) {
    const acc = new Map();
    for (const l of lists) {
      if (!l) continue;
      for (const b of l) acc.set(b.le, (acc.get(b.le) || 0) + b.count);
    }
    return [...acc.entries()].sort((a, b) => a[0] - b[0]).map(([le, count]) => ({ le, count }));
  }

  // Prometheus' histogram_quantile (promql/quantile.go, bucketQuantile):
  // the bucket the rank falls in, linear interpolation within it (from 0
  // for the first bucket); the +Inf bucket answers the highest finite
  // bound.  NaN without observations or without a +Inf bucket.
  function histogramQuantile(q, buckets) {
    if (Number.isNaN(q)) return NaN;
    if (q < 0) return -Infinity;
    if (q > 1) return Infinity;
    const b = (buckets || []).filter((x) => !Number.isNaN(x.le)).slice().sort((x, y) => x.le - y.le);
    if (b.length < 2 || b[b.length - 1].le !== Infinity) return NaN;
    // counts must not go down bucket to bucket (a scrape racing a writer)
    for (let i = 1; i < b.length; i++) {
      if (b[i].count < b[i - 1].count) b[i] = { le: b[i].le, count: b[i - 1].count };
    }
    const observations = b[b.length - 1].count;
    if (!(observations > 0)) return NaN;
    let rank = q * observations;
    let i = 0;
    while (i < b.length - 1 && b[i].count < rank) i++;
    if (i === b.length - 1) return b[b.length - 2].le;
    if (i === 0 && b[0].le <= 0) return b[0].le;
    let start = 0;
    let count = b[i].count;
    if (i > 0) {
      start = b[i - 1].le;
      count -= b[i - 1].count;
      rank -= b[i - 1].count;
    }
    if (count <= 0) return b[i].le;
    return start + (b[i].le - start) * (rank / count);
  }

  // ------------------------------------------------------------ config --

  const here = new URL(window.location.href);
  const qp = here.searchParams;
  const num = (v, d, lo, hi) => {
    const x = Number(v);
    return v != null && v !== '' && Number.isFinite(x) ? Math.min(hi, Math.max(lo, x)) : d;
  };
  const config = {
    metrics: new URL(qp.get('metrics') || '../metrics', here).href,
    ready: new URL(qp.get('ready') || '../ready', here).href,
    interval: num(qp.get('interval'), 2000, 500, 60000),
    window: num(qp.get('window'), 300, 60, 3600),
  };
  const WINDOW_MS = config.window * 1000;
  const GAP_MS = config.interval * 2.5;     // a longer pause breaks the line

  // ------------------------------------------------------------- state --

  const history = [];
  let prevScrape = null;    // {t, ix, send, query} of the last success
  let timer = null;
  let running = true;
  let inFlight = null;

  const api = {
    config,
    history,
    get points() { return history.filter((p) => p.messagesPerSec != null).length; },
    get latest() { return history.length ? history[history.length - 1] : null; },
    readiness: { state: 'unknown', status: 0, checks: {}, pid: null, error: null, t: null },
    reconnectsInWindow: 0,
    lastUpdate: null,
    lastError: null,
    parseErrors: [],
    scrapes: 0,
    failures: 0,
    parse,
    histogramQuantile,
    compute: (prevText, curText, dtMs) => {
      const a = index(parse(prevText));
      const b = index(parse(curText));
      return makePoint(b, dtMs == null ? 2000 : dtMs, snapshot(a, 0));
    },
    refresh: () => poll(),
    stop() { running = false; clearTimeout(timer); },
    start() { if (!running) { running = true; schedule(0); } },
  };
  window.dashboard = api;

  // ------------------------------------------------------ computations --

  const finiteOrNull = (x) => (Number.isFinite(x) ? x : null);

  function makePoint(ix, t, prev) {
    const dt = prev ? (t - prev.t) / 1000 : null;
    const rate = (name, want) => {
      if (!prev || !(dt > 0)) return null;
      // per series (a reset is per series), then summed
      let total = null;
      for (const x of series(ix, name, want)) {
        const before = series(prev.ix, name, x.labels).find((y) => labelKey(y.labels) === labelKey(x.labels));
        const inc = increase(before ? before.value : null, x.value);
        if (inc != null) total = (total || 0) + inc;
      }
      return total == null ? null : total / dt;
    };
    const g = (name, want) => sum(ix, name, want);

    const conn = {
      websocket: g('chat_connections', { transport: 'websocket' }) || 0,
      sse: g('chat_connections', { transport: 'sse' }) || 0,
      poll: g('chat_connections', { transport: 'poll' }) || 0,
    };
    conn.total = conn.websocket + conn.sse + conn.poll;
    const workers = {};
    for (const x of series(ix, 'chat_worker_connections')) workers[x.labels.pid] = x.value;

    // latency: the histogram's increases since the previous scrape
    const send = histograms(ix, 'chat_send_seconds');
    const query = histograms(ix, 'chat_db_query_seconds');
    let sendP50 = null;
    let sendP99 = null;
    let sends = null;
    let dbP99 = null;
    let queries = null;
    if (prev) {
      const sb = addBuckets([...send.entries()].map(([k, h]) => histogramDelta(prev.send.get(k), h)));
      sends = sb.length ? sb[sb.length - 1].count : 0;
      sendP50 = finiteOrNull(histogramQuantile(0.5, sb));
      sendP99 = finiteOrNull(histogramQuantile(0.99, sb));
      const qb = addBuckets([...query.entries()].map(([k, h]) => histogramDelta(prev.query.get(k), h)));
      queries = qb.length ? qb[qb.length - 1].count : 0;
      dbP99 = finiteOrNull(histogramQuantile(0.99, qb));
    }

    const errorsPerSec = {};
    let errorsTotal = null;
    if (prev) {
      for (const x of series(ix, 'chat_errors_total')) {
        const code = x.labels.code || 'other';
        const r = rate('chat_errors_total', { code: x.labels.code });
        if (r == null) continue;
        errorsPerSec[code] = (errorsPerSec[code] || 0) + r;
        errorsTotal = (errorsTotal || 0) + r;
      }
    }
    const cut = rate('chat_closes_total', { code: '4008' });
    const lim = rate('chat_closes_total', { code: '4029' });

    const size = g('chat_zone_bytes', { state: 'size' });
    const free = g('chat_zone_bytes', { state: 'free' });
    const lags = series(ix, 'chat_bus_lag').map((x) => x.value).filter(Number.isFinite);

    return {
      t,
      dt,
      connections: conn,
      workers,
      messagesPerSec: rate('chat_messages_total', { result: 'stored' }),
      duplicatesPerSec: rate('chat_messages_total', { result: 'duplicate' }),
      sendErrorsPerSec: rate('chat_messages_total', { result: 'error' }),
      deliveriesPerSec: prev ? {
        durable: rate('chat_deliveries_total', { kind: 'durable' }) || 0,
        ephemeral: rate('chat_deliveries_total', { kind: 'ephemeral' }) || 0,
      } : null,
      sendP50,
      sendP99,
      sends,
      db: {
        connections: g('chat_db_connections'),
        busy: g('chat_db_busy'),
        queue: g('chat_db_queue'),
      },
      dbP99,
      queries,
      errorsPerSec: prev ? errorsPerSec : null,
      errorsTotalPerSec: errorsTotal,
      cutLimitedPerSec: cut == null && lim == null ? null : (cut || 0) + (lim || 0),
      zone: {
        size,
        free,
        usedPct: size > 0 && free != null ? Math.max(0, Math.min(100, (1 - free / size) * 100)) : null,
      },
      busLagMax: lags.length ? Math.max(...lags) : null,
      reconnects: g('chat_db_reconnects_total'),
    };
  }

  function snapshot(ix, t) {
    return { t, ix, send: histograms(ix, 'chat_send_seconds'), query: histograms(ix, 'chat_db_query_seconds') };
  }

  function trim(now) {
    while (history.length && history[0].t < now - WINDOW_MS) history.shift();
  }

  function reconnectsInWindow() {
    let n = 0;
    for (let i = 1; i < history.length; i++) {
      n += increase(history[i - 1].reconnects, history[i].reconnects) || 0;
    }
    return n;
  }

  // ------------------------------------------------------------ polling --

  async function fetchText(url) {
    const ctl = new AbortController();
    const to = setTimeout(() => ctl.abort(), Math.min(10000, Math.max(1500, config.interval * 2)));
    try {
      const r = await fetch(url, { cache: 'no-store', signal: ctl.signal, credentials: 'same-origin' });
      const text = await r.text();
      return { status: r.status, ok: r.ok, text };
    } catch (e) {
      return { status: 0, ok: false, text: '', error: e.name === 'AbortError' ? 'timed out' : 'network error' };
    } finally {
      clearTimeout(to);
    }
  }

  async function pollMetrics() {
    const r = await fetchText(config.metrics);
    const t = Date.now();
    api.scrapes++;
    if (!r.ok) {
      api.failures++;
      api.lastError = r.status ? 'HTTP ' + r.status + errorDetail(r.text) : r.error;
      return;
    }
    const parsed = parse(r.text);
    api.parseErrors = parsed.errors;
    if (!parsed.samples.length) {
      api.failures++;
      api.lastError = parsed.errors.length
        ? 'the answer does not parse (line ' + parsed.errors[0].line + ': ' + parsed.errors[0].error + ')'
        : 'the answer holds no samples';
      return;
    }
    const ix = index(parsed);
    if (!ix.has('chat_connections')) {
      api.failures++;
      api.lastError = 'no chat_connections in the answer: is this the chat module\u2019s /chat/metrics?';
      return;
    }
    const point = makePoint(ix, t, prevScrape);
    prevScrape = snapshot(ix, t);
    history.push(point);
    trim(t);
    api.reconnectsInWindow = reconnectsInWindow();
    api.lastUpdate = t;
    api.lastError = null;
  }

  function errorDetail(text) {
    try {
      const j = JSON.parse(text);
      const m = j && j.error && (j.error.message || j.error.code);
      return m ? ' (' + m + ')' : '';
    } catch (e) {
      return '';
    }
  }

  async function pollReady() {
    const r = await fetchText(config.ready);
    const out = { state: 'unknown', status: r.status, checks: {}, pid: null, error: null, t: Date.now() };
    let j = null;
    try { j = JSON.parse(r.text); } catch (e) { /* not JSON */ }
    if (!r.status) {
      out.error = r.error;
    } else if (j && typeof j === 'object' && 'ready' in j) {
      out.state = j.ready === true && r.status === 200 ? 'ready' : 'not-ready';
      out.checks = j.checks && typeof j.checks === 'object' ? j.checks : {};
      out.pid = j.pid != null ? j.pid : null;
    } else {
      // e.g. 503 "the worker is starting", or a proxy's error page
      out.state = r.status === 200 ? 'unknown' : 'not-ready';
      out.error = 'HTTP ' + r.status + errorDetail(r.text);
    }
    api.readiness = out;
  }

  async function poll() {
    if (inFlight) return inFlight;
    inFlight = (async () => {
      try {
        await Promise.all([pollMetrics(), pollReady()]);
        render();
      } finally {
        inFlight = null;
      }
    })();
    return inFlight;
  }

  function schedule(delay) {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const t0 = performance.now();
      try {
        await poll();
      } catch (e) {
        api.lastError = 'dashboard error: ' + (e && e.message);
        renderStatus();
      }
      if (running) schedule(Math.max(0, config.interval - (performance.now() - t0)));
    }, delay);
  }

  // ---------------------------------------------------------- formatting --

  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
  }

  function fmtNum(x, digits) {
    if (x == null || !Number.isFinite(x)) return '\u2014';
    const a = Math.abs(x);
    const d = digits != null ? digits : a === 0 ? 0 : a < 1 ? 2 : a < 10 ? 1 : 0;
    return x.toLocaleString('en-US', { minimumFractionDigits: 0, maximumFractionDigits: d });
  }

  function plural(n, word) {
    return fmtNum(n, 0) + ' ' + word + (n === 1 ? '' : 's');
  }

  function fmtRate(x) {
    return x == null ? '\u2014' : fmtNum(x) + '/s';
  }

  // seconds -> "0.42 ms", "12 ms", "1.2 s"
  function fmtSec(s) {
    if (s == null || !Number.isFinite(s)) return '\u2014';
    const ms = s * 1000;
    if (ms >= 1000) return fmtNum(s, s < 10 ? 2 : 1) + ' s';
    return fmtNum(ms, ms < 1 ? 2 : ms < 10 ? 1 : 0) + ' ms';
  }

  function fmtBytes(b) {
    if (b == null) return '\u2014';
    const u = ['B', 'KiB', 'MiB', 'GiB'];
    let i = 0;
    while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
    return fmtNum(b, i ? 1 : 0) + ' ' + u[i];
  }

  function fmtTime(t) {
    const d = new Date(t);
    const p = (n) => String(n).padStart(2, '0');
    return p(d.getHours()) + ':' + p(d.getMinutes()) + ':' + p(d.getSeconds());
  }

  // ------------------------------------------------------------- charts --

  const TRANSPORTS = [['websocket', 'WebSocket'], ['sse', 'SSE'], ['poll', 'Long-poll']];

  const CHARTS = [
    {
      id: 'connections',
      title: 'Connections',
      unit: 'count',
      series: () => TRANSPORTS.map(([k, label]) => ({ key: k, label, get: (p) => p.connections[k] })),
      summary: (p) => {
        const c = p.connections;
        return fmtNum(c.total, 0) + ' open: ' + fmtNum(c.websocket, 0) + ' WebSocket, ' +
          fmtNum(c.sse, 0) + ' SSE, ' + fmtNum(c.poll, 0) + ' long-poll';
      },
    },
    {
      id: 'messages',
      title: 'Messages stored per second',
      unit: 'rate',
      series: () => [{ key: 'stored', label: 'Stored', get: (p) => p.messagesPerSec }],
      summary: (p) => p.messagesPerSec == null ? 'Waiting for a second scrape'
        : fmtNum(p.messagesPerSec) + ' messages stored per second' +
          (p.duplicatesPerSec || p.sendErrorsPerSec
            ? ' (' + fmtRate(p.duplicatesPerSec) + ' duplicate, ' + fmtRate(p.sendErrorsPerSec) + ' refused)' : ''),
    },
    {
      id: 'deliveries',
      title: 'Deliveries per second',
      unit: 'rate',
      series: () => [
        { key: 'durable', label: 'Durable', get: (p) => p.deliveriesPerSec && p.deliveriesPerSec.durable },
        { key: 'ephemeral', label: 'Ephemeral', get: (p) => p.deliveriesPerSec && p.deliveriesPerSec.ephemeral },
      ],
      summary: (p) => !p.deliveriesPerSec ? 'Waiting for a second scrape'
        : fmtNum(p.deliveriesPerSec.durable) + ' durable and ' + fmtNum(p.deliveriesPerSec.ephemeral) +
          ' ephemeral events delivered per second',
    },
    {
      id: 'latency',
      title: 'Send latency',
      unit: 'seconds',
      series: () => [
        { key: 'p50', label: 'p50', get: (p) => p.sendP50 },
        { key: 'p99', label: 'p99', get: (p) => p.sendP99 },
      ],
      summary: (p) => p.sends == null ? 'Waiting for a second scrape'
        : !p.sends ? 'No send answered in the last ' + fmtNum(p.dt, 0) + ' s'
        : 'p50 ' + fmtSec(p.sendP50) + ', p99 ' + fmtSec(p.sendP99) + ' over ' + plural(p.sends, 'send') +
          ' in the last ' + fmtNum(p.dt, 0) + ' s',
    },
    {
      id: 'pool',
      title: 'PostgreSQL pool',
      unit: 'count',
      series: () => [
        { key: 'connections', label: 'Connections', get: (p) => p.db.connections },
        { key: 'busy', label: 'Busy', get: (p) => p.db.busy },
        { key: 'queue', label: 'Queued', get: (p) => p.db.queue },
      ],
      summary: (p) => plural(p.db.connections, 'connection') + ', ' + fmtNum(p.db.busy, 0) + ' busy, ' +
        plural(p.db.queue, 'statement') + ' queued',
    },
    {
      id: 'dblatency',
      title: 'Statement latency p99',
      unit: 'seconds',
      series: () => [{ key: 'p99', label: 'p99, all statements', get: (p) => p.dbP99 }],
      summary: (p) => p.queries == null ? 'Waiting for a second scrape'
        : !p.queries ? 'No statement in the last ' + fmtNum(p.dt, 0) + ' s'
        : 'p99 ' + fmtSec(p.dbP99) + ' over ' + plural(p.queries, 'statement') + ' in the last ' +
          fmtNum(p.dt, 0) + ' s',
    },
    {
      id: 'errors',
      title: 'Errors per second',
      unit: 'rate',
      // the codes seen in the window (most first, at most 5), and the
      // connections cut (4008) or rate limited (4029)
      series: () => {
        const tot = {};
        for (const p of history) {
          for (const k in p.errorsPerSec || {}) tot[k] = (tot[k] || 0) + p.errorsPerSec[k];
        }
        const codes = Object.keys(tot).filter((k) => tot[k] > 0).sort((a, b) => tot[b] - tot[a]);
        const shown = codes.slice(0, codes.length > 5 ? 4 : 5);
        const rest = codes.slice(shown.length);
        const s = shown.map((k) => ({ key: 'code-' + k, label: k, get: (p) => p.errorsPerSec ? p.errorsPerSec[k] || 0 : null }));
        if (rest.length) {
          s.push({ key: 'other-codes', label: 'other codes',
                   get: (p) => p.errorsPerSec ? rest.reduce((a, k) => a + (p.errorsPerSec[k] || 0), 0) : null });
        }
        s.push({ key: 'cut', label: 'cut/limited (4008, 4029)', get: (p) => p.cutLimitedPerSec });
        return s;
      },
      summary: (p) => {
        if (p.errorsPerSec == null) return 'Waiting for a second scrape';
        const codes = Object.keys(p.errorsPerSec).filter((k) => p.errorsPerSec[k] > 0)
          .sort((a, b) => p.errorsPerSec[b] - p.errorsPerSec[a]);
        return fmtNum(p.errorsTotalPerSec || 0) + ' errors per second' +
          (codes.length ? ' (' + codes.slice(0, 3).map((k) => k + ' ' + fmtRate(p.errorsPerSec[k])).join(', ') + ')' : '') +
          '; ' + fmtNum(p.cutLimitedPerSec || 0) + ' connections cut or limited per second';
      },
    },
  ];

  const DASHES = ['', '6 3', '2 3', '8 3 2 3'];

  function niceStep(raw) {
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * p;
  }

  function fmtAxis(v, unit) {
    if (unit === 'seconds') {
      const ms = v * 1000;
      if (ms >= 1000) return fmtNum(v, 1) + 's';
      return fmtNum(ms, ms < 1 && ms > 0 ? 2 : ms < 10 ? 1 : 0) + 'ms';
    }
    if (v >= 10000) return fmtNum(v / 1000, 0) + 'k';
    if (v >= 1000) return fmtNum(v / 1000, 1) + 'k';
    return fmtNum(v, v > 0 && v < 1 ? 2 : v < 10 ? 1 : 0);
  }

  // one chart as an SVG string: lines of `series` over [t1 - window, t1]
  function svgChart(chart, series, width, t1) {
    const H = 160;
    const m = { l: 46, r: 10, t: 10, b: 22 };
    const W = Math.max(200, Math.round(width));
    const iw = W - m.l - m.r;
    const ih = H - m.t - m.b;
    // the x axis spans the data held (a minute at least, the window at most)
    const first = history.length ? history[0].t : t1;
    const span = Math.min(WINDOW_MS, Math.max(60000, t1 - first));
    const t0 = t1 - span;

    let max = 0;
    for (const s of series) {
      for (const p of history) {
        const v = s.get(p);
        if (v != null && Number.isFinite(v) && v > max) max = v;
      }
    }
    const floor = chart.unit === 'seconds' ? 0.001 : 1;
    const step = chart.unit === 'count' ? Math.max(1, niceStep(Math.max(max, floor) / 4))
      : niceStep(Math.max(max, floor) / 4);
    const ymax = step * Math.max(1, Math.ceil(Math.max(max, floor) / step - 1e-9));
    const x = (t) => m.l + ((t - t0) / span) * iw;
    const y = (v) => m.t + ih - (v / ymax) * ih;

    let out = '';
    // grid and y labels
    for (let v = 0; v <= ymax + step / 2; v += step) {
      const yy = y(v).toFixed(1);
      out += '<line class="gridline" x1="' + m.l + '" x2="' + (W - m.r) + '" y1="' + yy + '" y2="' + yy + '"/>';
      out += '<text class="axis" x="' + (m.l - 6) + '" y="' + yy + '" dy="0.32em" text-anchor="end">' +
        esc(fmtAxis(v, chart.unit)) + '</text>';
    }
    // x labels: "now" and back from it, as many as fit
    const fit = iw < 260 ? 3 : iw < 560 ? 5 : 8;
    const stepS = [10, 15, 20, 30, 60, 120, 300, 600, 900, 1800].find((v) => span / 1000 / v <= fit) || 3600;
    for (let k = 0; k * stepS * 1000 <= span + 1; k++) {
      const d = k * stepS;
      const xx = x(t1 - d * 1000);
      const label = d === 0 ? 'now' : '\u2212' + (d < 60 ? d + 's' : Math.floor(d / 60) + 'm' + (d % 60 ? d % 60 + 's' : ''));
      const anchor = d === 0 ? 'end' : xx - m.l < 14 ? 'start' : 'middle';
      out += '<line class="tick" x1="' + xx.toFixed(1) + '" x2="' + xx.toFixed(1) + '" y1="' + (m.t + ih) +
        '" y2="' + (m.t + ih + 4) + '"/>';
      out += '<text class="axis" x="' + xx.toFixed(1) + '" y="' + (H - 4) + '" text-anchor="' + anchor + '">' +
        label + '</text>';
    }
    // lines (broken where a value is missing or scrapes were missed)
    series.forEach((s, i) => {
      let d = '';
      let prevT = null;
      let last = null;
      let n = 0;
      for (const p of history) {
        const v = s.get(p);
        if (v == null || !Number.isFinite(v)) { prevT = null; continue; }
        const cmd = prevT == null || p.t - prevT > GAP_MS ? 'M' : 'L';
        d += cmd + x(p.t).toFixed(1) + ' ' + y(v).toFixed(1);
        prevT = p.t;
        last = [p.t, v];
        n++;
      }
      const cls = 'line s' + (i % 7);
      const dash = DASHES[i % DASHES.length];
      if (d) {
        out += '<path class="' + cls + '" d="' + d + '"' + (dash ? ' stroke-dasharray="' + dash + '"' : '') + '/>';
      }
      if (last && n) {
        out += '<circle class="dot s' + (i % 7) + '" cx="' + x(last[0]).toFixed(1) + '" cy="' + y(last[1]).toFixed(1) + '" r="2.5"/>';
      }
    });
    return { W, H, body: out };
  }

  function legendSwatch(i) {
    const dash = DASHES[i % DASHES.length];
    return '<svg class="swatch" width="22" height="10" aria-hidden="true" focusable="false">' +
      '<line class="line s' + (i % 7) + '" x1="1" x2="21" y1="5" y2="5"' +
      (dash ? ' stroke-dasharray="' + dash + '"' : '') + '/></svg>';
  }

  function seriesValue(chart, v) {
    if (v == null) return '\u2014';
    return chart.unit === 'seconds' ? fmtSec(v) : chart.unit === 'rate' ? fmtRate(v) : fmtNum(v, 0);
  }

  const cards = new Map();

  function buildCards() {
    const grid = document.getElementById('charts');
    for (const c of CHARTS) {
      const el = document.createElement('article');
      el.className = 'card';
      el.id = 'chart-' + c.id;
      el.dataset.chart = c.id;
      el.setAttribute('aria-labelledby', 'chart-' + c.id + '-h');
      el.innerHTML =
        '<h3 class="card-title" id="chart-' + c.id + '-h">' + esc(c.title) + '</h3>' +
        '<p class="summary" id="chart-' + c.id + '-s">Waiting for data</p>' +
        '<div class="plot"></div>' +
        '<ul class="legend" aria-label="' + esc(c.title) + ': latest values"></ul>';
      grid.appendChild(el);
      cards.set(c.id, {
        chart: c, el,
        summary: el.querySelector('.summary'),
        plot: el.querySelector('.plot'),
        legend: el.querySelector('.legend'),
      });
    }
  }

  function renderCharts() {
    const p = api.latest;
    const t1 = p ? p.t : Date.now();
    for (const { chart, el, summary, plot, legend } of cards.values()) {
      const series = chart.series();
      const text = p ? chart.summary(p) : 'Waiting for data';
      summary.textContent = text + '.';
      const n = p ? history.filter((q) => series.some((s) => s.get(q) != null)).length : 0;
      el.dataset.points = String(n);
      const { W, H, body } = svgChart(chart, series, plot.clientWidth || 320, t1);
      const label = chart.title + ': ' + text + '. Line chart of the last ' + Math.round(WINDOW_MS / 60000) + ' minutes at most.';
      plot.innerHTML = '<svg viewBox="0 0 ' + W + ' ' + H + '" width="100%" height="' + H +
        '" preserveAspectRatio="none" role="img" aria-label="' + esc(label) + '"><title>' + esc(label) + '</title>' +
        body + '</svg>';
      legend.innerHTML = series.map((s, i) => '<li data-series="' + esc(s.key) + '">' + legendSwatch(i) +
        '<span class="lname">' + esc(s.label) + '</span> <span class="lval">' +
        esc(p ? seriesValue(chart, s.get(p)) : '\u2014') + '</span></li>').join('');
    }
  }

  // ------------------------------------------------------------- tiles --

  const CHECK_NAMES = { store: 'Store (PostgreSQL)', schema: 'Schema', bus: 'Event bus', zone: 'Shared zone' };

  function checkDetail(name, c) {
    if (name === 'store') {
      return c.ok ? fmtNum(c.connections, 0) + ' connections'
        : c.retry_after_ms ? 'retrying in ' + fmtNum(c.retry_after_ms / 1000, 1) + ' s' : '';
    }
    if (name === 'schema') return c.version != null ? 'version ' + c.version : '';
    if (name === 'bus') return c.lag != null ? 'lag ' + fmtNum(c.lag, 0) : '';
    if (name === 'zone') return c.size ? fmtBytes(c.free) + ' free' : '';
    return '';
  }

  function setTile(id, value, note, level) {
    const tile = document.getElementById('tile-' + id);
    document.getElementById(id + '-value').textContent = value;
    document.getElementById(id + '-note').textContent = note || '';
    tile.dataset.level = level || 'ok';
  }

  function renderTiles() {
    const r = api.readiness;
    const tile = document.getElementById('tile-ready');
    tile.dataset.state = r.state;
    tile.dataset.level = r.state === 'ready' ? 'ok' : r.state === 'not-ready' ? 'bad' : 'warn';
    document.getElementById('ready-value').textContent =
      r.state === 'ready' ? '\u2713 Ready' : r.state === 'not-ready' ? '\u2717 Not ready' : r.error ? '? Unreachable' : '? Unknown';
    const ul = document.getElementById('ready-checks');
    ul.innerHTML = Object.keys(r.checks).map((k) => {
      const c = r.checks[k] || {};
      const okv = c.ok === true;
      const detail = checkDetail(k, c);
      return '<li data-check="' + esc(k) + '" data-ok="' + okv + '"><span class="mark" aria-hidden="true">' +
        (okv ? '\u2713' : '\u2717') + '</span> ' + esc(CHECK_NAMES[k] || k) + ': <strong>' +
        (okv ? 'ok' : 'failed') + '</strong>' + (detail ? ' <span class="muted">(' + esc(detail) + ')</span>' : '') + '</li>';
    }).join('');
    document.getElementById('ready-note').textContent = r.error
      ? (r.error + ' from ' + config.ready)
      : r.t ? 'HTTP ' + r.status + (r.pid ? ' from worker ' + r.pid : '') + ' at ' + fmtTime(r.t) : '';

    const p = api.latest;
    if (!p) return;
    const c = p.connections;
    const workers = Object.keys(p.workers);
    setTile('connections', fmtNum(c.total, 0),
      fmtNum(c.websocket, 0) + ' WS \u00b7 ' + fmtNum(c.sse, 0) + ' SSE \u00b7 ' + fmtNum(c.poll, 0) + ' poll' +
      (workers.length ? ' on ' + workers.length + ' worker' + (workers.length > 1 ? 's' : '') : ''));
    const z = p.zone;
    setTile('zone', z.usedPct == null ? '\u2014' : fmtNum(z.usedPct, 1) + ' %',
      z.size ? fmtBytes(z.size - z.free) + ' of ' + fmtBytes(z.size) : '',
      z.usedPct == null ? 'warn' : z.usedPct >= 95 ? 'bad' : z.usedPct >= 80 ? 'warn' : 'ok');
    setTile('lag', p.busLagMax == null ? '\u2014' : fmtNum(p.busLagMax, 0),
      p.busLagMax == null ? '' : 'undelivered events, worst worker',
      p.busLagMax == null ? 'warn' : p.busLagMax > 1000 ? 'bad' : p.busLagMax > 0 ? 'warn' : 'ok');
    setTile('reconnects', fmtNum(p.reconnects, 0),
      '+' + fmtNum(api.reconnectsInWindow, 0) + ' in the last ' + Math.round(WINDOW_MS / 60000) + ' min',
      api.reconnectsInWindow > 0 ? 'warn' : 'ok');
  }

  // ------------------------------------------------- status and banner --

  function renderStatus() {
    const tm = document.getElementById('updated-time');
    if (api.lastUpdate) {
      tm.textContent = fmtTime(api.lastUpdate);
      tm.setAttribute('datetime', new Date(api.lastUpdate).toISOString());
    }
    document.getElementById('updated').classList.toggle('stale', !!api.lastError);
    document.getElementById('source').textContent = 'every ' + fmtNum(config.interval / 1000, 1) + ' s from ' + config.metrics;
    const banner = document.getElementById('banner');
    const msgs = [];
    let level = 'error';
    if (api.lastError) {
      msgs.push('Scrape failed: ' + api.lastError + ' (' + config.metrics + '). ' +
        (api.lastUpdate ? 'Showing data up to ' + fmtTime(api.lastUpdate) + '; ' : 'No data yet; ') +
        'retrying every ' + fmtNum(config.interval / 1000, 1) + ' s.');
    } else if (api.parseErrors.length) {
      level = 'warn';
      const e = api.parseErrors[0];
      msgs.push(api.parseErrors.length + ' line' + (api.parseErrors.length > 1 ? 's' : '') +
        ' of the metrics did not parse and were skipped (line ' + e.line + ': ' + e.error + ').');
    }
    if (api.readiness.error && api.readiness.status === 0) {
      msgs.push('Readiness check failed: ' + api.readiness.error + ' (' + config.ready + ').');
    }
    banner.hidden = !msgs.length;
    banner.dataset.level = level;
    banner.textContent = msgs.join(' ');
    document.documentElement.dataset.state = api.lastError ? 'error' : 'ok';
  }

  function render() {
    renderStatus();
    renderTiles();
    renderCharts();
  }

  // -------------------------------------------------------------- start --

  function init() {
    document.getElementById('charts-h').textContent = 'Last ' + fmtNum(config.window / 60, 1) + ' minutes';
    buildCards();
    renderStatus();
    renderCharts();
    let pending = false;
    const again = () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => { pending = false; renderCharts(); });
    };
    if (window.ResizeObserver) new ResizeObserver(again).observe(document.getElementById('charts'));
    else window.addEventListener('resize', again);
    schedule(0);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();

// Drives the health dashboard (dashboard/: index.html, dashboard.js) in
// Debian's Chromium for t/122-dashboard.t, playwright-core from
// client/node_modules.  Reads what the page computed from
// window.dashboard (numbers, not pixels), and what it shows (tiles, chart
// summaries, aria-labels, the layout's columns).  Prints one JSON line at
// the end with what it saw; the test judges it.
//
// Usage: node dashboard_browser.js <config.json>
//   config: { base (http://127.0.0.1:port), shots (a directory) }
// It asks the test to act by printing a line and waiting for one on stdin:
//   "@@pgstop"   stop the load and PostgreSQL
//   "@@pgstart"  start PostgreSQL again
//
// Steps (each runs even when one before it failed; out.steps says which):
//   1. desktop (1280x800) and phone (390x844) pages open on
//      /chat/dashboard/ while the test's load runs;
//   2. meanwhile: the parser and histogram_quantile on known inputs (in the
//      page), and a page polling a URL that is not the metrics (the banner);
//   3. both pages hold >= 5 points: numbers, tiles, layout, screenshots;
//   4. PostgreSQL stopped: the readiness tile turns "not ready" with the
//      store check failed (time measured), screenshots; started again: it
//      turns ready again.
'use strict';
const { asker, stepper } = require('./browser_util');
const fs = require('fs');
const path = require('path');
const { chromium } = require(path.join(__dirname, '..', '..', 'client',
                                       'node_modules', 'playwright-core'));

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const URL0 = `${cfg.base}/chat/dashboard/`;
const DESK = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };

const out = { steps: [], shots: [], errors: [], timing: {} };
const ask = asker();

const step = stepper(out.steps);

async function open(browser, who, viewport, query) {
  const ctx = await browser.newContext({ viewport });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => out.errors.push(`${who}: ${e.message}`));
  page.on('console', (m) => {
    // fetch failures are logged by the browser itself (a 404 on purpose
    // below); only the page's own errors count
    if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) {
      out.errors.push(`${who} console: ${m.text()}`);
    }
  });
  const resp = await page.goto(URL0 + (query || ''));
  return { ctx, page, who, status: resp ? resp.status() : null, type: resp ? resp.headers()['content-type'] : null };
}

async function shot(page, name) {
  const vp = page.viewportSize();
  const file = path.join(cfg.shots, `${String(out.shots.length + 1).padStart(2, '0')}-dashboard-${name}-${vp.width}x${vp.height}.png`);
  await page.screenshot({ path: file, fullPage: true });
  out.shots.push(file);
}

// what a page shows and computed, in one look
function look(page) {
  return page.evaluate(() => {
    const d = window.dashboard;
    const txt = (sel) => { const e = document.querySelector(sel); return e ? e.textContent.trim() : null; };
    const cards = [...document.querySelectorAll('#charts .card')];
    const r = (e) => e.getBoundingClientRect();
    return {
      points: d.points,
      historyLength: d.history.length,
      latest: d.latest,
      recent: d.history.slice(-4),
      readiness: d.readiness,
      reconnectsInWindow: d.reconnectsInWindow,
      lastUpdate: d.lastUpdate,
      lastError: d.lastError,
      parseErrors: d.parseErrors.length,
      scrapes: d.scrapes,
      failures: d.failures,
      config: d.config,
      tiles: {
        ready: { state: document.getElementById('tile-ready').dataset.state, value: txt('#ready-value'),
                 checks: [...document.querySelectorAll('#ready-checks li')]
                   .map((li) => ({ name: li.dataset.check, ok: li.dataset.ok, text: li.textContent.trim() })) },
        connections: txt('#connections-value'),
        zone: txt('#zone-value'),
        lag: txt('#lag-value'),
        reconnects: txt('#reconnects-value'),
      },
      updated: txt('#updated-time'),
      bannerHidden: document.getElementById('banner').hidden,
      banner: txt('#banner'),
      h1: txt('h1'),
      charts: cards.map((c) => {
        const svg = c.querySelector('svg[role="img"]');
        return {
          id: c.dataset.chart,
          points: Number(c.dataset.points),
          heading: (c.querySelector('h2, h3') || {}).textContent || null,
          summary: (c.querySelector('.summary') || {}).textContent || null,
          aria: svg ? svg.getAttribute('aria-label') : null,
          paths: c.querySelectorAll('svg path').length,
          left: Math.round(r(c).left),
          width: Math.round(r(c).width),
        };
      }),
      columns: new Set(cards.map((c) => Math.round(r(c).left))).size,
      scrollWidth: document.documentElement.scrollWidth,
      clientWidth: document.documentElement.clientWidth,
    };
  });
}

// the parser and the quantile on known inputs, in the page
function unit(page) {
  return page.evaluate(() => {
    const d = window.dashboard;
    const text = [
      '# a free comment, not HELP or TYPE',
      '# HELP m_total A help with a \\\\ backslash\\nand a newline',
      '# TYPE m_total counter',
      'm_total{path="/a\\"b\\\\c\\nd",code="200"} 3',
      'm_total{code="500" , path="x",} 1.5e3 1700000000000',
      '   # TYPE g gauge',
      'g NaN',
      'g2\t+Inf',
      'g3 -Inf',
      'g4{a="{},= \\" #"} -0.25',
      '',
      'h_bucket{le="0.1"} 1',
      'h_bucket{le="+Inf"} 2',
      'bad{x="y} 1',
      'bad2 12abc',
      'bad3{1x="y"} 1',
      'bad4{x="\\q"} 1',
      'crlf 7\r',
    ].join('\n');
    const p = d.parse(text);
    const s = (n) => p.samples.filter((x) => x.name === n);
    const q = d.histogramQuantile;
    const B = (arr) => arr.map(([le, count]) => ({ le, count }));
    return {
      families: [...p.families.values()].map((f) => [f.name, f.type, f.help]),
      m: s('m_total').map((x) => [x.labels, x.value, x.timestamp]),
      g: Number.isNaN(s('g')[0] && s('g')[0].value),
      g2: s('g2')[0] && s('g2')[0].value === Infinity,
      g3: s('g3')[0] && s('g3')[0].value === -Infinity,
      g4: s('g4').map((x) => [x.labels, x.value]),
      hle: s('h_bucket').map((x) => x.labels.le),
      crlf: s('crlf').map((x) => x.value),
      errors: p.errors.map((e) => e.line),
      names: p.samples.map((x) => x.name),
      // two scrapes 2 s apart across a restart: counters that went down
      // count their new value; a histogram whose count went down counts
      // its new buckets; a statement new in the second counts whole
      reset: (() => {
        const prev = [
          'chat_connections{transport="websocket"} 3',
          'chat_messages_total{result="stored"} 100',
          'chat_errors_total{code="internal"} 5',
          'chat_closes_total{code="4008"} 2',
          'chat_closes_total{code="4029"} 0',
          'chat_send_seconds_bucket{le="0.001"} 50',
          'chat_send_seconds_bucket{le="0.002"} 90',
          'chat_send_seconds_bucket{le="+Inf"} 100',
          'chat_send_seconds_sum 0.1',
          'chat_send_seconds_count 100',
          'chat_db_query_seconds_bucket{statement="a",le="0.001"} 10',
          'chat_db_query_seconds_bucket{statement="a",le="0.010"} 10',
          'chat_db_query_seconds_bucket{statement="a",le="+Inf"} 10',
          'chat_db_query_seconds_count{statement="a"} 10',
        ].join('\n');
        const cur = [
          'chat_connections{transport="websocket"} 1',
          'chat_messages_total{result="stored"} 30',
          'chat_errors_total{code="internal"} 9',
          'chat_closes_total{code="4008"} 1',
          'chat_closes_total{code="4029"} 1',
          'chat_send_seconds_bucket{le="0.001"} 2',
          'chat_send_seconds_bucket{le="0.002"} 4',
          'chat_send_seconds_bucket{le="+Inf"} 4',
          'chat_send_seconds_sum 0.006',
          'chat_send_seconds_count 4',
          'chat_db_query_seconds_bucket{statement="a",le="0.001"} 10',
          'chat_db_query_seconds_bucket{statement="a",le="0.010"} 12',
          'chat_db_query_seconds_bucket{statement="a",le="+Inf"} 12',
          'chat_db_query_seconds_count{statement="a"} 12',
          'chat_db_query_seconds_bucket{statement="b",le="0.001"} 0',
          'chat_db_query_seconds_bucket{statement="b",le="0.010"} 2',
          'chat_db_query_seconds_bucket{statement="b",le="+Inf"} 2',
          'chat_db_query_seconds_count{statement="b"} 2',
        ].join('\n');
        const p = d.compute(prev, cur, 2000);
        const r9 = (x) => (x == null ? x : Math.round(x * 1e9) / 1e9);
        return [p.connections.websocket, p.messagesPerSec, p.errorsPerSec.internal, p.cutLimitedPerSec,
                p.sends, r9(p.sendP50), r9(p.sendP99), p.queries, r9(p.dbP99)];
      })(),
      // Prometheus' histogram_quantile on cumulative buckets
      q: {
        // 10 in (0,1], 10 in (1,2]: median at the first bucket's top, p75 mid-second
        p50: q(0.5, B([[1, 10], [2, 20], [Infinity, 20]])),
        p75: q(0.75, B([[1, 10], [2, 20], [Infinity, 20]])),
        // interpolated from 0 in the first bucket
        first: q(0.5, B([[0.004, 4], [0.01, 4], [Infinity, 4]])),
        // the rank in +Inf: the highest finite bound
        inf: q(0.99, B([[1, 1], [2, 2], [Infinity, 10]])),
        none: Number.isNaN(q(0.5, B([[1, 0], [Infinity, 0]]))),
        noInf: Number.isNaN(q(0.5, B([[1, 3], [2, 4]]))),
        unsorted: q(0.5, B([[Infinity, 4], [0.002, 4], [0.001, 2]])),
      },
    };
  });
}

async function main() {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox'] });
  let desk;
  let phone;
  try {
    await step('open the dashboard (desktop and phone) under load', async () => {
      const t0 = Date.now();
      [desk, phone] = await Promise.all([open(browser, 'desktop', DESK), open(browser, 'phone', PHONE)]);
      out.page = { status: desk.status, type: desk.type };
      out.assets = await desk.page.evaluate(async () => {
        const r = {};
        for (const f of ['dashboard.js', 'dashboard.css']) {
          const x = await fetch(f);
          r[f] = [x.status, x.headers.get('content-type')];
        }
        return r;
      });
      out.timing.openMs = Date.now() - t0;
    });

    await step('parser and histogram_quantile', async () => {
      await desk.page.waitForFunction(() => window.dashboard && window.dashboard.parse, null, { timeout: 10000 });
      out.unit = await unit(desk.page);
    });

    await step('a scrape that fails: the banner', async () => {
      const bad = await open(browser, 'bad', DESK, '?metrics=../no-such-metrics&interval=1000');
      await bad.page.waitForFunction(() => !document.getElementById('banner').hidden, null, { timeout: 10000 });
      out.badScrape = await look(bad.page);
      await shot(bad.page, 'scrape-failed');
      await bad.ctx.close();
    });

    await step('five points under load', async () => {
      const t0 = Date.now();
      for (const x of [desk, phone]) {
        await x.page.waitForFunction(() => window.dashboard.points >= 5 &&
          document.querySelector('#tile-ready').dataset.state !== 'unknown', null, { timeout: 40000 });
      }
      out.timing.fivePointsMs = Date.now() - t0;
      out.timing.sinceOpenMs = out.timing.fivePointsMs + (out.timing.openMs || 0);
      out.loaded = { desktop: await look(desk.page), phone: await look(phone.page) };
      await shot(desk.page, 'under-load');
      await shot(phone.page, 'under-load');
      // the dark scheme (prefers-color-scheme), for a look
      await phone.page.emulateMedia({ colorScheme: 'dark' });
      await shot(phone.page, 'under-load-dark');
      await phone.page.emulateMedia({ colorScheme: 'light' });
    });

    await step('PostgreSQL stopped: not ready', async () => {
      await ask('pgstop');
      const t0 = Date.now();
      const notReady = () => {
        const t = document.getElementById('tile-ready');
        const s = document.querySelector('#ready-checks li[data-check="store"]');
        return t.dataset.state === 'not-ready' && s && s.dataset.ok === 'false';
      };
      await Promise.all([desk, phone].map((x) => x.page.waitForFunction(notReady, null, { timeout: 20000 })));
      out.timing.notReadyMs = Date.now() - t0;
      out.stopped = { desktop: await look(desk.page), phone: await look(phone.page) };
      await shot(desk.page, 'pg-stopped');
      await shot(phone.page, 'pg-stopped');
    });

    await step('PostgreSQL back: ready again', async () => {
      await ask('pgstart');
      const t0 = Date.now();
      await Promise.all([desk, phone].map((x) => x.page.waitForFunction(
        () => window.dashboard.readiness.state === 'ready', null, { timeout: 30000 })));
      out.timing.readyAgainMs = Date.now() - t0;
      out.back = await look(desk.page);
    });
    out.ok = out.steps.every((s) => s.ok);
  } catch (e) {
    out.ok = false;
    out.error = String(e.message || e);
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
  ask.close();
}

main();

// Drives the demo page in Debian's Chromium: two users chat from two
// windows.  Prints one JSON line with what each page showed and, per page
// load, every WebSocket text frame the page received from the server and
// sent to it -- recorded by an init script that wraps window.WebSocket
// before the page's own code runs, so the test sees what the server sent,
// not what the page's de-duplication left of it.
//
// The script: alice and bob come online; alice sends m1, bob m2; bob
// reloads (the new page resumes with the cursor the old one stored);
// alice sends m3 (live on bob's new connection); bob leaves the page
// (about:blank), alice sends m4 meanwhile, bob comes back (m4 must come
// in the catch-up from bob's cursor); alice sends m5 (live again).
'use strict';
const path = require('path');
const { chromium } = require(path.join(__dirname, '..', '..', 'client',
                                       'node_modules', 'playwright-core'));

const base = process.argv[2];
const T = 15000;

// Runs in the page before any of its scripts, on every load.
function recordFrames() {
  const Native = window.WebSocket;
  window.__frames = [];          // {conn, dir: 'in'|'out', data}
  let next = 0;
  class Recorded extends Native {
    constructor(...args) {
      super(...args);
      const conn = next++;
      Object.defineProperty(this, '__conn', { value: conn });
      this.addEventListener('message', (ev) => {
        window.__frames.push({ conn, dir: 'in',
                               data: typeof ev.data === 'string' ? ev.data : '<binary>' });
      });
    }
    send(data) {
      window.__frames.push({ conn: this.__conn, dir: 'out', data: String(data) });
      return super.send(data);
    }
  }
  window.WebSocket = Recorded;
}

// Waits until the page's connection(s) received the message.new event of
// the message whose body is `body`.
function gotEvent(page, body) {
  return page.waitForFunction((b) => (window.__frames || []).some((f) => {
    if (f.dir !== 'in') return false;
    try {
      const m = JSON.parse(f.data);
      return m.type === 'event' && m.event && m.event.kind === 'message.new'
             && m.event.message && m.event.message.body === b;
    } catch (e) { return false; }
  }), body, { timeout: T });
}

function frames(page) {
  return page.evaluate(() => window.__frames || []);
}

async function online(page) {
  await page.waitForSelector('#status:text("online")', { timeout: T });
}

async function say(page, body) {
  await page.fill('#text', body);
  await page.press('#text', 'Enter');
}

async function main() {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update',
           '--disable-sync'],
  });
  const out = { loads: { alice: [], bob: [] }, bodies: [] };
  const stamp = Date.now();
  const text = ['', 'hello bob', 'hi alice', 'after the reload', 'while you were away',
                'welcome back'];
  const m = (i) => `m${i} ${text[i]} ${stamp}`;
  try {
    const a = await browser.newPage();
    const b = await browser.newPage();
    await a.addInitScript(recordFrames);
    await b.addInitScript(recordFrames);
    await a.goto(`${base}/demo/?user=alice`);
    await b.goto(`${base}/demo/?user=bob`);
    await online(a);
    await online(b);

    out.bodies = [1, 2, 3, 4, 5].map(m);

    await say(a, m(1));
    await b.waitForSelector(`.msg:has-text("${m(1)}")`, { timeout: T });

    await b.fill('#text', m(2));
    await b.click('button');
    await a.waitForSelector(`.msg:has-text("${m(2)}")`, { timeout: T });

    // bob's page has the events of both (and stored the cursor of m2)
    await gotEvent(b, m(1));
    await gotEvent(b, m(2));
    out.loads.bob.push(await frames(b));

    // bob reloads: history comes back over REST, the stream resumes
    await b.reload();
    await online(b);
    await b.waitForSelector(`.msg:has-text("${m(2)}")`, { timeout: T });

    // live after the reload
    await say(a, m(3));
    await gotEvent(b, m(3));
    await b.waitForSelector(`.msg:has-text("${m(3)}")`, { timeout: T });
    out.loads.bob.push(await frames(b));

    // bob away while alice writes; back: caught up from his cursor
    await b.goto('about:blank');
    await say(a, m(4));
    await gotEvent(a, m(4));
    await b.goto(`${base}/demo/?user=bob`);
    await online(b);
    await b.waitForSelector(`.msg:has-text("${m(4)}")`, { timeout: T });
    await gotEvent(b, m(4));

    await say(a, m(5));
    await gotEvent(b, m(5));
    await gotEvent(a, m(5));
    await b.waitForSelector(`.msg:has-text("${m(5)}")`, { timeout: T });
    // a moment for anything the server would (wrongly) send on top
    await new Promise((r) => setTimeout(r, 500));
    out.loads.bob.push(await frames(b));
    out.loads.alice.push(await frames(a));

    out.alice = await a.locator('.msg').allInnerTexts();
    out.bob = await b.locator('.msg').allInnerTexts();
    out.ok = true;
  } catch (e) {
    out.ok = false;
    out.error = e.message;
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
}

main();

// Drives the demo web app (client/demo/) in Debian's Chromium for
// t/060-demo-browser.t: several people in separate browser contexts (each
// its own storage, so its own connection), desktop (1280x800) and phone
// (390x844) widths.  Prints one JSON line at the end with what it saw;
// the test checks it and the database.
//
// Usage: node demo_browser.js <config.json>
//   config: { base, convs: {gig_id: id}, big: id, shots: dir, png: base64,
//             stamp, evil: {conv, ids, tokens, first} }
//   (evil: a group of alice and two user ids that are markup, the tokens
//   of those two, the body of the message the first one wrote)
// The driver asks the test to stop and start nginx by printing "@@stop" /
// "@@start" and waiting for a line on stdin (the connection banner is
// shown while the server is really gone).
//
// Every step runs even when one before it failed (each wait has a short
// timeout), so one run reports every broken thing; out.steps says which.
'use strict';
const { asker, stepper, watchTicks } = require('./browser_util');
const fs = require('fs');
const path = require('path');
const { chromium } = require(path.join(__dirname, '..', '..', 'client',
                                       'node_modules', 'playwright-core'));

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const base = cfg.base;
const T = 10000;
const DESK = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };
const XSS_IMG = '<img src=x onerror="window.__xss=1">';
const XSS_SCRIPT = '<script>window.__xss=1</script>';

const out = { steps: [], shots: [], errors: [], timing: {} };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const ask = asker();

const step = stepper(out.steps);

// Notifications are recorded, not shown: the page sees permission granted.
function fakeNotifications() {
  window.__notes = [];
  class FakeNotification {
    constructor(title, opts) { window.__notes.push({ title, body: opts && opts.body }); }
    close() {}
    static get permission() { return 'granted'; }
    static requestPermission() { return Promise.resolve('granted'); }
  }
  window.Notification = FakeNotification;
}

// token: sign in with this token instead of /demo/token's (which signs
// only plain demo names): the test signs it, for a user id /demo/token
// would refuse
async function open(browser, who, user, query, viewport, token) {
  const ctx = await browser.newContext({ viewport });
  await ctx.addInitScript(fakeNotifications);
  if (token) {
    await ctx.route((url) => url.pathname === '/demo/token', (route) => route.fulfill({
      status: 200, contentType: 'application/json', headers: { 'Cache-Control': 'no-store' },
      // (kind: app.py always sends one; without it the page would show
      // "null" after the name, client/demo/app.js startChat)
      body: JSON.stringify({ token, user, expires_in: 3600, kind: 'guest' }),
    }));
  }
  const page = await ctx.newPage();
  page.on('pageerror', (e) => out.errors.push(`${who}: ${e.message}`));
  page.on('console', (m) => {
    // network failures are logged by the browser itself (nginx is stopped
    // on purpose below); only the page's own errors count
    if (m.type() === 'error' && !/Failed to load resource|WebSocket connection to .* failed/.test(m.text())) {
      out.errors.push(`${who} console: ${m.text()}`);
    }
  });
  page.on('dialog', (d) => d.accept());      // confirm() of delete / block
  await page.goto(`${base}/demo/?user=${user}${query || ''}`);
  if (user) await page.evaluate(() => window.demo.ready);
  return { ctx, page, who };
}

async function shot(page, name) {
  const vp = page.viewportSize();
  const file = path.join(cfg.shots, `${String(out.shots.length + 1).padStart(2, '0')}-${name}-${vp.width}x${vp.height}.png`);
  await page.screenshot({ path: file });
  out.shots.push(file);
}

// the message rows in the DOM (the windowed list shows a part of them)
function rows(page) {
  return page.evaluate(() => [...document.querySelectorAll('#rows > .row')].map((r) => ({
    key: r.dataset.key, id: r.dataset.id, seq: r.dataset.seq, sender: r.dataset.sender,
    cls: r.className, body: (r.querySelector('.body') || {}).textContent || '',
    tick: r.querySelector('.tick') ? r.querySelector('.tick').dataset.state : null,
    text: r.innerText,
  })));
}

function waitRow(page, text, timeout = T) {
  return page.waitForFunction((t) => [...document.querySelectorAll('#rows > .row .body')]
    .some((b) => b.textContent.includes(t)), text, { timeout, polling: 10 });
}

function waitTick(page, text, states, timeout = T) {
  return page.waitForFunction(([t, s]) => [...document.querySelectorAll('#rows > .row')].some((r) => {
    const b = r.querySelector('.body');
    const k = r.querySelector('.tick');
    return b && b.textContent.includes(t) && k && s.includes(k.dataset.state);
  }), [text, states], { timeout, polling: 10 });
}

// the message id of the message whose body contains `text` (from the client)
function idOf(page, text) {
  return page.evaluate((t) => {
    const c = window.demo.client;
    for (const conv of c.conversations()) {
      const m = c.messages(conv.id).find((x) => x.body && x.body.includes(t) && x.id);
      if (m) return m.id;
    }
    return null;
  }, text);
}


async function say(page, text) {
  await page.fill('#composer-input', text);
  await page.press('#composer-input', 'Enter');
}

async function countBody(page, text) {
  return (await rows(page)).filter((r) => r.body.includes(text)).length;
}

async function main() {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--disable-renderer-backgrounding',
           '--disable-background-timer-throttling',
           '--disable-backgrounding-occluded-windows'],
  });
  const S = cfg.stamp;
  const G1 = cfg.convs['gig-101'];
  const G3 = cfg.convs['gig-103'];
  const m = {
    m1: `Hello Bob, the brief is ready ${S}`,
    m2: `Did you get the brief? ${S}`,
    m3: `Got it, thanks! ${S}`,
    xss: `xss ${XSS_IMG} and ${XSS_SCRIPT} ${S}`,
    files: `files for you ${S}`,
    md: `**bold** and _italic_ and \`code\` [bad](javascript:alert(1)) https://example.com/a_b ${S}`,
    m1edit: `Hello Bob, the brief v2 is ready ${S}`,
    m4: `blocked and discarded ${S}`,
    m5: `blocked then retried ${S}`,
    reply: `Reply: yes, got it ${S}`,
    late: `A late ledger line ${S}`,
    evil2: `The second markup id writes ${S}`,
    evil3: `The first markup id writes from the page ${S}`,
    evilAlice: `Alice answers the markup ids ${S}`,
    off: `written while the server was down ${S}`,
    group: `Dave, charts first please ${S}`,
  };
  out.bodies = m;
  let a; let b; let carol; let dave; let evil;
  try {
    // ---- sign-in screen
    await step('sign-in screen', async () => {
      for (const vp of [DESK, PHONE]) {
        const s = await open(browser, 'signin', '', '', vp);
        await s.page.waitForSelector('.user-card', { timeout: T });
        out.signin = await s.page.evaluate(() => [...document.querySelectorAll('.user-card')]
          .map((c) => c.innerText.replace(/\s+/g, ' ').trim()));
        await shot(s.page, 'sign-in');
        await s.ctx.close();
      }
    });

    // ---- alice and bob open their gig conversation
    await step('alice and bob open gig-101', async () => {
      a = await open(browser, 'alice', 'alice', '&gig=gig-101', DESK);
      b = await open(browser, 'bob', 'bob', '&gig=gig-101', DESK);
      out.openIds = [await a.page.evaluate(() => window.demo.openId),
                     await b.page.evaluate(() => window.demo.openId)];
      await a.page.waitForFunction(() => window.demo.client.info.state === 'connected', null, { timeout: T });
      await b.page.waitForFunction(() => window.demo.client.info.state === 'connected', null, { timeout: T });
      out.transport = await a.page.textContent('#transport');
      out.swScope = await a.page.evaluate(async () => {
        const r = await navigator.serviceWorker.getRegistration('/client/');
        return r ? new URL(r.scope).pathname : null;
      });
      out.systemRow = await b.page.evaluate(() => {
        const r = document.querySelector('#rows > .row.system');
        return r ? r.innerText : null;
      });
    });

    // ---- typing, a message, its ticks
    await step('typing and the first message', async () => {
      await watchTicks(a.page, m.m1);
      await a.page.click('#composer-input');
      await a.page.keyboard.type(m.m1.slice(0, 12), { delay: 40 });
      await b.page.waitForFunction(() => /Alice is typing/.test(document.getElementById('typing').textContent),
                                   null, { timeout: T });
      out.typingShown = await b.page.textContent('#typing');
      await shot(b.page, 'conversation-typing');
      await a.page.fill('#composer-input', m.m1);
      const t0 = Date.now();
      await a.page.press('#composer-input', 'Enter');
      try {
        await waitRow(b.page, m.m1, 10000);
        out.timing.deliverMs = Date.now() - t0;
      } catch (e) {
        out.timing.deliverMs = null;
        throw e;
      }
      const t1 = Date.now();
      await b.page.waitForFunction(() => document.getElementById('typing').textContent === '', null, { timeout: T });
      out.timing.typingClearMs = Date.now() - t1;
      await waitTick(a.page, m.m1, ['read'], T);
      out.ticksM1 = await a.page.evaluate(() => window.__ticks);
      out.onceM1 = [await countBody(a.page, m.m1), await countBody(b.page, m.m1)];
      await shot(a.page, 'conversation-ticks');
    });

    // ---- bob on the list: delivered, not read; unread badge; notification
    await step('delivered while bob is on the list, read when he opens it', async () => {
      await b.page.evaluate(() => window.demo.closeConversation());
      await watchTicks(a.page, m.m2);
      await say(a.page, m.m2);
      await b.page.waitForFunction((id) => {
        const x = document.querySelector(`.conv-item[data-id="${id}"] .badge`);
        return x && x.textContent === '1';
      }, G1, { timeout: T });
      await waitTick(a.page, m.m2, ['delivered'], T);
      await sleep(1000);    // bob does not read it while it is not in view
      out.m2WhileAway = await a.page.evaluate((t) => {
        const r = [...document.querySelectorAll('#rows > .row')].find((x) => (x.querySelector('.body') || {}).textContent === t);
        return r && r.querySelector('.tick') ? r.querySelector('.tick').dataset.state : null;
      }, m.m2);
      out.bobTitle = await b.page.title();
      out.bobNotes = await b.page.evaluate(() => window.__notes);
      out.bobPreview = await b.page.textContent(`.conv-item[data-id="${G1}"] .preview`);
      out.presenceDot = await b.page.getAttribute(`.conv-item[data-id="${G1}"] .dot`, 'data-status');
      await shot(b.page, 'list-unread');
      await b.page.click(`.conv-item[data-id="${G1}"]`);
      await waitTick(a.page, m.m2, ['read'], T);
      out.ticksM2 = await a.page.evaluate(() => window.__ticks);
      await b.page.waitForFunction((id) => !document.querySelector(`.conv-item[data-id="${id}"] .badge`),
                                   G1, { timeout: T });
      out.bobTitleAfter = await b.page.title();
      await say(b.page, m.m3);
      await waitRow(a.page, m.m3);
    });

    // ---- markup in bodies and file names shows as text
    await step('XSS attempts render as text', async () => {
      await say(a.page, m.xss);
      await a.page.setInputFiles('#file-input', [
        { name: XSS_IMG + '.txt', mimeType: 'text/plain', buffer: Buffer.from('just text\n') },
        { name: 'sketch.png', mimeType: 'image/png', buffer: Buffer.from(cfg.png, 'base64') },
      ]);
      await a.page.waitForFunction(() => document.querySelectorAll('#uploads li[data-state="done"]').length === 2,
                                   null, { timeout: T });
      await say(a.page, m.files);
      await waitRow(b.page, m.xss);
      await waitRow(b.page, m.files);
      for (const p of [a.page, b.page]) {
        await p.waitForFunction((t) => {
          const r = [...document.querySelectorAll('#rows > .row')].find((x) => (x.querySelector('.body') || {}).textContent === t);
          const img = r && r.querySelector('.att-img img');
          return img && img.complete && img.naturalWidth > 0;
        }, m.files, { timeout: T });
      }
      out.xss = {};
      for (const [who, p] of [['alice', a.page], ['bob', b.page]]) {
        out.xss[who] = await p.evaluate(([xt, ft]) => {
          const rowOf = (t) => [...document.querySelectorAll('#rows > .row')]
            .find((x) => (x.querySelector('.body') || {}).textContent === t);
          const fr = rowOf(ft);
          const img = fr && fr.querySelector('.att-img img');
          return {
            flag: typeof window.__xss,
            body: rowOf(xt) ? rowOf(xt).querySelector('.body').textContent : null,
            fileName: fr && fr.querySelector('.att-file .fname') ? fr.querySelector('.att-file .fname').textContent : null,
            imgSrc: img ? img.src.slice(0, 5) : null,
            imgSize: img ? [img.naturalWidth, img.naturalHeight] : null,
            strayImg: document.querySelectorAll('#rows img[src="x"], #conv-list img').length,
            scripts: document.querySelectorAll('#rows script, #conv-list script').length,
          };
        }, [m.xss, m.files]);
      }
      // opening the file downloads it with the token (an object URL)
      const dl = b.page.waitForEvent('download', { timeout: T });
      await b.page.click(`#rows .att-file`);
      const d = await dl;
      out.download = d.suggestedFilename();
      // the page's object URL of a file is an octet-stream copy: opened, it
      // downloads; it never renders in the chat's origin
      out.downloadType = await b.page.evaluate(async () => {
        const x = document.querySelector('#rows .att-file');
        return x && x.href.startsWith('blob:') ? (await (await fetch(x.href)).blob()).type : null;
      });
      await shot(b.page, 'attachments');
    });

    await step('markdown subset', async () => {
      await say(a.page, m.md);
      await waitRow(b.page, `example.com/a_b ${S}`);
      out.md = await b.page.evaluate((stamp) => {
        const r = [...document.querySelectorAll('#rows > .row')].find((x) => (x.querySelector('.body') || {}).textContent.endsWith(stamp)
          && x.querySelector('strong'));
        if (!r) return null;
        const body = r.querySelector('.body');
        return {
          strong: (body.querySelector('strong') || {}).textContent,
          em: (body.querySelector('em') || {}).textContent,
          code: (body.querySelector('code') || {}).textContent,
          links: [...body.querySelectorAll('a')].map((x) => [x.getAttribute('href'), x.rel, x.textContent]),
          text: body.textContent,
        };
      }, S);
    });

    // ---- react, edit, delete through the message menu
    await step('react, edit and delete', async () => {
      const id1 = await idOf(a.page, m.m1);
      const id2 = await idOf(a.page, m.m2);
      out.ids = { m1: id1, m2: id2 };
      await a.page.click(`#rows .row[data-id="${id1}"] .more`);
      await a.page.click('#menu [data-menu="react"][data-emoji="👍"]');
      await b.page.waitForSelector(`#rows .row[data-id="${id1}"] .chip`, { timeout: T });
      out.reactionChip = await b.page.textContent(`#rows .row[data-id="${id1}"] .chip`);
      // a chip pressed from the keyboard: the row is redrawn, the focus
      // stays on the chip (of the new row); pressed again, the same
      const chip = `#rows .row[data-id="${id1}"] .chip`;
      const onChip = () => b.page.evaluate((id) => {
        const x = document.activeElement;
        return !!x && x.classList.contains('chip') && !!x.closest(`#rows .row[data-id="${id}"]`)
          && !x.__before;
      }, id1);
      out.chipFocus = [];
      for (const want of ['2', '1']) {
        await b.page.focus(chip);
        await b.page.evaluate((sel) => { document.querySelector(sel).__before = true; }, chip);
        await b.page.keyboard.press('Enter');
        await b.page.waitForFunction(([sel, n]) => {
          const x = document.querySelector(sel);
          return x && x.textContent.endsWith(' ' + n) && !x.__before;
        }, [chip, want], { timeout: T });
        out.chipFocus.push(await onChip());
      }
      await a.page.click(`#rows .row[data-id="${id1}"] .more`);
      await a.page.click('#menu [data-menu="edit"]');
      await a.page.fill('#composer-input', m.m1edit);
      await a.page.press('#composer-input', 'Enter');
      await waitRow(b.page, m.m1edit);
      out.edited = await b.page.evaluate((id) => {
        const r = document.querySelector(`#rows .row[data-id="${id}"]`);
        return r ? [r.querySelector('.body').textContent, !!r.querySelector('.edited')] : null;
      }, id1);
      await a.page.click(`#rows .row[data-id="${id2}"] .more`);
      await a.page.click('#menu [data-menu="delete"]');
      await b.page.waitForFunction((id) => {
        const r = document.querySelector(`#rows .row[data-id="${id}"]`);
        return r && r.classList.contains('deleted');
      }, id2, { timeout: T });
      out.deleted = await b.page.textContent(`#rows .row[data-id="${id2}"] .body`);

      // the menu by keyboard: Enter opens it with the focus inside, Escape
      // closes it and gives the focus back
      const id3 = await idOf(a.page, m.m3);
      await a.page.focus(`#rows .row[data-id="${id3}"] .more`);
      await a.page.keyboard.press('Enter');
      await a.page.waitForSelector('#menu:not([hidden])', { timeout: T });
      out.menuKeys = [await a.page.evaluate(() => document.getElementById('menu').contains(document.activeElement))];
      await a.page.keyboard.press('Escape');
      out.menuKeys.push(await a.page.evaluate(() => document.getElementById('menu').hidden),
                        await a.page.evaluate((id) => document.activeElement
                          === document.querySelector(`#rows .row[data-id="${id}"] .more`), id3));
      // Tab does not wander out of the menu into the page: it closes it,
      // the focus back on ⋯
      await a.page.keyboard.press('Enter');
      await a.page.waitForSelector('#menu:not([hidden])', { timeout: T });
      await a.page.keyboard.press('Tab');
      out.menuKeys.push(await a.page.evaluate((id) => document.getElementById('menu').hidden
        && document.activeElement === document.querySelector(`#rows .row[data-id="${id}"] .more`), id3));
      // a reply quotes the message it answers
      await a.page.click(`#rows .row[data-id="${id3}"] .more`);
      await a.page.click('#menu [data-menu="reply"]');
      out.replyContext = await a.page.textContent('#composer-ctx-text');
      await say(a.page, m.reply);
      await waitRow(b.page, m.reply);
      out.replyQuote = await b.page.evaluate((t) => {
        const r = [...document.querySelectorAll('#rows > .row')].find((x) => (x.querySelector('.body') || {}).textContent === t);
        return r && r.querySelector('.quote') ? r.querySelector('.quote').textContent : null;
      }, m.reply);
      out.ids.m3 = id3;
    });

    await step('report a message', async () => {
      const id1 = out.ids.m1;
      await b.page.click(`#rows .row[data-id="${id1}"] .more`);
      await b.page.click('#menu [data-menu="report"]');
      await b.page.selectOption('#report-reason', 'spam');
      await b.page.fill('#report-note', `asks to pay outside the platform ${S}`);
      await b.page.click('#report-form button[value="report"]');
      await b.page.waitForFunction(() => /Thanks/.test(document.getElementById('toast').textContent),
                                   null, { timeout: T });
    });

    // ---- blocked: the send fails; Discard drops it, Retry sends it later
    await step('failed send: discard and retry', async () => {
      await b.page.click('#block-btn');          // "Block Alice" (confirm accepted)
      await b.page.waitForFunction(() => /Unblock/.test(document.getElementById('block-btn').textContent),
                                   null, { timeout: T });
      await say(a.page, m.m4);
      await waitTick(a.page, m.m4, ['failed'], T);
      out.failedNote = await a.page.evaluate((t) => {
        const r = [...document.querySelectorAll('#rows > .row')].find((x) => (x.querySelector('.body') || {}).textContent === t);
        return r ? r.querySelector('.failed-note').innerText : null;
      }, m.m4);
      await shot(a.page, 'conversation-failed');
      await a.page.click('#rows .row .failed-note [data-act="discard"]');
      await a.page.waitForFunction((t) => ![...document.querySelectorAll('#rows > .row .body')]
        .some((x) => x.textContent === t), m.m4, { timeout: T });
      await say(a.page, m.m5);
      await waitTick(a.page, m.m5, ['failed'], T);
      await b.page.click('#block-btn');          // "Unblock Alice"
      await b.page.waitForFunction(() => /^Block/.test(document.getElementById('block-btn').textContent),
                                   null, { timeout: T });
      await a.page.click('#rows .row .failed-note [data-act="retry"]');
      await waitRow(b.page, m.m5);
      await waitTick(a.page, m.m5, ['sent', 'delivered', 'read'], T);
      out.m4Gone = await countBody(a.page, m.m4) === 0;
    });

    await step('search', async () => {
      await b.page.fill('#search-input', 'brief');
      await b.page.waitForSelector('#result-list .result-item', { timeout: T });
      out.search = await b.page.evaluate(() => [...document.querySelectorAll('#result-list .result-item')]
        .map((x) => [x.querySelector('.snippet').innerHTML.includes('<mark>'), x.innerText.replace(/\s+/g, ' ')]));
      await b.page.evaluate(() => window.demo.closeConversation());
      await b.page.click('#result-list .result-item');
      await b.page.waitForFunction((id) => window.demo.openId === id, G1, { timeout: T });
      out.searchOpened = true;
      await b.page.click('#search-clear');
    });

    // ---- reload: every message once, in order
    await step('bob reloads', async () => {
      await b.page.reload();
      await b.page.evaluate(() => window.demo.ready);
      await waitRow(b.page, m.m5);
      out.afterReload = {
        bob: { seqs: await b.page.evaluate(() => window.demo.seqs()), rows: await rows(b.page) },
        alice: { seqs: await a.page.evaluate(() => window.demo.seqs()), rows: await rows(a.page) },
      };
    });

    // ---- carol and dave: lists with badges, a group with read-by names
    await step('carol: lists, group read-by, typing on a phone', async () => {
      const cd = await open(browser, 'carol-desk', 'carol', '', DESK);
      await cd.page.waitForSelector('.conv-item .badge', { timeout: T });
      await shot(cd.page, 'list-unread');
      await cd.ctx.close();
      carol = await open(browser, 'carol', 'carol', '', PHONE);
      await carol.page.waitForSelector('.conv-item .badge', { timeout: T });
      out.carolBadges = await carol.page.evaluate(() => [...document.querySelectorAll('.conv-item')]
        .map((x) => [x.querySelector('.title').textContent, (x.querySelector('.badge') || {}).textContent || '']));
      out.carolTitle = await carol.page.title();
      await shot(carol.page, 'list-unread');
      dave = await open(browser, 'dave', 'dave', '&gig=gig-103', DESK);
      await carol.page.click(`.conv-item[data-id="${G3}"]`);
      out.carolPhoneView = await carol.page.evaluate(() => [document.body.dataset.view,
        getComputedStyle(document.getElementById('sidebar')).display, document.activeElement.id]);
      await say(carol.page, m.group);
      await waitRow(dave.page, m.group);
      await carol.page.waitForFunction(() => [...document.querySelectorAll('#rows .readby')]
        .some((x) => /Dave/.test(x.textContent)), null, { timeout: T });
      out.readBy = await carol.page.evaluate(() => [...document.querySelectorAll('#rows .readby')].map((x) => x.textContent));
      await dave.page.click('#composer-input');
      await dave.page.keyboard.type('On it', { delay: 40 });
      await carol.page.waitForFunction(() => /Dave is typing/.test(document.getElementById('typing').textContent),
                                       null, { timeout: T });
      await shot(carol.page, 'conversation-typing');
    });

    // ---- the server goes away: banner, an outbox message, recovery
    await step('connection banner while nginx is stopped', async () => {
      // a file uploaded before: the message written offline carries it
      await a.page.setInputFiles('#file-input', [
        { name: 'offline-plan.txt', mimeType: 'text/plain', buffer: Buffer.from('plan\n') }]);
      await a.page.waitForFunction(() => document.querySelectorAll('#uploads li[data-state="done"]').length === 1,
                                   null, { timeout: T });
      await ask('stop');
      for (const p of [a.page, carol.page]) {
        await p.waitForFunction(() => {
          const x = document.getElementById('banner');
          return !x.hidden && /retrying|offline/.test(x.dataset.state || '');
        }, null, { timeout: T });
      }
      out.banner = await a.page.evaluate(() => [document.getElementById('banner').dataset.state,
                                                document.getElementById('banner').textContent]);
      await say(a.page, m.off);
      await waitTick(a.page, m.off, ['sending'], T);
      out.pendingFile = await a.page.evaluate((t) => {
        const r = [...document.querySelectorAll('#rows > .row')].find((x) => (x.querySelector('.body') || {}).textContent === t);
        const f = r && r.querySelector('.att-file');
        return f ? [f.querySelector('.fname').textContent, f.querySelector('.fsize').textContent,
                    r.querySelector('.tick').dataset.state] : null;
      }, m.off);
      await shot(a.page, 'banner-offline');
      await shot(carol.page, 'banner-offline');
      await ask('start');
      // the browser coming back online makes the client try at once
      for (const c of [a.ctx, carol.ctx, b.ctx, dave.ctx]) {
        await c.setOffline(true);
        await c.setOffline(false);
      }
      for (const p of [a.page, b.page]) {
        await p.waitForFunction(() => window.demo.client.info.state === 'connected', null, { timeout: 30000 });
      }
      await waitRow(b.page, m.off, 15000);
      await waitTick(a.page, m.off, ['sent', 'delivered', 'read'], T);
      await a.page.waitForFunction(() => document.getElementById('banner').hidden, null, { timeout: T });
      out.offOnce = [await countBody(a.page, m.off), await countBody(b.page, m.off)];
      out.final = {
        bob: { seqs: await b.page.evaluate(() => window.demo.seqs()), rows: await rows(b.page) },
        alice: { seqs: await a.page.evaluate(() => window.demo.seqs()), rows: await rows(a.page) },
      };
    });

    // ---- 10,000 messages: a windowed list
    await step('a 10,000-message conversation', async () => {
      const t0 = Date.now();
      await a.page.evaluate((id) => window.demo.openConversation(id), cfg.big);
      out.timing.openBigMs = Date.now() - t0;
      const info = () => a.page.evaluate(() => ({
        rows: window.demo.rows(), held: window.demo.held(), seqs: window.demo.seqs(),
        atBottom: window.demo.atBottom(),
        last: (document.querySelector('#rows > .row:last-child') || {}).dataset,
      }));
      const first = await info();
      out.big = { first: { rows: first.rows, held: first.held, atBottom: first.atBottom,
                           lastSeq: Math.max(...first.seqs) } };
      await shot(a.page, 'conversation-10k');
      const t1 = Date.now();
      for (let i = 0; i < 4; i++) {
        const held = await a.page.evaluate(() => window.demo.held());
        await a.page.evaluate(() => window.demo.scrollToTop());
        await a.page.waitForFunction((h) => window.demo.held() > h, held, { timeout: T });
      }
      out.timing.fourOlderPagesMs = Date.now() - t1;
      const after = await info();
      const seqs = after.seqs;
      out.big.after = {
        rows: after.rows, held: after.held, atBottom: after.atBottom,
        contiguous: seqs.every((s, i) => i === 0 || s === seqs[i - 1] + 1),
        min: seqs[0], max: seqs[seqs.length - 1],
        domSeqs: (await rows(a.page)).map((r) => Number(r.seq)),
      };
      // scrolled up, a new message: a pill, no jump, not read
      const tok = (await (await fetch(`${base}/demo/token?user=erin`)).json()).token;
      const before = await a.page.evaluate(() => document.getElementById('viewport').scrollTop);
      const r = await fetch(`${base}/chat/api/conversations/${cfg.big}/messages`, {
        method: 'POST', headers: { Authorization: 'Bearer ' + tok, 'Content-Type': 'application/json' },
        body: JSON.stringify({ client_msg_id: 'late-' + S, body: m.late }),
      });
      out.big.latePost = r.status;
      await a.page.waitForSelector('#pill:not([hidden])', { timeout: T });
      await a.page.waitForFunction((id) => {
        const x = document.querySelector(`.conv-item[data-id="${id}"] .badge`);
        return x && x.textContent === '1';
      }, cfg.big, { timeout: T });
      out.big.pill = {
        text: await a.page.textContent('#pill'),
        scrollKept: Math.abs(await a.page.evaluate(() => document.getElementById('viewport').scrollTop) - before) < 2,
        atBottom: await a.page.evaluate(() => window.demo.atBottom()),
      };
      await a.page.click('#pill');
      await waitRow(a.page, m.late);
      await a.page.waitForFunction((id) => !document.querySelector(`.conv-item[data-id="${id}"] .badge`),
                                   cfg.big, { timeout: T });
      out.big.pillAfter = { hidden: await a.page.evaluate(() => document.getElementById('pill').hidden),
                            atBottom: await a.page.evaluate(() => window.demo.atBottom()) };
      // a wheel scroll (a person) keeps loading too
      await a.page.mouse.move(800, 400);
      await a.page.evaluate(() => window.demo.scrollToBottom());
      await a.page.mouse.wheel(0, -3000);
      await sleep(300);
      out.big.afterWheel = await a.page.evaluate(() => ({ rows: window.demo.rows(), atBottom: window.demo.atBottom() }));
    });

    // ---- gig details come from the platform only: alice makes a group with
    // a made-up gig context; bob's page shows none of it
    await step('a gig context made by a user is not shown', async () => {
      const fake = await a.page.evaluate(async () => (await window.demo.client.createConversation({
        kind: 'group', members: ['bob'], title: 'Pay me off-platform',
        context: { gig_id: 'gig-666', title: 'Pay me off-platform', budget: 1, currency: 'USD',
                   status: 'in_progress', client: 'alice' },
      })).id);
      await b.page.evaluate((id) => window.demo.openConversation(id), fake);
      await b.page.waitForSelector(`.conv-item[data-id="${fake}"]`, { timeout: T });
      out.fakeGig = await b.page.evaluate((id) => ({
        createdBy: (window.demo.client.conversation(id) || {}).created_by,
        list: document.querySelector(`.conv-item[data-id="${id}"]`).innerText,
        title: document.getElementById('conv-title').textContent,
        bar: document.getElementById('gig-bar').textContent,
        forGig: window.demo.conversationForGig('gig-666'),
      }), fake);
      await shot(b.page, 'user-made-context');
    });

    // ---- user ids that are markup (the names the page shows come from
    // ids): a group the platform made with alice and two such ids, no
    // title; the first one wrote before (REST), the second writes now
    // (REST), then the first signs in to the demo itself (its token has a
    // name claim with markup too), types and writes; alice answers and the
    // first one reads it ("Seen by").
    await step('user ids that are markup show as text', async () => {
      const E = cfg.evil;
      const [E1] = E.ids;
      const ev = out.evil = {};
      const rowOf = (p, t) => p.evaluate((t) => {
        const r = [...document.querySelectorAll('#rows > .row')]
          .find((x) => (x.querySelector('.body') || {}).textContent === t);
        return r ? {
          sender: r.dataset.sender, cls: r.className,
          shown: (r.querySelector('.meta .sender') || {}).textContent || null,
          more: r.querySelector('.more') ? r.querySelector('.more').getAttribute('aria-label') : null,
        } : null;
      }, t);
      const header = (p) => p.evaluate(() => ({
        title: document.getElementById('conv-title').textContent,
        sub: document.getElementById('conv-sub').textContent,
      }));
      const listItem = (p) => p.evaluate((id) => {
        const x = document.querySelector(`.conv-item[data-id="${id}"]`);
        return x ? { title: x.querySelector('.title').textContent, preview: x.querySelector('.preview').textContent,
                     avatar: x.querySelector('.avatar').firstChild.textContent } : null;
      }, E.conv);
      // nothing parsed: no element with an on* attribute anywhere, no <img>
      // but an image attachment's, no <svg> but the page's icons
      const parsed = (p) => p.evaluate(() => ({
        flag: typeof window.__xss,
        onAttrs: [...document.querySelectorAll('*')].filter((e) => [...e.attributes]
          .some((x) => /^on/i.test(x.name))).length,
        imgs: [...document.querySelectorAll('img')].filter((e) => !e.closest('.att-img')).length,
        svgs: [...document.querySelectorAll('svg')].filter((e) => !e.classList.contains('ico')).length,
      }));

      await a.page.waitForSelector(`.conv-item[data-id="${E.conv}"]`, { timeout: T });
      ev.list = await listItem(a.page);
      await a.page.click(`.conv-item[data-id="${E.conv}"]`);
      await waitRow(a.page, E.first);
      ev.header = await header(a.page);
      ev.first = await rowOf(a.page, E.first);
      const r = await fetch(`${base}/chat/api/conversations/${E.conv}/messages`, {
        method: 'POST', headers: { Authorization: 'Bearer ' + E.tokens[1], 'Content-Type': 'application/json' },
        body: JSON.stringify({ client_msg_id: 'evil2-' + S, body: m.evil2 }),
      });
      ev.post2 = r.status;
      await waitRow(a.page, m.evil2);
      ev.second = await rowOf(a.page, m.evil2);

      evil = await open(browser, 'evil', 'mallory', `&conv=${E.conv}`, DESK, E.tokens[0]);
      ev.own = await evil.page.evaluate(() => ({
        user: window.demo.user, openId: window.demo.openId,
        me: [...document.getElementById('me').childNodes].map((e) => e.textContent),
      }));
      ev.ownFirst = await rowOf(evil.page, E.first);
      await evil.page.click('#composer-input');
      await evil.page.keyboard.type('Hello', { delay: 40 });
      await a.page.waitForFunction((n) => document.getElementById('typing').textContent.startsWith(n),
                                   E1, { timeout: T });
      ev.typing = await a.page.textContent('#typing');
      ev.typingList = (await listItem(a.page)).preview;
      await say(evil.page, m.evil3);
      await waitRow(a.page, m.evil3);
      ev.third = await rowOf(a.page, m.evil3);
      await say(a.page, m.evilAlice);
      await waitRow(evil.page, m.evilAlice);
      ev.ownAlice = await rowOf(evil.page, m.evilAlice);
      await evil.page.waitForFunction(() => / 1 online$/.test(document.getElementById('conv-sub').textContent),
                                      null, { timeout: T }).catch(() => {});
      ev.ownHeader = await header(evil.page);
      await a.page.waitForFunction((n) => [...document.querySelectorAll('#rows .readby')]
        .some((x) => x.textContent.includes(n)), E1, { timeout: T });
      ev.readBy = await a.page.evaluate(() => [...document.querySelectorAll('#rows .readby')].map((x) => x.textContent));
      ev.listAfter = await listItem(a.page);
      ev.pages = { alice: await parsed(a.page), evil: await parsed(evil.page) };
      await shot(a.page, 'markup-user-ids');
      await shot(evil.page, 'markup-user-own-page');
    });

    out.finalXss = [];
    for (const x of [a, b, carol, dave]) {
      if (x) out.finalXss.push(await x.page.evaluate(() => typeof window.__xss));
    }
    out.evilXss = evil ? await evil.page.evaluate(() => typeof window.__xss) : null;
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

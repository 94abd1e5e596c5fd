// Cross-origin use of the chat host from a page in Debian's Chromium
// (driven by playwright-core).  argv: the page's URL on an allowed origin,
// one on an origin that is not allowed, the chat host's base URL as the
// first page sees it (another origin), as the second sees it, a JWT and a
// conversation id.  From the allowed page: REST with a Bearer header
// (preflighted) -- GET, POST, PATCH, DELETE --, an EventSource with a
// ticket that sees a message sent from the page, and a long-poll.  From
// the other page the same GET must be refused by the browser.  Prints one
// JSON line.
'use strict';
const path = require('path');
const { chromium } = require(path.join(__dirname, '..', '..', 'client',
                                       'node_modules', 'playwright-core'));

const [allowedPage, otherPage, api, otherApi, token, conv] = process.argv.slice(2);

async function fromPage(page, url, api) {
  await page.goto(url);
  return page.evaluate(async ({ api, token, conv }) => {
    const out = {};
    const auth = { Authorization: 'Bearer ' + token };
    const json = { ...auth, 'Content-Type': 'application/json' };
    try {
      let r = await fetch(api + '/chat/api/me', { headers: auth });
      out.me = [r.status, (await r.json()).user.id];
      r = await fetch(api + '/chat/api/conversations/' + conv + '/messages', {
        method: 'POST', headers: json,
        body: JSON.stringify({ client_msg_id: 'cors-1', body: 'from another origin' }) });
      const m = (await r.json()).message;
      out.post = [r.status, m.body];
      r = await fetch(api + '/chat/api/messages/' + m.id, {
        method: 'PATCH', headers: json, body: JSON.stringify({ body: 'edited across origins' }) });
      out.patch = [r.status, (await r.json()).message.body];
      r = await fetch(api + '/chat/api/tickets', { method: 'POST', headers: auth });
      const ticket = (await r.json()).ticket;
      const got = await new Promise((resolve) => {
        const es = new EventSource(api + '/chat/events?ticket=' + encodeURIComponent(ticket));
        const seen = { welcome: false, message: null };
        const t = setTimeout(() => { es.close(); resolve(seen); }, 8000);
        es.addEventListener('welcome', async () => {
          seen.welcome = true;
          await fetch(api + '/chat/api/conversations/' + conv + '/messages', {
            method: 'POST', headers: json,
            body: JSON.stringify({ client_msg_id: 'cors-2', body: 'seen by the stream' }) });
        });
        es.addEventListener('message.new', (ev) => {
          const m = JSON.parse(ev.data).event.message;
          if (m.client_msg_id === 'cors-2') {
            seen.message = m.body;
            seen.lastEventId = ev.lastEventId;
            clearTimeout(t);
            es.close();
            resolve(seen);
          }
        });
      });
      out.sse = got;
      r = await fetch(api + '/chat/poll?timeout_ms=0', { headers: auth });
      out.poll = [r.status, Array.isArray((await r.json()).events)];
      r = await fetch(api + '/chat/api/messages/' + m.id, { method: 'DELETE', headers: auth });
      out.del = [r.status, (await r.json()).message.deleted];
    } catch (e) {
      out.error = String(e);
    }
    return out;
  }, { api, token, conv });
}

(async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update',
           '--disable-sync'],
  });
  const res = {};
  try {
    res.allowed = await fromPage(await browser.newPage(), allowedPage, api);
    res.other = await fromPage(await browser.newPage(), otherPage, otherApi);
  } catch (e) {
    res.error = String(e);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(res));
})();

// The demo web app of ngx_chat_module: chat for a gig-work platform, on top
// of the browser client (../chat.js, API in ../chat.d.ts). No framework and
// no build step; every user string reaches the page through textContent or
// text nodes (never innerHTML), so names, bodies and file names that look
// like markup show as text.
//
// For tests (t/060-demo-browser.t drives this page), the page exposes
//   window.demo = {
//     ready,                  Promise: resolves {user} once signed in, the
//                             conversations are listed and ?gig=/?conv= is
//                             open ({user: null} on the sign-in screen);
//                             rejects if the client could not start
//     client, user, openId,   the ChatClient, the signed-in user id, the open
//                             conversation (getters)
//     openConversation(id, {seq}) → Promise   (seq: scroll to that message)
//     closeConversation(),    back to the list (the phone's back button)
//     conversationForGig(gigId) → conversation id | null
//     rows() → number of message rows in the DOM (the windowed list)
//     held() → number of messages the list holds (what it could show)
//     scrollToTop(), scrollToBottom(), atBottom()
//     hasMore() → whether older history may still be loaded
//     seqs() → the seq of every message the list holds, in order (null: unsent)
//   }
// and query parameters: ?user=NAME signs in directly, ?gig=GIG_ID or
// ?conv=ID opens a conversation once signed in.

// Absolute: the page is served at /demo/ (nginx: alias client/demo/) and the
// client at /client/chat.js; "../chat.js" from /demo/app.js would be /chat.js.
import { ChatClient, errorText } from '/client/chat.js';

// The demo's people; app.py seeds gigs between them.
const DEMO_USERS = [
  { id: 'alice', name: 'Alice', kind: 'client', blurb: 'Runs a bakery, wants a new logo' },
  { id: 'carol', name: 'Carol', kind: 'client', blurb: 'Founder, hiring for a dashboard and photos' },
  { id: 'bob', name: 'Bob', kind: 'freelancer', blurb: 'Logo and brand designer' },
  { id: 'dave', name: 'Dave', kind: 'freelancer', blurb: 'Photographer and chart wizard' },
  { id: 'erin', name: 'Erin', kind: 'freelancer', blurb: 'React developer' },
];
const USER_BY_ID = new Map(DEMO_USERS.map((u) => [u.id, u]));
// senders that are the platform itself (its service token's subject)
const SERVICE_NAMES = new Map([['platform', 'Platform']]);
const USER_RE = /^[a-z][a-z0-9_]{0,31}$/;

const GIG_STATUS = { offer: 'Offer', in_progress: 'In progress', completed: 'Completed',
                     cancelled: 'Cancelled', disputed: 'Disputed' };
const QUICK_EMOJI = ['👍', '❤️', '😂', '🎉', '😮', '🙏'];
const PICKER_EMOJI = ['😀', '😄', '😂', '😊', '😉', '😍', '🤔', '😮', '😢', '👍', '👎', '👏',
                      '🙏', '💪', '🎉', '🔥', '✅', '❤️', '👀', '🚀', '📎', '💰', '⏰', '☕'];
// :shortcodes: people type out of habit; shown as emoji, stored as typed
const SHORTCODES = { ':smile:': '😄', ':+1:': '👍', ':thumbsup:': '👍', ':-1:': '👎', ':heart:': '❤️',
                     ':tada:': '🎉', ':fire:': '🔥', ':eyes:': '👀', ':pray:': '🙏', ':wave:': '👋',
                     ':check:': '✅', ':rocket:': '🚀', ':laughing:': '😆', ':wink:': '😉',
                     ':thinking:': '🤔', ':coffee:': '☕', ':moneybag:': '💰' };

const $ = (id) => document.getElementById(id);

// preferences survive reloads where storage is allowed (not in every
// private window)
function pref(key, value) {
  try {
    if (value === undefined) return localStorage.getItem(key);
    localStorage.setItem(key, value);
  } catch (e) { /* no storage: the setting lasts this page */ }
  return value;
}
const params = new URLSearchParams(location.search);

const S = {
  client: null,
  me: null,
  kind: null,
  info: null,
  openId: null,
  list: null,              // the windowed message list
  byId: new Map(),         // id → message of the open conversation's list
  loaded: new Set(),       // conversations whose newest page was loaded this session
  hasMore: new Map(),      // conversation → older history may exist
  olderLoad: null,         // the promise of the older page being loaded
  seenSeq: new Map(),      // conversation → highest seq seen (what is "new")
  readAsked: new Map(),    // conversation → newest seq markRead was called for
  holdRead: new Set(),     // conversations being opened: no markRead yet
  typing: new Map(),       // conversation → users typing
  readBy: new Map(),       // own seq → names that read up to it (open group)
  blocks: new Set(),
  replyTo: null,           // message replied to
  editing: null,           // message being edited
  uploads: [],             // {name, state: uploading|done|error, att, error}
  drafts: new Map(),       // conversation → {text, uploads, replyTo, editing} left there
  pill: 0,
  searchSeq: 0,
  unreadTotal: null,
  notifyOn: pref('chat-demo-notify') !== 'off',
  sound: pref('chat-demo-sound') === 'on',
  audio: null,
};

// ---------------------------------------------------------------- helpers --

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k === 'dataset') Object.assign(e.dataset, v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
  }
  // strings become text nodes: append() never parses markup
  for (const k of kids) if (k != null && k !== false) e.append(k);
  return e;
}

const cap = (s) => (s ? s[0].toUpperCase() + s.slice(1) : s);

function nameOf(uid) {
  if (uid == null) return 'Someone';
  if (S.client && S.client.user && uid === S.client.user.id) return S.client.user.name || cap(uid);
  const u = USER_BY_ID.get(uid);
  if (u) return u.name;
  if (SERVICE_NAMES.has(uid)) return SERVICE_NAMES.get(uid);
  return cap(String(uid));
}

function kindOf(uid) {
  const u = USER_BY_ID.get(uid);
  return u ? u.kind : null;
}

function hue(s) {
  let h = 0;
  for (const ch of String(s)) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return h % 360;
}

function avatar(uid, { small = false, status = null, label = null } = {}) {
  const a = el('span', { class: 'avatar' + (small ? ' small' : ''), 'aria-hidden': 'true' },
               (label || nameOf(uid)).slice(0, 1).toUpperCase());
  // dark enough for white initials (contrast), whatever the hue
  a.style.background = `hsl(${hue(uid)} 45% 36%)`;
  if (status) a.append(el('span', { class: 'dot', dataset: { status } }));
  return a;
}

// interface icons are drawn, not emoji: they must show without an emoji font
const ICONS = {
  file: ['M6 2h8l5 5v15H6z', 'M14 2v5h5'],
  clip: ['M16.5 6.5l-7.8 7.8a2 2 0 0 0 2.8 2.8l7.8-7.8a4 4 0 0 0-5.7-5.7l-7.8 7.8a6 6 0 0 0 8.5 8.5l6.4-6.4'],
  alert: ['M12 3l10 18H2z', 'M12 10v5', 'M12 18h.01'],
};
function icon(name) {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('class', 'ico');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  for (const d of ICONS[name]) {
    const p = document.createElementNS(ns, 'path');
    p.setAttribute('d', d);
    svg.append(p);
  }
  return svg;
}

function money(amount, currency) {
  if (typeof amount !== 'number') return amount == null ? '' : String(amount);
  try {
    return new Intl.NumberFormat('en-US', { style: 'currency', currency: currency || 'USD',
                                            maximumFractionDigits: 0 }).format(amount);
  } catch (e) {
    return String(amount);
  }
}

function timeLabel(iso) {
  const d = new Date(iso);
  if (isNaN(d)) return '';
  const now = new Date();
  if (d.toDateString() === now.toDateString()) {
    return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }
  return d.toLocaleDateString([], { month: 'short', day: 'numeric' });
}

function fullTime(iso) {
  const d = new Date(iso);
  return isNaN(d) ? '' : d.toLocaleString();
}

function size(n) {
  if (!(n >= 0)) return '';
  if (n < 1024) return n + ' B';
  if (n < 1024 * 1024) return (n / 1024).toFixed(n < 10240 ? 1 : 0) + ' KB';
  return (n / 1024 / 1024).toFixed(1) + ' MB';
}

function errText(err) {
  if (!err) return 'Something went wrong';
  try {
    if (err.code) return errorText(err);
  } catch (e) { /* fall through */ }
  return err.message || String(err);
}

let toastTimer = 0;
function toast(text) {
  const t = $('toast');
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
}

// announced by screen readers; the windowed list itself is not a live region
// (rows come and go while scrolling)
function announce(text) {
  const live = $('live');
  live.textContent = '';
  // a fresh text node after a tick is announced even when it repeats
  setTimeout(() => { live.textContent = text; }, 30);
}

function safeHref(url) {
  try {
    const u = new URL(url);
    if (u.protocol === 'http:' || u.protocol === 'https:') return u.href;
  } catch (e) { /* not a URL */ }
  return null;
}

function emojify(s) {
  return s.replace(/:[a-z0-9_+-]+:/g, (c) => SHORTCODES[c] || c);
}

// ------------------------------------------------------- rich text (safe) --
// A markdown subset: **bold**, _italic_, `code`, [label](http…) and bare
// http(s) links. Everything is built from text nodes and a fixed set of
// elements; a link is made only for http: and https: URLs.

const INLINE_RE = new RegExp([
  '(`[^`\\n]+`)',                                            // 1 code
  '(\\*\\*[^*\\n]+?\\*\\*)',                                 // 2 bold
  '((?<![\\w])_[^_\\n]+?_(?![\\w]))',                        // 3 italic (not snake_case)
  '(\\[[^\\]\\n]+\\]\\(https?:\\/\\/[^\\s)]+\\))',           // 4 [label](url)
  '(https?:\\/\\/[^\\s<>"]*[^\\s<>".,;:!?)\\]\'])',         // 5 bare URL
].join('|'), 'g');
const URL_RE = /https?:\/\/[^\s<>"]*[^\s<>".,;:!?)\]']/g;

function link(parent, label, url) {
  const href = safeHref(url);
  if (!href) {
    parent.append(label);
    return;
  }
  parent.append(el('a', { href, rel: 'noopener noreferrer nofollow', target: '_blank' }, label));
}

function appendRich(parent, text, markdown) {
  const re = markdown ? INLINE_RE : URL_RE;
  let last = 0;
  for (const m of text.matchAll(re)) {
    if (m.index > last) parent.append(emojify(text.slice(last, m.index)));
    const tok = m[0];
    if (!markdown) {
      link(parent, tok, tok);
    } else if (m[1]) {
      parent.append(el('code', null, tok.slice(1, -1)));
    } else if (m[2]) {
      const b = el('strong');
      appendRich(b, tok.slice(2, -2), true);
      parent.append(b);
    } else if (m[3]) {
      const i = el('em');
      appendRich(i, tok.slice(1, -1), true);
      parent.append(i);
    } else if (m[4]) {
      const k = tok.indexOf('](');
      link(parent, tok.slice(1, k), tok.slice(k + 2, -1));
    } else {
      link(parent, tok, tok);
    }
    last = m.index + tok.length;
  }
  if (last < text.length) parent.append(emojify(text.slice(last)));
}

// the text of a message on one line, markup removed (list previews, quotes)
function plain(m) {
  if (!m) return '';
  if (m.deleted) return 'Message deleted';
  let t = (m.body || '');
  if (m.format === 'markdown') {
    t = t.replace(/\*\*(.+?)\*\*/g, '$1').replace(/`([^`]+)`/g, '$1')
      .replace(/(^|[^\w])_([^_\n]+?)_(?!\w)/g, '$1$2');
  }
  t = emojify(t).replace(/\s+/g, ' ').trim();
  if (!t && m.attachments && m.attachments.length) {
    t = '📎 ' + m.attachments.map((a) => a.name).join(', ');
  }
  return t;
}

// search snippets are HTML made by the server: the body escaped and only
// <mark> added. Read back as text plus <mark> elements, never as markup.
function appendSnippet(parent, html) {
  const ent = { lt: '<', gt: '>', quot: '"', amp: '&', '#39': "'" };
  const text = (s) => s.replace(/&(lt|gt|quot|amp|#39);/g, (_, n) => ent[n]);
  let mark = null;
  for (const part of String(html).split(/(<mark>|<\/mark>)/)) {
    if (part === '<mark>') {
      mark = el('mark');
      parent.append(mark);
    } else if (part === '</mark>') {
      mark = null;
    } else if (part) {
      (mark || parent).append(text(part));
    }
  }
}

// ------------------------------------------------------ the windowed list --
// Only the rows in view (plus `overscan` px above and below) are in the DOM;
// the others are space. Heights are estimated until a row has been shown
// once, then measured. When rows change above the visible part (older
// history merged in, a measurement differs from its estimate), the first
// visible row stays where it was on screen; a list scrolled to the bottom
// stays at the bottom.

// the control of a redrawn row that stands for `old` (of the row it
// replaced): the same action on the same emoji or file, else the same
// action, else the row's ⋯ button, else the message list itself
function refocus(row, old, fallback) {
  const act = old.getAttribute('data-act');
  const sel = [];
  if (old.dataset.emoji) sel.push(`.chip[data-emoji="${CSS.escape(old.dataset.emoji)}"]`);
  if (act && old.dataset.att) sel.push(`[data-act="${CSS.escape(act)}"][data-att="${CSS.escape(old.dataset.att)}"]`);
  if (act) sel.push(`[data-act="${CSS.escape(act)}"]`);
  sel.push('[data-act="menu"]');
  for (const q of sel) {
    const e = row.querySelector(q);
    if (e) {
      e.focus({ preventScroll: true });
      return;
    }
  }
  fallback.focus({ preventScroll: true });
}

class WindowedList {
  constructor(viewport, rows, { keyOf, sigOf, renderRow, estimate, onScroll, overscan = 600 }) {
    Object.assign(this, { vp: viewport, rows, keyOf, sigOf, renderRow, estimate, overscan });
    this.onScrolled = onScroll;
    this.items = [];
    this.keys = [];
    this.index = new Map();
    this.heights = new Map();      // key → measured px
    this.offsets = new Float64Array(1);
    this.base = 0;                 // empty space above a short list (it sits at the bottom)
    this.mounted = new Map();      // key → {el, sig}
    this.stick = true;
    this.width = 0;
    this.frame = 0;
    viewport.addEventListener('scroll', () => {
      this.stick = this.atBottom();
      this.schedule();
      if (this.onScrolled) this.onScrolled();
    }, { passive: true });
    new ResizeObserver(() => {
      const w = this.vp.clientWidth;
      if (w !== this.width) {
        // widths change wrapping: every measurement is stale
        this.width = w;
        this.heights.clear();
      }
      this.update(this.items);
    }).observe(viewport);
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  reset() {
    for (const m of this.mounted.values()) m.el.remove();
    this.mounted.clear();
    this.heights.clear();
    this.items = [];
    this.keys = [];
    this.index = new Map();
    this.stick = true;
    this.layout();
  }

  atBottom() {
    return this.vp.scrollHeight - this.vp.scrollTop - this.vp.clientHeight < 48;
  }

  // the first row whose bottom is below y (list coordinates)
  find(y) {
    let lo = 0;
    let hi = this.keys.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.offsets[mid + 1] > y) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }

  anchor() {
    if (this.stick || !this.keys.length) return null;
    const top = this.vp.scrollTop;
    const i = Math.min(this.find(top - this.base), this.keys.length - 1);
    return { key: this.keys[i], delta: this.base + this.offsets[i] - top };
  }

  layout() {
    const n = this.keys.length;
    const off = new Float64Array(n + 1);
    for (let i = 0; i < n; i++) {
      const h = this.heights.get(this.keys[i]);
      off[i + 1] = off[i] + (h === undefined ? this.estimate(this.items[i]) : h);
    }
    this.offsets = off;
    this.base = Math.max(0, this.vp.clientHeight - off[n]);
    this.rows.style.height = (this.base + off[n]) + 'px';
  }

  update(items) {
    const anchor = this.anchor();
    this.items = items;
    this.keys = items.map(this.keyOf);
    this.index = new Map(this.keys.map((k, i) => [k, i]));
    this.layout();
    this.render(anchor);
  }

  // re-render rows whose signature changed (receipts, blocks …)
  refresh() {
    this.update(this.items);
  }

  restore(anchor) {
    if (this.stick) {
      this.vp.scrollTop = this.vp.scrollHeight;
    } else if (anchor) {
      const i = this.index.get(anchor.key);
      if (i !== undefined) this.vp.scrollTop = this.base + this.offsets[i] - anchor.delta;
    }
  }

  render(anchor = this.anchor()) {
    for (let pass = 0; pass < 6; pass++) {
      this.restore(anchor);
      if (!this.paint()) break;
      this.layout();
    }
    this.restore(anchor);
  }

  paint() {
    const n = this.keys.length;
    const top = this.vp.scrollTop - this.base - this.overscan;
    const bottom = this.vp.scrollTop - this.base + this.vp.clientHeight + this.overscan;
    const first = Math.min(this.find(Math.max(0, top)), n);
    let last = first;
    while (last < n && this.offsets[last] < bottom) last++;

    const want = new Set();
    for (let i = first; i < last; i++) want.add(this.keys[i]);
    // a row holding the focus stays (the keyboard user is on it)
    const active = document.activeElement;
    for (const [key, m] of this.mounted) {
      if (want.has(key)) continue;
      if (active && m.el.contains(active) && this.index.has(key)) continue;
      m.el.remove();
      this.mounted.delete(key);
    }
    let prev = null;
    const shown = [];
    for (let i = first; i < last; i++) {
      const key = this.keys[i];
      const item = this.items[i];
      const ctx = { prev: i > 0 ? this.items[i - 1] : null, index: i, count: n };
      const sig = this.sigOf(item, ctx);
      let m = this.mounted.get(key);
      if (!m || m.sig !== sig) {
        const row = this.renderRow(item, ctx);
        row.dataset.key = key;
        if (m) {
          // the keyboard user's place survives the redraw (a pressed chip,
          // Retry, the ⋯ button): the same control in the new row
          const focused = document.activeElement;
          const had = focused && m.el.contains(focused) ? focused : null;
          m.el.replaceWith(row);
          if (had) refocus(row, had, this.vp);
        }
        m = { el: row, sig };
        this.mounted.set(key, m);
      }
      m.el.style.top = (this.base + this.offsets[i]) + 'px';
      m.el.setAttribute('aria-posinset', String(i + 1));
      m.el.setAttribute('aria-setsize', String(n));
      // DOM order = list order (screen readers read it), moving only new rows
      const at = prev ? prev.nextSibling : this.rows.firstChild;
      if (m.el !== at) this.rows.insertBefore(m.el, at);
      prev = m.el;
      shown.push(i);
    }
    for (const [key, m] of this.mounted) {
      if (!want.has(key)) m.el.style.top = (this.base + this.offsets[this.index.get(key)]) + 'px';
    }
    let changed = false;
    for (const i of shown) {
      const key = this.keys[i];
      const h = this.mounted.get(key).el.offsetHeight;
      if (h && this.heights.get(key) !== h) {
        const was = this.heights.has(key) ? this.heights.get(key) : this.estimate(this.items[i]);
        this.heights.set(key, h);
        if (was !== h) changed = true;
      }
    }
    return changed;
  }

  scrollToKey(key) {
    const i = this.index.get(key);
    if (i === undefined) return false;
    this.stick = false;
    for (let pass = 0; pass < 4; pass++) {
      this.vp.scrollTop = Math.max(0, this.base + this.offsets[i] - this.vp.clientHeight / 3);
      if (!this.paint()) break;
      this.layout();
    }
    return true;
  }

  scrollToBottom() {
    this.stick = true;
    this.render(null);
  }

  rowOf(key) {
    const m = this.mounted.get(key);
    return m ? m.el : null;
  }
}

// ------------------------------------------------------------- messages --

function keyOf(m) {
  // stable from the optimistic copy to the stored one
  return m.client_msg_id ? 'c:' + m.sender + '\u0000' + m.client_msg_id : 'i:' + m.id;
}

function isMine(m) { return m.sender === S.me; }
function isSystem(m) { return m.format === 'system'; }

function hiddenByBlock(m) {
  return !isMine(m) && S.blocks.has(m.sender);
}

function tickState(m) {
  if (m.state) return m.state;
  if (m.seq == null) return 'sending';
  // history from before this page: work it out from the receipts
  const rs = (S.client.receipts(m.conversation_id) || []).filter((r) => r.user !== S.me);
  if (!rs.length) return 'sent';
  if (rs.every((r) => r.read_seq >= m.seq)) return 'read';
  if (rs.every((r) => r.delivered_seq >= m.seq)) return 'delivered';
  return 'sent';
}

const TICKS = {
  sending: ['◷', 'Sending'], sent: ['✓', 'Sent'], delivered: ['✓✓', 'Delivered'],
  read: ['✓✓', 'Read'], failed: ['!', 'Not sent'],
};

// the open conversation's messages by id (refreshMessages builds it): a
// reply row finds what it quotes without a scan on every paint
function findMessage(convId, id) {
  if (!id || convId !== S.openId) return null;
  const m = S.byId.get(id);
  return m && m.conversation_id === convId ? m : null;
}

function quoteText(m) {
  if (!m.reply_to) return '';
  const r = findMessage(m.conversation_id, m.reply_to);
  return r ? nameOf(r.sender) + ': ' + (hiddenByBlock(r) ? 'hidden message' : plain(r)).slice(0, 120)
    : 'Reply to an earlier message';
}

function showSender(m, prev) {
  if (isSystem(m)) return false;
  if (!prev || prev.sender !== m.sender || isSystem(prev)) return true;
  return new Date(m.created_at) - new Date(prev.created_at) > 5 * 60 * 1000;
}

function sigOf(m, ctx) {
  return [m.id, m.seq, tickState(m), m.body, m.edited_at, m.deleted, m.format, m.reply_to,
          JSON.stringify(m.reactions || []), (m.attachments || []).map((a) => a.id).join(),
          showSender(m, ctx.prev), (S.readBy.get(m.seq) || []).join(), hiddenByBlock(m),
          quoteText(m), m.error ? m.error.code : ''].join('\u0001');
}

function estimate(m) {
  if (isSystem(m)) return 34;
  let h = 46 + 20 * Math.floor((m.body || '').length / 60);
  for (const a of m.attachments || []) h += /^image\//.test(a.mime) ? 168 : 34;
  if (m.reactions && m.reactions.length) h += 26;
  if (m.reply_to) h += 22;
  return h;
}

const IMAGE_RE = /^image\/(png|jpeg|gif|webp)$/;

// The client fetches an attachment once with the token and keeps an object
// URL of what the server sent, typed as the server typed it. The server
// sends anything but a plain image as a download (Content-Disposition,
// nosniff, a sandboxing CSP); an object URL has none of that and would
// render an HTML file in this page's origin if opened. So files are handed
// out as application/octet-stream copies (only ever downloaded); images
// keep their type (for <img>).
const fileUrls = new Map();    // attachment id → Promise<object URL of the octet-stream copy>

function attachmentUrl(att) {
  if (IMAGE_RE.test(att.mime)) return S.client.attachmentUrl(att);
  let p = fileUrls.get(att.id);
  if (!p) {
    p = S.client.attachmentUrl(att).then(async (u) => {
      const blob = await (await fetch(u)).blob();
      return URL.createObjectURL(new Blob([blob], { type: 'application/octet-stream' }));
    });
    p.catch(() => fileUrls.delete(att.id));
    fileUrls.set(att.id, p);
    if (fileUrls.size > 50) {
      const [oldId, oldP] = fileUrls.entries().next().value;
      fileUrls.delete(oldId);
      oldP.then((u) => URL.revokeObjectURL(u), () => {});
    }
  }
  return p;
}

function renderAttachment(att) {
  if (IMAGE_RE.test(att.mime)) {
    // a fixed box: the row's height is known before the image loads
    const img = el('img', { alt: att.name || 'image', decoding: 'async' });
    attachmentUrl(att).then((u) => { img.src = u; }, () => { img.alt = 'Image unavailable: ' + att.name; });
    return el('span', { class: 'att-img' }, img);
  }
  // downloads need the token: fetched into an object URL on the first click
  const a = el('a', { class: 'att-file', href: '#', 'data-act': 'download', 'data-att': att.id,
                      download: att.name || 'file' },
               icon('file'),
               el('span', { class: 'fname' }, att.name || 'file'),
               el('span', { class: 'fsize' }, size(att.size)));
  return a;
}

function renderRow(m, ctx) {
  const mine = isMine(m);
  const system = isSystem(m);
  const hidden = hiddenByBlock(m);
  const row = el('div', {
    class: 'row ' + (system ? 'system' : mine ? 'mine' : 'theirs') + (m.deleted ? ' deleted' : '')
      + (hidden ? ' hidden-msg' : ''),
    role: 'listitem',
    dataset: { seq: m.seq == null ? '' : String(m.seq), id: m.id || '', sender: m.sender },
  });
  const bubble = el('div', { class: 'bubble' });
  row.append(bubble);
  if (system) {
    bubble.append(el('span', { class: 'sr-only' }, 'Platform notice: '));
    bubble.append(el('span', { class: 'body' }, emojify(m.body || '')));
    return row;
  }
  const meta = el('div', { class: 'meta' });
  if (showSender(m, ctx.prev) || !mine) {
    meta.append(el('span', { class: mine || !showSender(m, ctx.prev) ? 'sender sr-only' : 'sender' },
                   mine ? 'You' : nameOf(m.sender)));
  }
  meta.append(el('time', { datetime: m.created_at, title: fullTime(m.created_at) }, timeLabel(m.created_at)));
  if (m.edited_at && !m.deleted) meta.append(el('span', { class: 'edited' }, 'edited'));
  bubble.append(meta);

  if (m.reply_to && !m.deleted) {
    bubble.append(el('div', { class: 'quote' }, '↪ ' + quoteText(m)));
  }
  const body = el('div', { class: 'body' });
  if (m.deleted) {
    body.textContent = 'This message was deleted';
  } else if (hidden) {
    body.textContent = 'Message from someone you blocked';
  } else if (m.body) {
    appendRich(body, m.body, m.format === 'markdown');
  }
  if (body.firstChild) bubble.append(body);
  if (!m.deleted && !hidden && m.attachments && m.attachments.length) {
    bubble.append(el('div', { class: 'atts' }, ...m.attachments.map(renderAttachment)));
  }
  if (!m.deleted && m.reactions && m.reactions.length) {
    const rx = el('div', { class: 'reactions' });
    for (const r of m.reactions) {
      if (!r.count) continue;
      rx.append(el('button', {
        type: 'button', class: 'chip', 'data-act': r.me ? 'unreact' : 'react', 'data-emoji': r.emoji,
        'aria-pressed': r.me ? 'true' : 'false',
        'aria-label': `${r.emoji} ${r.count}${r.me ? ', including you' : ''}`,
      }, `${r.emoji} ${r.count}`));
    }
    bubble.append(rx);
  }
  const foot = el('div', { class: 'foot' });
  if (mine && !m.deleted) {
    const st = tickState(m);
    if (st === 'failed') {
      foot.append(el('span', { class: 'failed-note' },
                     el('span', { class: 'tick', dataset: { state: st }, 'aria-hidden': 'true' }, '!'),
                     'Not sent' + (m.error ? ': ' + errText(m.error) : ''),
                     el('button', { type: 'button', class: 'link-btn', 'data-act': 'retry' }, 'Retry'),
                     el('button', { type: 'button', class: 'link-btn', 'data-act': 'discard' }, 'Discard')));
    } else {
      const readers = S.readBy.get(m.seq);
      if (readers && readers.length) {
        foot.append(el('span', { class: 'readby' }, 'Seen by ' + readers.join(', ')));
      }
      foot.append(el('span', { class: 'tick', dataset: { state: st }, title: TICKS[st][1],
                               role: 'img', 'aria-label': TICKS[st][1] }, TICKS[st][0]));
    }
  }
  if (foot.firstChild) bubble.append(foot);
  if (m.id && !m.deleted) {
    row.append(el('button', { type: 'button', class: 'more', 'data-act': 'menu', 'aria-haspopup': 'menu',
                              'aria-expanded': 'false',
                              'aria-label': 'Actions for the message from ' + (mine ? 'you' : nameOf(m.sender)) },
                  '⋯'));
  }
  return row;
}

function computeReadBy(convId) {
  S.readBy = new Map();
  const c = S.client.conversation(convId);
  if (!c || c.kind !== 'group') return;
  const own = S.list.items.filter((m) => isMine(m) && m.seq != null).map((m) => m.seq);
  if (!own.length) return;
  for (const r of S.client.receipts(convId) || []) {
    if (r.user === S.me) continue;
    // the newest own message this member has read
    let lo = 0;
    let hi = own.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (own[mid] <= r.read_seq) lo = mid + 1;
      else hi = mid;
    }
    if (lo === 0) continue;
    const seq = own[lo - 1];
    if (!S.readBy.has(seq)) S.readBy.set(seq, []);
    S.readBy.get(seq).push(nameOf(r.user));
  }
}

let msgFrame = 0;
function scheduleMessages() {
  if (msgFrame) return;
  msgFrame = requestAnimationFrame(() => {
    msgFrame = 0;
    refreshMessages();
  });
}

// The stored messages the list shows: the run without a hole that ends at
// the newest one (plus the unsent ones after it). What the client holds can
// have a hole -- the cache of an earlier visit below the newest page -- and
// history is paged down from the top of this run until the hole is filled,
// so the list never shows a jump in the conversation.
function shownMessages(all) {
  let end = all.length;
  while (end > 0 && all[end - 1].seq == null) end--;
  let start = end - 1;
  while (start > 0 && all[start - 1].seq === all[start].seq - 1) start--;
  return start <= 0 ? all : all.slice(start);
}

function oldestShownSeq(id) {
  for (const m of shownMessages(S.client.messages(id))) if (m.seq != null) return m.seq;
  return Infinity;
}

function refreshMessages() {
  if (!S.openId) return;
  const items = shownMessages(S.client.messages(S.openId));
  S.list.items = items;             // computeReadBy reads the new items
  S.byId = new Map();
  for (const m of items) if (m.id) S.byId.set(m.id, m);
  computeReadBy(S.openId);
  S.list.update(items);
  afterScroll();
}

// ------------------------------------------------------- conversation list --

function others(c) {
  return (c.members || []).filter((m) => m !== S.me);
}

// The gig (title, budget, status, client) is what the platform says: a
// conversation's context counts only when the platform's service token
// made it. Anyone may create a conversation with any context and title;
// those show as their members' names.
function byPlatform(c) {
  return !!c && SERVICE_NAMES.has(c.created_by);
}

function gigContext(c) {
  return byPlatform(c) && c.context && typeof c.context === 'object' ? c.context : {};
}

function convTitle(c) {
  const ctx = gigContext(c);
  if (typeof ctx.title === 'string' && ctx.title) return ctx.title;
  if (c.title && byPlatform(c)) return c.title;
  return others(c).map(nameOf).join(', ') || 'Just you';
}

function presenceOf(uid) {
  const p = S.client.presence(uid);
  return p ? p.status : 'offline';
}

function convStatus(c) {
  if (c.kind === 'direct') {
    const o = others(c)[0];
    return o ? presenceOf(o) : 'offline';
  }
  return others(c).some((u) => presenceOf(u) === 'online') ? 'online' : 'offline';
}

function lastActivity(c) {
  const t = c.last_message ? Date.parse(c.last_message.created_at) : Date.parse(c.created_at);
  return isNaN(t) ? 0 : t;
}

function typingText(users) {
  if (!users || !users.length) return '';
  const names = users.map(nameOf);
  if (names.length === 1) return `${names[0]} is typing…`;
  if (names.length === 2) return `${names[0]} and ${names[1]} are typing…`;
  return 'Several people are typing…';
}

function gigLine(c) {
  const ctx = gigContext(c);
  const parts = [];
  const who = others(c);
  parts.push(c.kind === 'direct' ? 'with ' + (who.map(nameOf).join(', ') || 'nobody')
    : `${c.members.length} people`);
  if (ctx.budget != null) parts.push(money(ctx.budget, ctx.currency));
  return { text: parts.join(' · '), status: ctx.status ? String(ctx.status) : null };
}

function statusChip(status) {
  return el('span', { class: 'status status-' + status.replace(/[^a-z_]/g, '') },
            GIG_STATUS[status] || cap(status.replace(/_/g, ' ')));
}

let listFrame = 0;
function scheduleConvList() {
  if (listFrame) return;
  listFrame = requestAnimationFrame(() => {
    listFrame = 0;
    renderConvList();
  });
}

const convButtons = new Map();   // id → <li> (kept: focus survives updates)

function renderConvList() {
  const ul = $('conv-list');
  const convs = S.client.conversations().slice().sort((a, b) => lastActivity(b) - lastActivity(a));
  const keep = new Set();
  let prev = null;
  let total = 0;
  for (const c of convs) {
    keep.add(c.id);
    total += c.unread_count || 0;
    let li = convButtons.get(c.id);
    if (!li) {
      li = el('li', null, el('button', { type: 'button', class: 'conv-item', dataset: { id: c.id } }));
      convButtons.set(c.id, li);
    }
    const btn = li.firstChild;
    const unread = c.unread_count || 0;
    btn.className = 'conv-item' + (unread ? ' unread' : '');
    btn.setAttribute('aria-current', c.id === S.openId ? 'true' : 'false');
    const status = convStatus(c);
    const g = gigLine(c);
    const typing = S.typing.get(c.id);
    const lm = c.last_message;
    let preview = typing && typing.length ? typingText(typing)
      : lm ? (isSystem(lm) ? '' : lm.sender === S.me ? 'You: ' : c.kind === 'group' ? nameOf(lm.sender) + ': ' : '')
        + (hiddenByBlock(lm) ? 'Message from someone you blocked' : plain(lm))
        : 'No messages yet';
    const av = c.kind === 'direct' ? avatar(others(c)[0] || S.me, { status })
      : avatar(c.id, { status, label: convTitle(c) });
    btn.replaceChildren(
      av,
      el('span', { class: 'text' },
         el('span', { class: 'line' },
            el('span', { class: 'title' }, convTitle(c)),
            el('span', { class: 'time' }, lm ? timeLabel(lm.created_at) : '')),
         el('span', { class: 'gig' }, g.text, g.status ? ' · ' : '', g.status ? statusChip(g.status) : null,
            el('span', { class: 'sr-only' }, ', ' + status)),
         el('span', { class: 'line' },
            el('span', { class: 'preview' + (typing && typing.length ? ' typing-now' : '') }, preview),
            // (an aria-label on a plain span is not read: the words are text)
            unread ? el('span', { class: 'badge' }, String(unread)) : null,
            unread ? el('span', { class: 'sr-only' }, ' unread') : null)));
    const at = prev ? prev.nextSibling : ul.firstChild;
    if (li !== at) ul.insertBefore(li, at);
    prev = li;
  }
  for (const [id, li] of convButtons) {
    if (!keep.has(id)) {
      li.remove();
      convButtons.delete(id);
    }
  }
  if (!convs.length && !ul.firstChild) {
    ul.append(el('li', { class: 'result-empty' }, 'No gigs yet.'));
  } else {
    for (const li of [...ul.children]) if (!li.firstChild || !li.firstChild.dataset) li.remove();
  }
  setTitle(S.unreadTotal != null ? S.unreadTotal : total);
}

function setTitle(total) {
  document.title = total > 0 ? `(${total}) Chat` : 'Chat';
}

// ---------------------------------------------------------- conversation --

function renderHeader() {
  const c = S.client.conversation(S.openId);
  if (!c) return;
  $('conv-title').textContent = convTitle(c);
  const sub = $('conv-sub');
  if (c.kind === 'direct') {
    const o = others(c)[0];
    const p = o ? S.client.presence(o) : null;
    let status = p ? p.status : 'offline';
    if (status === 'offline' && p && p.last_seen) status = 'last seen ' + timeLabel(p.last_seen);
    // while this page is cut off, what it last heard may no longer be true
    if (S.info && S.info.state !== 'connected') status = 'status unknown (not connected)';
    const k = kindOf(o);
    sub.textContent = `${nameOf(o)}${k ? ' (' + k + ')' : ''} · ${status}`;
  } else {
    const online = others(c).filter((u) => presenceOf(u) === 'online').length;
    sub.textContent = c.members.map((u) => (u === S.me ? 'You' : nameOf(u))).join(', ')
      + ` · ${online} online`;
  }
  const ctx = gigContext(c);
  const bar = $('gig-bar');
  bar.replaceChildren();
  if (ctx.gig_id) {
    bar.append(el('span', null, 'Gig ', el('strong', null, String(ctx.gig_id))));
    if (ctx.budget != null) bar.append(el('span', null, 'Budget ', el('strong', null, money(ctx.budget, ctx.currency))));
    if (ctx.status) bar.append(statusChip(String(ctx.status)));
    if (ctx.client) bar.append(el('span', null, 'Client ', el('strong', null, nameOf(ctx.client))));
  }
  if (c.archived) bar.append(el('span', { class: 'status' }, 'Archived: read-only'));
  const blockBtn = $('block-btn');
  if (c.kind === 'direct' && others(c)[0]) {
    const o = others(c)[0];
    blockBtn.hidden = false;
    blockBtn.textContent = S.blocks.has(o) ? `Unblock ${nameOf(o)}` : `Block ${nameOf(o)}`;
    blockBtn.dataset.user = o;
  } else {
    blockBtn.hidden = true;
  }
}

function renderTyping() {
  $('typing').textContent = S.openId ? typingText(S.typing.get(S.openId)) : '';
}

function updatePill() {
  const pill = $('pill');
  if (S.pill > 0 && !S.list.atBottom()) {
    pill.hidden = false;
    pill.textContent = S.pill === 1 ? '1 new message ↓' : `${S.pill} new messages ↓`;
  } else {
    // a focused pill that goes away leaves the keyboard user on the messages
    if (document.activeElement === pill) S.list.vp.focus({ preventScroll: true });
    pill.hidden = true;
    if (S.list.atBottom()) S.pill = 0;
  }
}

// the conversation is being read: open, the page visible, scrolled to the end
function maybeMarkRead() {
  const id = S.openId;
  if (!id || S.holdRead.has(id) || document.visibilityState !== 'visible' || !S.list.atBottom()) return;
  // the items are in seq order, unsent ones last: the newest stored one
  // is found from the end
  let newest = 0;
  const items = S.list.items;
  for (let i = items.length - 1; i >= 0; i--) {
    if (items[i].seq != null) {
      newest = items[i].seq;
      break;
    }
  }
  const c = S.client.conversation(id);
  if (!newest || ((S.readAsked.get(id) || 0) >= newest && !(c && c.unread_count))) return;
  S.readAsked.set(id, newest);
  S.client.markRead(id);
}

function afterScroll() {
  if (!S.openId) return;
  updatePill();
  maybeMarkRead();
  if (S.list.vp.scrollTop < 400) loadOlder();
}

// keepScroll: a reload of the open conversation (resync) leaves a reader
// scrolled up in history where they are
async function openConversation(id, { seq = null, focus = false, keepScroll = false } = {}) {
  const client = S.client;
  let c = client.conversation(id);
  if (!c) {
    try {
      c = await client.loadConversation(id);
    } catch (e) {
      toast('Cannot open that conversation: ' + errText(e));
      return;
    }
  }
  const first = !S.loaded.has(id);
  const switching = S.openId !== id;
  if (switching) {
    saveDraft();
    S.openId = id;
    S.pill = 0;
    S.readBy = new Map();
    S.byId = new Map();
    S.list.reset();
    restoreDraft(id);
  }
  document.body.dataset.view = 'conv';
  $('conv-empty').hidden = true;
  $('conv-main').hidden = false;
  renderHeader();
  renderTyping();
  renderConvList();
  // on a phone the list (and the button pressed) is hidden now
  const active = document.activeElement;
  if (active && $('sidebar').contains(active) && !active.getClientRects().length) {
    $('conv-title').focus();
  }
  if (switching || seq != null || !keepScroll) S.list.stick = seq == null;
  if (first) {
    // Once per page: the newest page, then receipts (ticks, read-by) and the
    // unread count -- before this page marks anything read, because an
    // answer the server made before our read reached it puts the old
    // unread count back in the client (chat.js keeps the server's number)
    S.holdRead.add(id);
    try {
      refreshMessages();
      try {
        const page = await client.loadHistory(id, { limit: 50 });
        S.loaded.add(id);
        S.hasMore.set(id, page.next != null && page.messages.length > 0);
      } catch (e) {
        toast('Could not load the messages: ' + errText(e));
      }
      if (S.openId !== id) return;
      try {
        await client.loadConversation(id);
      } catch (e) { /* the list's copy will do */ }
    } finally {
      S.holdRead.delete(id);
    }
    if (S.openId !== id) return;
  }
  renderHeader();
  refreshMessages();
  const members = others(client.conversation(id) || c);
  if (members.length) {
    client.fetchPresence(members.slice(0, 100)).then(() => {
      if (S.openId === id) renderHeader();
      scheduleConvList();
    }, () => {});
  }
  if (seq != null) await jumpTo(id, seq);
  maybeMarkRead();
  if (focus) $('composer-input').focus();
}

// returnFocus: the person closed it (back button), so the focus goes back
// to the conversation's button in the list; not when the server removed it
function closeConversation({ returnFocus = true } = {}) {
  const left = S.openId;
  saveDraft();
  S.openId = null;
  S.byId = new Map();
  S.list.reset();
  document.body.dataset.view = 'list';
  $('conv-main').hidden = true;
  $('conv-empty').hidden = false;
  renderConvList();
  const li = left && convButtons.get(left);
  if (returnFocus && li) li.firstChild.focus();
}

// one page at a time; a caller that comes while one loads (a jump to a
// search result) gets that load's promise to wait for
function loadOlder() {
  if (S.olderLoad) return S.olderLoad;
  const id = S.openId;
  if (!id || !S.loaded.has(id) || S.hasMore.get(id) === false) return Promise.resolve();
  const oldest = oldestShownSeq(id);
  if (oldest <= 1 || oldest === Infinity) {
    S.hasMore.set(id, false);
    return Promise.resolve();
  }
  $('older').replaceChildren(el('span', null, 'Loading older messages…'));
  S.olderLoad = (async () => {
    try {
      const page = await S.client.loadHistory(id, { beforeSeq: oldest, limit: 100 });
      S.hasMore.set(id, page.next != null && page.messages.length > 0);
      if (S.openId === id) refreshMessages();
    } catch (e) {
      toast('Could not load older messages: ' + errText(e));
    } finally {
      S.olderLoad = null;
      $('older').replaceChildren();
    }
    // still near the top (a fast scroll, a tall screen): the next page
    if (S.openId === id && S.hasMore.get(id) && S.list.vp.scrollTop < 400) {
      setTimeout(loadOlder, 0);
    }
  })();
  return S.olderLoad;
}

async function jumpTo(id, seq) {
  let stuck = 0;
  for (let n = 0; n < 200 && S.openId === id; n++) {
    const m = shownMessages(S.client.messages(id)).find((x) => x.seq === seq);
    if (m) {
      refreshMessages();
      S.list.scrollToKey(keyOf(m));
      const row = S.list.rowOf(keyOf(m));
      if (row) {
        row.classList.add('flash');
        setTimeout(() => row.classList.remove('flash'), 2000);
      }
      return true;
    }
    if (S.hasMore.get(id) === false) break;
    S.hasMore.set(id, true);
    const before = oldestShownSeq(id);
    const busy = !!S.olderLoad;
    await loadOlder();
    // a load that could not add anything (it failed, the first page is not
    // there yet) is not waited on forever; another load's end is no answer
    if (!busy && oldestShownSeq(id) === before && ++stuck >= 3) break;
  }
  toast('That message is no longer available.');
  return false;
}

// ------------------------------------------------------------ composer --

function autosize() {
  const t = $('composer-input');
  t.style.height = 'auto';
  t.style.height = Math.min(t.scrollHeight + 2, 140) + 'px';
}

function clearComposerContext() {
  S.replyTo = null;
  S.editing = null;
  $('composer-ctx').hidden = true;
  $('send-btn').textContent = 'Send';
}

function setComposerContext(text) {
  $('composer-ctx-text').textContent = text;
  $('composer-ctx').hidden = false;
}

function startReply(m) {
  clearComposerContext();
  S.replyTo = m;
  setComposerContext(`Replying to ${nameOf(m.sender)}: ${plain(m).slice(0, 80)}`);
  $('composer-input').focus();
}

function startEdit(m, { text = m.body || '', focus = true } = {}) {
  clearComposerContext();
  S.editing = m;
  setComposerContext('Editing your message');
  $('send-btn').textContent = 'Save';
  const t = $('composer-input');
  t.value = text;
  autosize();
  if (focus) t.focus();
}

// What was being written stays with its conversation: the text, the files
// (finished or still uploading; failed ones are dropped), the reply or edit.
function saveDraft() {
  const id = S.openId;
  if (!id) return;
  const text = $('composer-input').value;
  const uploads = S.uploads.filter((u) => u.state !== 'error');
  if (text.trim() || uploads.length || S.replyTo || S.editing) {
    S.drafts.set(id, { text, uploads, replyTo: S.replyTo, editing: S.editing });
  } else {
    S.drafts.delete(id);
  }
}

function restoreDraft(id) {
  const d = S.drafts.get(id);
  S.drafts.delete(id);
  clearComposerContext();
  S.uploads = d ? d.uploads : [];
  renderUploads();
  const t = $('composer-input');
  if (d && d.editing) {
    startEdit(d.editing, { text: d.text, focus: false });
    return;
  }
  t.value = d ? d.text : '';
  autosize();
  if (d && d.replyTo) {
    S.replyTo = d.replyTo;
    setComposerContext(`Replying to ${nameOf(d.replyTo.sender)}: ${plain(d.replyTo).slice(0, 80)}`);
  }
}

function clearUploads() {
  S.uploads = [];
  renderUploads();
}

function renderUploads() {
  const ul = $('uploads');
  ul.replaceChildren(...S.uploads.map((u, i) => el('li', { dataset: { state: u.state } },
    icon(u.state === 'error' ? 'alert' : 'clip'),
    el('span', { class: 'fname' }, u.name),
    el('span', { class: 'sr-only' }, u.state === 'uploading' ? ' uploading' : u.state === 'error' ? ' failed' : ' ready'),
    u.state === 'error' ? el('span', null, u.error) : null,
    el('button', { type: 'button', class: 'link-btn', 'data-upload': String(i),
                   'aria-label': 'Remove ' + u.name }, '✕'))));
  ul.hidden = !S.uploads.length;
  $('send-btn').disabled = S.uploads.some((u) => u.state === 'uploading');
}

function startUpload(file) {
  const u = { name: file.name || 'file', state: 'uploading', att: null, error: null };
  S.uploads.push(u);
  renderUploads();
  S.client.upload(file, u.name).then((att) => {
    u.state = 'done';
    u.att = att;
  }, (err) => {
    u.state = 'error';
    u.error = errText(err);
  }).finally(renderUploads);
}

async function submitComposer(ev) {
  if (ev) ev.preventDefault();
  const id = S.openId;
  if (!id) return;
  const input = $('composer-input');
  const body = input.value.trim();
  if (S.editing) {
    const m = S.editing;
    if (!body) return;
    clearComposerContext();
    input.value = '';
    autosize();
    try {
      await S.client.edit(m.id, body);
    } catch (e) {
      toast('Could not edit: ' + errText(e));
      // the text is not lost: back in the box, still an edit (or kept as
      // that conversation's draft when the person has moved on)
      if (S.openId === id && !input.value.trim() && !S.editing && !S.replyTo) {
        const here = document.activeElement === input || document.activeElement === document.body;
        startEdit(m, { text: body, focus: here });
      } else if (S.openId !== id && !S.drafts.has(id)) {
        S.drafts.set(id, { text: body, uploads: [], replyTo: null, editing: m });
      }
    }
    return;
  }
  if (S.uploads.some((u) => u.state === 'uploading')) {
    toast('Wait for the upload to finish.');
    return;
  }
  // what upload() answered (not just the ids): a message waiting to be
  // sent shows its files' names and sizes
  const atts = S.uploads.filter((u) => u.state === 'done').map((u) => u.att);
  if (!body && !atts.length) return;
  const opts = { format: 'markdown' };
  if (S.replyTo && S.replyTo.id) opts.reply_to = S.replyTo.id;
  if (atts.length) opts.attachments = atts;
  input.value = '';
  autosize();
  clearComposerContext();
  clearUploads();
  S.client.stopTyping(id);
  S.list.stick = true;
  S.pill = 0;
  try {
    await S.client.send(id, body, opts);
  } catch (e) {
    // the message stays in the list as failed, with Retry and Discard
  }
}

function lastOwnMessage() {
  const items = S.list.items;
  for (let i = items.length - 1; i >= 0; i--) {
    const m = items[i];
    if (isMine(m) && m.id && !m.deleted && !isSystem(m)) return m;
  }
  return null;
}

// --------------------------------------------------- menus and dialogs --

let menuFor = null;

function closeMenu(returnFocus = true) {
  const menu = $('menu');
  if (menu.hidden) return;
  menu.hidden = true;
  let btn = menuFor && menuFor.button;
  if (btn && !btn.isConnected && menuFor.key) {
    // the row was redrawn while the menu was open: its new ⋯ button
    const row = S.list.rowOf(menuFor.key);
    btn = row && row.querySelector('[data-act="menu"]');
  }
  if (btn) btn.setAttribute('aria-expanded', 'false');
  menuFor = null;
  if (returnFocus && btn && btn.isConnected) btn.focus();
}

function placePopup(pop, anchor) {
  const r = anchor.getBoundingClientRect();
  pop.style.left = '0px';
  pop.style.top = '0px';
  const w = pop.offsetWidth;
  const h = pop.offsetHeight;
  const left = Math.max(8, Math.min(r.right - w, window.innerWidth - w - 8));
  const top = r.bottom + h + 8 < window.innerHeight ? r.bottom + 4 : Math.max(8, r.top - h - 4);
  pop.style.left = left + 'px';
  pop.style.top = top + 'px';
}

function openMenu(m, button) {
  closeMenu(false);
  const menu = $('menu');
  const mine = isMine(m);
  const items = [];
  if (!m.deleted && !isSystem(m)) {
    items.push(el('div', { class: 'emojis', role: 'group', 'aria-label': 'React' },
      ...QUICK_EMOJI.map((e) => el('button', { type: 'button', role: 'menuitem', 'data-menu': 'react',
                                              'data-emoji': e, 'aria-label': 'React with ' + e }, e))));
    items.push(el('button', { type: 'button', class: 'item', role: 'menuitem', 'data-menu': 'reply' }, 'Reply'));
  }
  if (mine && !m.deleted && !isSystem(m)) {
    items.push(el('button', { type: 'button', class: 'item', role: 'menuitem', 'data-menu': 'edit' }, 'Edit'));
    items.push(el('button', { type: 'button', class: 'item danger', role: 'menuitem', 'data-menu': 'delete' },
                  'Delete for everyone'));
  }
  if (!mine && !isSystem(m)) {
    items.push(el('button', { type: 'button', class: 'item', role: 'menuitem', 'data-menu': 'report' },
                  'Report message…'));
    items.push(el('button', { type: 'button', class: 'item danger', role: 'menuitem', 'data-menu': 'block' },
                  S.blocks.has(m.sender) ? `Unblock ${nameOf(m.sender)}` : `Block ${nameOf(m.sender)}`));
  }
  if (!items.length) return;
  menu.replaceChildren(...items);
  menu.hidden = false;
  menuFor = { message: m, button, key: keyOf(m) };
  button.setAttribute('aria-expanded', 'true');
  placePopup(menu, button);
  const first = menu.querySelector('button');
  if (first) first.focus();
}

async function menuAction(act, emoji) {
  const { message: m } = menuFor || {};
  if (!m) return;
  closeMenu(act !== 'reply' && act !== 'edit');
  try {
    if (act === 'react') await reactToggle(m, emoji);
    else if (act === 'reply') startReply(m);
    else if (act === 'edit') startEdit(m);
    else if (act === 'delete') {
      if (confirm('Delete this message for everyone?')) await S.client.delete(m.id);
    } else if (act === 'report') openReport(m);
    else if (act === 'block') await toggleBlock(m.sender);
  } catch (e) {
    toast(errText(e));
  }
}

async function reactToggle(m, emoji) {
  const mineAlready = (m.reactions || []).some((r) => r.emoji === emoji && r.me);
  if (mineAlready) await S.client.unreact(m.id, emoji);
  else await S.client.react(m.id, emoji);
}

async function toggleBlock(user) {
  if (S.blocks.has(user)) {
    await S.client.unblock(user);
    S.blocks.delete(user);
    toast(`You unblocked ${nameOf(user)}.`);
  } else {
    if (!confirm(`Block ${nameOf(user)}? They will not be able to message you directly.`)) return;
    await S.client.block(user);
    S.blocks.add(user);
    toast(`You blocked ${nameOf(user)}.`);
  }
  if (S.openId) {
    renderHeader();
    S.list.refresh();
  }
  renderConvList();
}

function openReport(m) {
  const dlg = $('report-dialog');
  $('report-quote').textContent = `${nameOf(m.sender)}: ${plain(m).slice(0, 200)}`;
  $('report-note').value = '';
  $('report-reason').value = 'spam';
  dlg.returnValue = '';
  dlg.onclose = async () => {
    if (dlg.returnValue !== 'report') return;
    try {
      await S.client.report(m.id, $('report-reason').value, $('report-note').value.trim() || undefined);
      toast('Thanks — the platform team will look at it.');
    } catch (e) {
      toast('Could not report: ' + errText(e));
    }
  };
  dlg.showModal();
}

function openEmojiPicker(button) {
  const pop = $('emoji-pop');
  if (!pop.hidden) {
    closeEmoji();
    return;
  }
  pop.replaceChildren(...PICKER_EMOJI.map((e) => el('button', { type: 'button', 'data-emoji': e,
                                                                'aria-label': e }, e)));
  pop.hidden = false;
  button.setAttribute('aria-expanded', 'true');
  placePopup(pop, button);
  pop.querySelector('button').focus();
}

function closeEmoji(returnFocus = true) {
  const pop = $('emoji-pop');
  if (pop.hidden) return;
  pop.hidden = true;
  $('emoji-btn').setAttribute('aria-expanded', 'false');
  if (returnFocus) $('emoji-btn').focus();
}

function insertAtCaret(text) {
  const t = $('composer-input');
  const s = t.selectionStart ?? t.value.length;
  const e = t.selectionEnd ?? t.value.length;
  t.value = t.value.slice(0, s) + text + t.value.slice(e);
  t.selectionStart = t.selectionEnd = s + text.length;
  autosize();
}

// ------------------------------------------------------- notifications --

function updateNotifyButton() {
  const b = $('notify-btn');
  if (!('Notification' in window)) {
    b.hidden = true;
    return;
  }
  const p = Notification.permission;
  b.disabled = p === 'denied';
  b.textContent = p === 'denied' ? 'Notifications blocked' : p === 'granted'
    ? 'Notifications' : 'Enable notifications';
  b.setAttribute('aria-pressed', p === 'granted' && S.notifyOn ? 'true' : 'false');
}

function beep() {
  if (!S.sound) return;
  try {
    S.audio = S.audio || new AudioContext();
    const t = S.audio.currentTime;
    const o = S.audio.createOscillator();
    const g = S.audio.createGain();
    o.frequency.value = 880;
    g.gain.setValueAtTime(0.0001, t);
    g.gain.exponentialRampToValueAtTime(0.2, t + 0.02);
    g.gain.exponentialRampToValueAtTime(0.0001, t + 0.25);
    o.connect(g).connect(S.audio.destination);
    o.start(t);
    o.stop(t + 0.3);
  } catch (e) { /* no audio: nothing to do */ }
}

function notifyUser(m) {
  beep();
  if (!S.notifyOn || !('Notification' in window) || Notification.permission !== 'granted') return;
  const c = S.client.conversation(m.conversation_id);
  const title = isSystem(m) ? convTitle(c || {}) : `${nameOf(m.sender)} · ${c ? convTitle(c) : 'Chat'}`;
  try {
    const n = new Notification(title, { body: plain(m).slice(0, 140), tag: 'chat-' + m.conversation_id });
    n.onclick = () => {
      window.focus();
      openConversation(m.conversation_id, { focus: true });
      n.close();
    };
  } catch (e) { /* some browsers only notify from a service worker */ }
}

// --------------------------------------------------------- connection --

let bannerTimer = 0;
let countdown = 0;
let hadTrouble = false;

function showBanner(info) {
  const b = $('banner');
  clearTimeout(bannerTimer);
  clearInterval(countdown);
  if (info.state === 'retrying' || info.state === 'offline') hadTrouble = true;
  if (info.state === 'connected' || info.state === 'idle') {
    // "Connected" is news only after trouble, not after the first connect
    if (hadTrouble && info.state === 'connected') {
      hadTrouble = false;
      b.dataset.state = 'connected';
      b.textContent = info.text || 'Connected';
      bannerTimer = setTimeout(() => {
        b.hidden = true;
      }, 1500);
    } else {
      b.hidden = true;
    }
    return;
  }
  b.dataset.state = info.state;
  b.textContent = info.text || cap(info.state);
  b.hidden = false;
  // the client says "retrying in N s" once; count it down here. The banner
  // is a live region: the changing number is hidden from screen readers
  // (they hear "retrying shortly" once per state, not a tick a second)
  const when = /\bin \d+ ?s\b/;
  const k = (info.text || '').search(when);
  if (info.state === 'retrying' && info.retryAt && k >= 0) {
    const len = info.text.match(when)[0].length;
    const num = el('span', { 'aria-hidden': 'true' }, info.text.slice(k, k + len));
    b.replaceChildren(info.text.slice(0, k), num, el('span', { class: 'sr-only' }, 'shortly'),
                      info.text.slice(k + len));
    countdown = setInterval(() => {
      const s = Math.max(0, Math.ceil((info.retryAt - Date.now()) / 1000));
      num.textContent = `in ${s} s`;
      if (!s) clearInterval(countdown);
    }, 1000);
  }
}

const TRANSPORT_NAMES = { websocket: 'WebSocket', sse: 'SSE', poll: 'Long-poll' };

function showTransport(info) {
  const t = $('transport');
  const up = info && info.state === 'connected' && info.transport;
  const name = up ? TRANSPORT_NAMES[info.transport] || info.transport : 'not connected';
  // the leader holds the connection; other tabs of this browser relay
  const role = info && info.leader ? 'leader' : 'via another tab';
  t.textContent = `${name} · ${role}`;
  t.dataset.transport = up ? info.transport : '';
  t.dataset.leader = info && info.leader ? 'true' : 'false';
}

// --------------------------------------------------------------- search --

let searchTimer = 0;

function clearSearch() {
  S.searchSeq++;
  $('search-input').value = '';
  $('search-results').hidden = true;
  $('search-clear').hidden = true;
  $('result-list').replaceChildren();
}

async function runSearch(q) {
  const seqNo = ++S.searchSeq;
  const list = $('result-list');
  $('search-results').hidden = false;
  $('search-clear').hidden = false;
  list.replaceChildren(el('li', { class: 'result-empty' }, 'Searching…'));
  let res;
  let blocked;
  try {
    // the people this user blocks (asked again: another tab may have
    // blocked someone) are not found either
    [res, blocked] = await Promise.all([
      S.client.search(q, { limit: 20 }),
      S.client.blocks().catch(() => []),
    ]);
  } catch (e) {
    if (seqNo === S.searchSeq) list.replaceChildren(el('li', { class: 'result-empty' }, errText(e)));
    return;
  }
  if (seqNo !== S.searchSeq) return;
  blocked = new Set([...S.blocks, ...(blocked || [])]);
  const results = ((res && (res.results || res)) || [])
    .filter((r) => { const m = r.message || r; return m.sender === S.me || !blocked.has(m.sender); });
  if (!results.length) {
    list.replaceChildren(el('li', { class: 'result-empty' }, 'No messages match.'));
    return;
  }
  $('search-title').textContent = `Results (${results.length}${res.next ? '+' : ''})`;
  list.replaceChildren(...results.map((r) => {
    const m = r.message || r;
    const c = S.client.conversation(m.conversation_id);
    const snippet = el('span', { class: 'snippet' });
    if (r.snippet) appendSnippet(snippet, r.snippet);
    else snippet.append(plain(m));
    return el('li', null, el('button', {
      type: 'button', class: 'result-item',
      dataset: { conv: m.conversation_id, seq: m.seq == null ? '' : String(m.seq) },
    }, el('span', { class: 'where' },
          `${c ? convTitle(c) : 'Conversation'} · ${nameOf(m.sender)} · ${timeLabel(m.created_at)}`),
       snippet));
  }));
}

// ------------------------------------------------------------- sign-in --

function showSignin() {
  document.title = 'Sign in · Chat';
  $('signin').hidden = false;
  $('user-list').replaceChildren(...DEMO_USERS.map((u) => el('li', null,
    el('a', { class: 'user-card', href: '?user=' + encodeURIComponent(u.id) },
       avatar(u.id),
       el('span', { class: 'who' },
          el('span', { class: 'name' }, u.name,
             el('span', { class: 'role role-' + u.kind }, cap(u.kind))),
          el('span', { class: 'blurb' }, u.blurb))))));
}

// ---------------------------------------------------------------- wiring --

function tokenProvider(user) {
  return async () => {
    const r = await fetch('/demo/token?user=' + encodeURIComponent(user), { cache: 'no-store' });
    if (!r.ok) throw new Error('the token endpoint answered ' + r.status);
    const j = await r.json();
    if (j.kind) S.kind = j.kind;
    return j.token;
  };
}

function wireClient(client) {
  client.on('state', (info) => {
    S.info = info;
    showBanner(info);
    showTransport(info);
    if (S.openId) renderHeader();
  });
  client.on('leader', () => showTransport(client.info));
  client.on('conversation', (c) => {
    if (c.removed) {
      // left or removed from it: nothing of it may stay on screen
      S.drafts.delete(c.id);
      if (c.id === S.openId) closeConversation({ returnFocus: false });
      scheduleConvList();
      return;
    }
    if (!S.seenSeq.has(c.id)) S.seenSeq.set(c.id, c.last_seq || 0);
    scheduleConvList();
    if (c.id === S.openId) renderHeader();
  });
  client.on('message', (m) => {
    const cid = m.conversation_id;
    const isNew = m.seq != null && m.seq > (S.seenSeq.get(cid) || 0);
    if (isNew) S.seenSeq.set(cid, m.seq);
    const fromOther = !isMine(m) && !m.deleted && !hiddenByBlock(m);
    if (cid === S.openId) {
      scheduleMessages();
      if (isNew && fromOther) {
        announce(`${isSystem(m) ? 'Notice' : nameOf(m.sender)}: ${plain(m).slice(0, 200)}`);
        if (!S.list.stick) S.pill++;
      }
    }
    if (isNew && fromOther && (cid !== S.openId || document.visibilityState !== 'visible')) notifyUser(m);
    scheduleConvList();
  });
  client.on('typing', ({ conversation_id: cid, users }) => {
    S.typing.set(cid, users || []);
    if (cid === S.openId) renderTyping();
    scheduleConvList();
  });
  client.on('presence', () => {
    scheduleConvList();
    if (S.openId) renderHeader();
  });
  client.on('receipt', ({ conversation_id: cid }) => {
    if (cid === S.openId) scheduleMessages();
  });
  client.on('unread', ({ total }) => {
    S.unreadTotal = total;
    setTitle(total);
  });
  client.on('resync', () => {
    S.loaded.clear();
    S.hasMore.clear();
    if (S.openId) openConversation(S.openId, { keepScroll: true });
    client.loadConversations().then(scheduleConvList, () => {});
  });
}

function wireUI() {
  S.list = new WindowedList($('viewport'), $('rows'), {
    keyOf, sigOf, renderRow, estimate, onScroll: afterScroll,
  });

  $('conv-list').addEventListener('click', (ev) => {
    const b = ev.target.closest('.conv-item');
    if (b) openConversation(b.dataset.id);
  });
  $('result-list').addEventListener('click', (ev) => {
    const b = ev.target.closest('.result-item');
    if (!b) return;
    const seq = b.dataset.seq ? Number(b.dataset.seq) : null;
    openConversation(b.dataset.conv, { seq });
  });
  $('back-btn').addEventListener('click', () => closeConversation());
  $('pill').addEventListener('click', () => {
    S.pill = 0;
    S.list.scrollToBottom();
    afterScroll();
  });
  $('block-btn').addEventListener('click', (ev) => {
    toggleBlock(ev.currentTarget.dataset.user).catch((e) => toast(errText(e)));
  });

  // message rows: one listener for every row (rows come and go)
  $('rows').addEventListener('click', async (ev) => {
    const t = ev.target.closest('[data-act]');
    if (!t) return;
    const row = t.closest('.row');
    const i = row ? S.list.index.get(row.dataset.key) : undefined;
    const m = i === undefined ? null : S.list.items[i];
    if (!m) return;
    const act = t.dataset.act;
    try {
      if (act === 'menu') openMenu(m, t);
      else if (act === 'retry') await S.client.retry(m.client_msg_id);
      else if (act === 'discard') await S.client.discard(m.client_msg_id);
      else if (act === 'react') await S.client.react(m.id, t.dataset.emoji);
      else if (act === 'unreact') await S.client.unreact(m.id, t.dataset.emoji);
      else if (act === 'download') {
        ev.preventDefault();
        const att = (m.attachments || []).find((a) => a.id === t.dataset.att);
        if (!att) return;
        if (!t.dataset.ready) {
          t.setAttribute('aria-busy', 'true');
          const url = await attachmentUrl(att);
          t.removeAttribute('aria-busy');
          t.href = url;
          t.dataset.ready = '1';
        }
        // a fresh anchor: the row may have been re-rendered meanwhile
        const a = el('a', { href: t.href, download: att.name || 'file' });
        document.body.append(a);
        a.click();
        a.remove();
      }
    } catch (e) {
      toast(errText(e));
    }
  });

  const menu = $('menu');
  menu.addEventListener('click', (ev) => {
    const b = ev.target.closest('[data-menu]');
    if (b) menuAction(b.dataset.menu, b.dataset.emoji);
  });
  menu.addEventListener('keydown', (ev) => {
    const items = [...menu.querySelectorAll('button')];
    const i = items.indexOf(document.activeElement);
    if (ev.key === 'Escape') {
      ev.preventDefault();
      closeMenu();
    } else if (ev.key === 'ArrowDown' || ev.key === 'ArrowRight') {
      ev.preventDefault();
      items[(i + 1) % items.length].focus();
    } else if (ev.key === 'ArrowUp' || ev.key === 'ArrowLeft') {
      ev.preventDefault();
      items[(i - 1 + items.length) % items.length].focus();
    } else if (ev.key === 'Tab') {
      // the menu is not in the page's tab order: Tab leaves it for its button
      ev.preventDefault();
      closeMenu();
    }
  });
  document.addEventListener('pointerdown', (ev) => {
    if (!menu.hidden && !menu.contains(ev.target) && !ev.target.closest('[data-act="menu"]')) closeMenu(false);
    const pop = $('emoji-pop');
    if (!pop.hidden && !pop.contains(ev.target) && ev.target !== $('emoji-btn')) closeEmoji(false);
  });

  $('emoji-btn').addEventListener('click', (ev) => openEmojiPicker(ev.currentTarget));
  $('emoji-pop').addEventListener('click', (ev) => {
    const b = ev.target.closest('[data-emoji]');
    if (!b) return;
    insertAtCaret(b.dataset.emoji);
    closeEmoji(false);
    $('composer-input').focus();
  });
  $('emoji-pop').addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape' || ev.key === 'Tab') {
      ev.preventDefault();
      closeEmoji();
    }
  });

  const input = $('composer-input');
  $('composer').addEventListener('submit', submitComposer);
  input.addEventListener('input', () => {
    autosize();
    if (!S.openId || S.editing) return;
    // typing is about a message on its way: an emptied box is none
    if (input.value.trim()) S.client.typing(S.openId);
    else S.client.stopTyping(S.openId);
  });
  input.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $('composer').requestSubmit();
    } else if (ev.key === 'Escape' && (S.replyTo || S.editing)) {
      if (S.editing) input.value = '';
      clearComposerContext();
      autosize();
    } else if (ev.key === 'ArrowUp' && !input.value) {
      const m = lastOwnMessage();
      if (m) {
        ev.preventDefault();
        startEdit(m);
      }
    }
  });
  input.addEventListener('paste', (ev) => {
    const files = [...(ev.clipboardData && ev.clipboardData.files) || []];
    if (files.length && S.openId) {
      ev.preventDefault();
      files.forEach(startUpload);
    }
  });
  $('composer-ctx-cancel').addEventListener('click', () => {
    if (S.editing) input.value = '';
    clearComposerContext();
    input.focus();
  });
  $('attach-btn').addEventListener('click', () => $('file-input').click());
  $('file-input').addEventListener('change', (ev) => {
    for (const f of ev.target.files) startUpload(f);
    ev.target.value = '';
  });
  $('uploads').addEventListener('click', (ev) => {
    const b = ev.target.closest('[data-upload]');
    if (!b) return;
    S.uploads.splice(Number(b.dataset.upload), 1);
    renderUploads();
    input.focus();
  });
  const conv = $('conv');
  conv.addEventListener('dragover', (ev) => {
    if (S.openId && ev.dataTransfer && [...ev.dataTransfer.types].includes('Files')) ev.preventDefault();
  });
  conv.addEventListener('drop', (ev) => {
    if (!S.openId || !ev.dataTransfer || !ev.dataTransfer.files.length) return;
    ev.preventDefault();
    [...ev.dataTransfer.files].forEach(startUpload);
  });

  const search = $('search-input');
  $('search-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    clearTimeout(searchTimer);
    if (search.value.trim()) runSearch(search.value.trim());
  });
  search.addEventListener('input', () => {
    clearTimeout(searchTimer);
    const q = search.value.trim();
    if (!q) {
      clearSearch();
      return;
    }
    if (q.length >= 2) searchTimer = setTimeout(() => runSearch(q), 300);
  });
  search.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape') clearSearch();
  });
  $('search-clear').addEventListener('click', () => {
    clearSearch();
    search.focus();
  });

  $('notify-btn').addEventListener('click', async () => {
    // permission is asked on this click only (browsers want a gesture)
    if (Notification.permission === 'default') {
      await Notification.requestPermission();
      S.notifyOn = true;
    } else if (Notification.permission === 'granted') {
      S.notifyOn = !S.notifyOn;
    }
    pref('chat-demo-notify', S.notifyOn ? 'on' : 'off');
    updateNotifyButton();
  });
  $('sound-btn').addEventListener('click', (ev) => {
    S.sound = !S.sound;
    pref('chat-demo-sound', S.sound ? 'on' : 'off');
    ev.currentTarget.setAttribute('aria-pressed', String(S.sound));
    if (S.sound) beep();   // also unlocks audio, inside the gesture
  });
  $('sound-btn').setAttribute('aria-pressed', String(S.sound));
  $('signout-btn').addEventListener('click', async () => {
    try {
      await S.client.close();
    } finally {
      location.href = location.pathname;
    }
  });

  document.addEventListener('visibilitychange', maybeMarkRead);
  window.addEventListener('focus', maybeMarkRead);
  document.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape' && document.body.dataset.view === 'conv' && !menu.hidden) closeMenu();
  });
}

// client/chat-sw.js: where the browser has Background Sync, messages written
// offline go out when the network returns even if this tab was closed. It
// only needs to be registered (from this origin), not to control the page.
function outboxWorker() {
  if (!('serviceWorker' in navigator) || !window.isSecureContext) return undefined;
  return navigator.serviceWorker.register('/client/chat-sw.js', { scope: '/client/' })
    .catch(() => null);
}

async function startChat(user) {
  $('app').hidden = false;
  wireUI();
  updateNotifyButton();
  showTransport(null);
  const client = new ChatClient({ url: '/chat', token: tokenProvider(user), storage: 'chat-demo-' + user,
                                  serviceWorker: outboxWorker() });
  S.client = client;
  S.me = user;
  wireClient(client);
  await client.start();
  S.me = (client.user && client.user.id) || user;
  const kind = S.kind || kindOf(S.me);
  // (replaceChildren would print a null as the text "null")
  $('me').replaceChildren(...[avatar(S.me, { small: true }),
                              el('span', null, nameOf(S.me)),
                              kind ? el('span', { class: 'role role-' + kind }, cap(kind)) : null]
    .filter(Boolean));
  const convs = await client.loadConversations();
  for (const c of convs) if (!S.seenSeq.has(c.id)) S.seenSeq.set(c.id, c.last_seq || 0);
  renderConvList();
  client.blocks().then((list) => {
    S.blocks = new Set(list);
    if (S.openId) {
      renderHeader();
      S.list.refresh();
    }
    scheduleConvList();
  }, () => {});
  const people = [...new Set(convs.flatMap(others))].slice(0, 100);
  if (people.length) client.fetchPresence(people).then(scheduleConvList, () => {});

  const gig = params.get('gig');
  let open = params.get('conv');
  if (gig) open = conversationForGig(gig);
  if (open) await openConversation(open);
  return { user: S.me };
}

function conversationForGig(gigId) {
  const c = S.client && S.client.conversations().find((x) => gigContext(x).gig_id === gigId);
  return c ? c.id : null;
}

function boot() {
  const user = params.get('user');
  if (!user || !USER_RE.test(user)) {
    showSignin();
    return Promise.resolve({ user: null });
  }
  return startChat(user);
}

const ready = boot();
ready.catch((e) => {
  const b = $('banner');
  b.hidden = false;
  b.dataset.state = 'closed';
  b.textContent = 'The chat could not start: ' + errText(e);
});

window.demo = {
  ready,
  get client() { return S.client; },
  get user() { return S.me; },
  get openId() { return S.openId; },
  openConversation,
  closeConversation,
  conversationForGig,
  rows: () => document.querySelectorAll('#rows > .row').length,
  held: () => (S.list ? S.list.items.length : 0),
  scrollToTop: () => {
    S.list.stick = false;
    S.list.vp.scrollTop = 0;
  },
  scrollToBottom: () => S.list.scrollToBottom(),
  atBottom: () => S.list.atBottom(),
  hasMore: () => S.hasMore.get(S.openId) !== false,
  seqs: () => (S.list ? S.list.items.map((m) => m.seq) : []),
};

// ngx_chat_module: the outbox sender for Background Sync (a service worker).
//
// A page that uses client/chat.js with { serviceWorker: registration } lets
// the browser send what waits in the client's outbox when the network comes
// back, even after every tab of the chat was closed.  Serve this file from
// the page's own origin (a service worker cannot come from elsewhere):
//
//   const reg = await navigator.serviceWorker.register('/chat-sw.js');
//   new ChatClient({ url, token, serviceWorker: reg });
//
// What it reads: the registry database "ngx-chat-sync" that chat.js keeps
// (one row per outbox: its database, the chat location and the user's
// current token), and each outbox.  It sends in the order typed, with each
// message's client_msg_id: if a tab is sending the same message at the
// same moment, the server stores it once.  Browsers without Background
// Sync (Firefox, Safari) never start it; their tabs send the outbox.

'use strict';

const TAG = 'ngx-chat-outbox';
const REGISTRY = 'ngx-chat-sync';
const PERMANENT = ['bad_request', 'forbidden', 'not_found', 'blocked', 'archived', 'conflict',
                   'too_large', 'unsupported_type', 'limit'];

function idb(rq) {
  return new Promise((resolve, reject) => {
    rq.onsuccess = () => resolve(rq.result);
    rq.onerror = () => reject(rq.error);
  });
}

function openDb(name, upgrade) {
  const rq = indexedDB.open(name, 1);
  rq.onupgradeneeded = () => upgrade(rq.result);
  return idb(rq);
}

function store(db, name, mode) {
  return db.transaction(name, mode).objectStore(name);
}

async function sendOutbox(reg) {
  if (!reg.token || reg.exp * 1000 < Date.now() + 5000) {
    return;                   // the page renews the token and sends itself
  }
  const db = await openDb(reg.db, (d) => {
    d.createObjectStore('outbox', { keyPath: 'client_msg_id' });
    d.createObjectStore('kv');
  });
  try {
    const all = (await idb(store(db, 'outbox', 'readonly').getAll()))
      .filter((e) => !e.failed).sort((a, b) => a.order - b.order);
    for (const e of all) {
      const body = { client_msg_id: e.client_msg_id, body: e.body };
      for (const k of ['format', 'reply_to', 'attachments', 'mentions']) {
        if (e[k] !== undefined && !(k === 'format' && e[k] === 'text')) {
          body[k] = e[k];
        }
      }
      // a network error throws: the browser tries the sync again later
      const r = await fetch(reg.url + '/api/conversations/' + encodeURIComponent(e.conversation_id)
                            + '/messages', {
        method: 'POST',
        headers: { Authorization: 'Bearer ' + reg.token, 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
      if (r.ok) {
        await idb(store(db, 'outbox', 'readwrite').delete(e.client_msg_id));
        continue;
      }
      let err = {};
      try {
        err = (await r.json()).error || {};
      } catch (x) {
        // no JSON
      }
      if (r.status !== 401 && PERMANENT.includes(err.code)) {
        // the page shows it failed, with Retry and Discard (unless it was
        // discarded meanwhile: get and put in one transaction)
        const failed = { code: err.code, message: err.message || '', status: r.status };
        await new Promise((resolve, reject) => {
          const tx = db.transaction('outbox', 'readwrite');
          const st = tx.objectStore('outbox');
          const rq = st.get(e.client_msg_id);
          rq.onsuccess = () => {
            if (rq.result) {
              rq.result.failed = failed;
              st.put(rq.result);
            }
          };
          tx.oncomplete = resolve;
          tx.onerror = () => reject(tx.error);
          tx.onabort = () => reject(tx.error);
        });
        continue;
      }
      if (r.status === 401) {
        return;               // an expired token: the page sends it
      }
      throw new Error('chat server answered ' + r.status);
    }
    return true;              // sent what it could: the token is not needed
  } finally {
    db.close();
  }
}

async function sendAll() {
  const reg = await openDb(REGISTRY, (d) => d.createObjectStore('outboxes'));
  let list;
  try {
    list = await idb(store(reg, 'outboxes', 'readonly').getAll());
  } finally {
    reg.close();
  }
  for (const r of list) {
    if (await sendOutbox(r)) {
      // unless a page put a new row (new messages, a new token) meanwhile
      const reg2 = await openDb(REGISTRY, (d) => d.createObjectStore('outboxes'));
      await new Promise((resolve, reject) => {
        const tx = reg2.transaction('outboxes', 'readwrite');
        const st = tx.objectStore('outboxes');
        const rq = st.get(r.db);
        rq.onsuccess = () => {
          if (rq.result && rq.result.token === r.token) {
            st.delete(r.db);
          }
        };
        tx.oncomplete = resolve;
        tx.onerror = () => reject(tx.error);
        tx.onabort = () => reject(tx.error);
      }).finally(() => reg2.close());
    }
  }
}

self.addEventListener('sync', (ev) => {
  if (ev.tag === TAG) {
    ev.waitUntil(sendAll());
  }
});

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (ev) => ev.waitUntil(self.clients.claim()));

// What the browser drivers of the tests share (t/lib/*_browser.js,
// demo_firefox.js): a question to the test on stdout answered by a line on
// stdin, and named steps that record how they ended instead of stopping
// the run (the test asserts on them).
'use strict';
const readline = require('readline');

// ask('stop') prints "@@stop" and resolves with the test's answer line;
// ask.close() lets the process end
function asker() {
  const lines = readline.createInterface({ input: process.stdin });
  const replies = [];
  let waiting = null;
  lines.on('line', (l) => {
    if (waiting) {
      const w = waiting;
      waiting = null;
      w(l);
    } else {
      replies.push(l);
    }
  });
  function ask(what) {
    process.stdout.write('@@' + what + '\n');
    if (replies.length) {
      return Promise.resolve(replies.shift());
    }
    return new Promise((resolve) => { waiting = resolve; });
  }
  // stdin held open keeps node running: the driver closes it at its end
  ask.close = () => lines.close();
  return ask;
}

// step(name, fn): runs fn, pushes {name, ok, ms, error?} to steps
function stepper(steps) {
  return async function step(name, fn) {
    const t0 = Date.now();
    try {
      await fn();
      steps.push({ name, ok: true, ms: Date.now() - t0 });
    } catch (e) {
      steps.push({ name, ok: false, ms: Date.now() - t0,
                   error: String(e.message || e).split('\n')[0] });
    }
  };
}

// Records the tick states one message goes through (set up before sending).
function watchTicks(page, text) {
  return page.evaluate((t) => {
    if (window.__tickObserver) window.__tickObserver.disconnect();
    window.__ticks = [];
    const look = () => {
      for (const r of document.querySelectorAll('#rows > .row')) {
        const b = r.querySelector('.body');
        const k = r.querySelector('.tick');
        if (b && k && b.textContent.includes(t)) {
          const s = k.dataset.state;
          if (window.__ticks[window.__ticks.length - 1] !== s) window.__ticks.push(s);
        }
      }
    };
    window.__tickObserver = new MutationObserver(look);
    window.__tickObserver.observe(document.getElementById('rows'),
                                  { subtree: true, childList: true, attributes: true });
  }, text);
}

module.exports = { asker, stepper, watchTicks };

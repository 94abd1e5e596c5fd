// Drives the demo page in Debian's Chromium: two users chat from two
// windows.  Prints one JSON line with what each page saw.
'use strict';
const path = require('path');
const { chromium } = require(path.join(__dirname, '..', '..', 'client',
                                       'node_modules', 'playwright-core'));

const base = process.argv[2];

async function main() {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update',
           '--disable-sync'],
  });
  const out = {};
  try {
    const a = await browser.newPage();
    const b = await browser.newPage();
    await a.goto(`${base}/demo/?user=alice`);
    await b.goto(`${base}/demo/?user=bob`);
    await a.waitForSelector('#status:text("online")', { timeout: 15000 });
    await b.waitForSelector('#status:text("online")', { timeout: 15000 });

    const hello = `hello bob ${Date.now()}`;
    await a.fill('#text', hello);
    await a.press('#text', 'Enter');
    await b.waitForSelector(`.msg:has-text("${hello}")`, { timeout: 15000 });

    await b.fill('#text', 'hi alice');
    await b.click('button');
    await a.waitForSelector('.msg:has-text("hi alice")', { timeout: 15000 });

    // bob reloads: history comes back over REST, nothing doubled
    await b.reload();
    await b.waitForSelector('#status:text("online")', { timeout: 15000 });
    await b.waitForSelector('.msg:has-text("hi alice")', { timeout: 15000 });

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

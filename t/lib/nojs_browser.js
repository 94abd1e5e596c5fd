// The pages without JavaScript in Debian's Chromium (playwright-core),
// with JavaScript disabled.  argv: the chat's base URL (http://localhost:
// <port>), a sign-in ticket, a conversation id, the path of a PNG file,
// the URL of a page on another site with a form that posts to the chat.
// Signs in, reads the list and the conversation, posts a message, posts
// a file, submits one form twice, posts from the other site, signs out.
// Prints one JSON line of what it saw.
'use strict';
const path = require('path');
const { chromium } = require(path.join(__dirname, '..', '..', 'client',
                                       'node_modules', 'playwright-core'));

const [base, ticket, conv, png, evil] = process.argv.slice(2);

(async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update',
           '--disable-sync'],
  });
  const out = {};
  try {
    const ctx = await browser.newContext({ javaScriptEnabled: false });
    const page = await ctx.newPage();
    const files = [];
    page.on('response', (r) => {
      if (r.url().includes('/chat/api/attachments/')) files.push(r.status());
    });

    // sign in with a ticket: the list
    await page.goto(base + '/chat/html/login?ticket=' + encodeURIComponent(ticket));
    const [r] = await Promise.all([page.waitForNavigation(), page.click('form button')]);
    out.list_url = page.url();
    out.list_status = r.status();
    out.cookie = (await ctx.cookies()).filter((c) => c.name === 'chat_session')
      .map((c) => ({ httpOnly: c.httpOnly, secure: c.secure, sameSite: c.sameSite }))[0];
    out.list_text = await page.locator('main').innerText();
    out.unread = await page.locator('.unread').allInnerTexts();

    // the conversation
    await page.click('a[href="c/' + conv + '"]');
    out.conv_url = page.url();
    out.scripts = await page.locator('script').count();
    out.refresh = await page.locator('meta[http-equiv="refresh"]').count();
    out.bodies = await page.locator('.msg p').allInnerTexts();

    // a message through the form (POST, redirect, GET)
    await page.fill('textarea[name="body"]', 'typed <b>without</b> JavaScript');
    await Promise.all([page.waitForNavigation(), page.click('form.send button')]);
    out.after_send_url = page.url();
    out.after_send = await page.locator('.msg p').allInnerTexts();

    // a file with a caption
    await page.setInputFiles('input[type="file"]', png);
    await page.fill('form.attach input[name="body"]', 'a picture');
    await Promise.all([page.waitForNavigation(), page.click('form.attach button')]);
    out.after_file_url = page.url();
    out.images = await page.locator('.file img').count();
    await page.waitForLoadState('load');
    out.file_statuses = files;

    // one form, submitted twice: the second submit goes before the
    // redirect of the first is followed
    await page.fill('textarea[name="body"]', 'submitted twice');
    await page.click('form.send button', { noWaitAfter: true });
    await page.click('form.send button', { noWaitAfter: true }).catch(() => {});
    await page.waitForLoadState('load');
    await page.waitForTimeout(500);
    await page.goto(base + '/chat/html/c/' + conv);
    out.twice = (await page.locator('.msg p').allInnerTexts())
      .filter((t) => t === 'submitted twice').length;

    // a form on another site that posts to the chat
    const other = await ctx.newPage();
    await other.goto(evil);
    const [resp] = await Promise.all([
      other.waitForNavigation(),
      other.click('button'),
    ]);
    out.evil_status = resp ? resp.status() : null;
    out.evil_text = await other.locator('body').innerText();

    // sign out
    await page.goto(base + '/chat/html/');
    await Promise.all([page.waitForNavigation(), page.click('form.inline button')]);
    out.after_logout_url = page.url();
    out.cookie_after = (await ctx.cookies()).filter((c) => c.name === 'chat_session').length;
  } catch (e) {
    out.error = String(e && e.stack || e);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
})();

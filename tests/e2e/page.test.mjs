// End-to-end: the real page, served by the real server, in headless Chromium
// (Debian's, driven by playwright-core; no browser download). Every wait is
// for an event on the page (Playwright's auto-waiting), never a fixed sleep.
//
// STREAMBRIDGE_BASE_URL: the server (cargo xtask test starts one).
// STREAMBRIDGE_SCREENSHOT: if set, where to save a screenshot of the page.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { launchChromium } from './chromium.mjs';

const base = process.env.STREAMBRIDGE_BASE_URL;
assert.ok(base, 'set STREAMBRIDGE_BASE_URL to a running server (cargo xtask test does)');
const wsUrl = base.replace(/^http/, 'ws') + '/ws';

let browser;

before(async () => {
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
});

/** A fresh page that records every console error and uncaught exception. */
async function openPage() {
  const page = await browser.newPage();
  const problems = [];
  page.on('console', (message) => {
    if (message.type() === 'error') problems.push(`console: ${message.text()}`);
  });
  page.on('pageerror', (error) => problems.push(`exception: ${error.message}`));
  await page.goto(base + '/');
  await page.locator('#state[data-state="open"]').waitFor();
  await page.locator('.stream[data-stream="1"] .stream-state[data-state="open"]').waitFor();
  return { page, problems };
}

test('a person streams on two streams at once, each with its own log, and runs the demo', async () => {
  const { page, problems } = await openPage();
  const first = page.locator('.stream[data-stream="1"]');
  await first.locator('.message').fill('hello from the page');
  await first.locator('.message').press('Enter');
  await first.locator('.log li.received', { hasText: 'processed: hello from the page' }).waitFor();
  assert.equal(await first.locator('.message').inputValue(), '', 'the field is cleared after sending');

  await page.click('#new-stream');
  const second = page.locator('.stream[data-stream="2"]');
  await second.locator('.message').fill('on the second stream');
  await second.locator('.send').click();
  await second.locator('.log li.received', { hasText: 'processed: on the second stream' }).waitFor();
  await first.locator('.message').fill('clicked');
  await first.locator('.send').click();
  await first.locator('.log li.received', { hasText: 'processed: clicked' }).waitFor();

  assert.deepEqual(
    await first.locator('.log li.received').allTextContents(),
    ['processed: hello from the page', 'processed: clicked'],
    'replies in order, in their own stream',
  );
  assert.deepEqual(await second.locator('.log li.received').allTextContents(), ['processed: on the second stream']);

  await first.locator('.close-send').click();
  await first.locator('.log li.status', { hasText: 'status 0' }).waitFor();
  await first.locator('.stream-state[data-state="closed"]').waitFor();
  assert.equal(await first.locator('.send').isDisabled(), true, 'no sending on a closed stream');
  await second.locator('.cancel').click();
  await second.locator('.log li.status', { hasText: 'status 1' }).waitFor();
  assert.equal(await page.getAttribute('#state', 'data-state'), 'open', 'the connection outlives its streams');

  await page.fill('#demo-count', '2000');
  await page.click('#demo-run');
  await page.locator('#demo-result', { hasText: '2,000 messages' }).waitFor();
  await page.click('#demo-raw');
  await page.locator('#demo-raw-result', { hasText: '2,000 messages' }).waitFor();
  await page.locator('#demo-ratio', { hasText: 'x' }).waitFor();
  const rate = Number((await page.textContent('#demo-rate')).replaceAll(',', ''));
  assert.ok(rate > 0, `a messages/s figure is shown (${rate})`);

  if (process.env.STREAMBRIDGE_SCREENSHOT) {
    await page.screenshot({ path: process.env.STREAMBRIDGE_SCREENSHOT, fullPage: true });
  }
  assert.deepEqual(problems, [], 'no console errors');
  await page.close();
});

test('plain JavaScript in the page uses the package with the documented API', async () => {
  const { page, problems } = await openPage();
  const outcome = await page.evaluate(async (url) => {
    const { default: init, DataClient } = await import('/pkg/streambridge_client.js');
    await init();
    const client = await DataClient.connect(url);

    const stream = client.bidirectionalStream();
    stream.send('a');
    stream.send('b');
    stream.closeSend();
    const first = await stream.next();
    const rest = [];
    for await (const message of stream) rest.push(message.result);
    const status = await stream.finished();
    let thrown = null;
    try {
      stream.send('c');
    } catch (error) {
      thrown = { isError: error instanceof Error, name: error.name, code: error.code };
    }

    const failing = client.bidirectionalStream();
    failing.send('x'.repeat(5 * 1024 * 1024));
    let rejected = null;
    try {
      await failing.next();
    } catch (error) {
      rejected = { isError: error instanceof Error, code: error.code };
    }
    const failedStatus = await failing.finished();

    let connectError = null;
    try {
      await DataClient.connect('ws://127.0.0.1:9/ws');
    } catch (error) {
      connectError = { isError: error instanceof Error, code: error.code };
    }
    client.close();
    return { first, rest, status, thrown, rejected, failedStatus: failedStatus.code, connectError };
  }, wsUrl);
  assert.deepEqual(outcome.first, { result: 'processed: a' });
  assert.deepEqual(outcome.rest, ['processed: b']);
  assert.deepEqual(outcome.status, { code: 0, message: '', metadata: {} });
  assert.deepEqual(outcome.thrown, { isError: true, name: 'StreamError', code: 9 });
  assert.deepEqual(outcome.rejected, { isError: true, code: 8 });
  assert.equal(outcome.failedStatus, 8);
  assert.deepEqual(outcome.connectError, { isError: true, code: 14 });
  // The failed connect is expected to log a WebSocket error in the console, and the HTTP
  // fallback's fetch to the same port (port 9 is one browsers refuse: ERR_UNSAFE_PORT);
  // nothing else may.
  const unexpected = problems.filter((p) => !p.includes('127.0.0.1:9') && !p.includes('net::ERR_UNSAFE_PORT'));
  assert.deepEqual(unexpected, []);
  await page.close();
});

test('the page and the package are served with fitting types and caching', async () => {
  const responses = await Promise.all(
    ['/', '/app.js', '/pkg/streambridge_client.js', '/pkg/streambridge_client_bg.wasm'].map((path) => fetch(base + path)),
  );
  const [html, app, glue, wasm] = responses;
  for (const response of responses) assert.equal(response.status, 200, response.url);
  assert.match(html.headers.get('content-type'), /^text\/html/);
  assert.match(app.headers.get('content-type'), /javascript/);
  assert.match(glue.headers.get('content-type'), /javascript/);
  assert.equal(wasm.headers.get('content-type'), 'application/wasm');
  assert.match(html.headers.get('cache-control') ?? '', /no-cache/);
  assert.match(wasm.headers.get('cache-control') ?? '', /no-cache/);
});

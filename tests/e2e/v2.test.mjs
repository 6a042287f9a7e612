// WebSocket protocol v2 from a real browser: headless Chromium's own
// WebSocket, no client library, speaking `streambridge.v2.json` exactly as
// docs/protocol-v2.md and the README show it. Two calls of two
// different services on one socket, in one batch.
//
// STREAMBRIDGE_BASE_URL: the server (cargo xtask test starts one).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { launchChromium } from './chromium.mjs';

const base = process.env.STREAMBRIDGE_BASE_URL;
assert.ok(base, 'set STREAMBRIDGE_BASE_URL to a running server (cargo xtask test does)');

let browser;

before(async () => {
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
});

test('a browser WebSocket carries two calls of two services in one v2 json batch', async () => {
  const page = await browser.newPage();
  // The page's own origin: the server allows it.
  await page.goto(base + '/');
  const records = await page.evaluate(
    (url) =>
      new Promise((resolve, reject) => {
        const ws = new WebSocket(url, 'streambridge.v2.json');
        const seen = [];
        ws.onerror = () => reject(new Error('socket error'));
        ws.onopen = () =>
          ws.send(
            JSON.stringify([
              { call: 1, open: { method: '/DataService/BidirectionalStream' } },
              { call: 1, message: { data: 'hello' } },
              { call: 2, open: { method: '/grpc.health.v1.Health/Check' } },
              { call: 2, message: {} },
              { call: 2, closeSend: {} },
              { call: 1, closeSend: {} },
            ]),
          );
        ws.onmessage = (event) => {
          const batch = JSON.parse(event.data);
          if (!Array.isArray(batch)) reject(new Error(`not an array: ${event.data}`));
          seen.push(...batch);
          if (seen.filter((r) => r.status).length === 2) {
            ws.close(1000);
            resolve(seen);
          }
        };
      }),
    base.replace(/^http/, 'ws') + '/ws',
  );
  const of = (call) => records.filter((r) => r.call === call);
  assert.deepEqual(
    of(1).filter((r) => r.message).map((r) => r.message),
    [{ result: 'processed: hello' }],
  );
  assert.deepEqual(
    of(2).filter((r) => r.message).map((r) => r.message),
    [{ status: 'SERVING' }],
  );
  for (const call of [1, 2]) {
    const last = of(call).at(-1);
    assert.equal(last.status?.code, 0, `call ${call} ends with its status: ${JSON.stringify(of(call))}`);
  }
  await page.close();
});

// End-to-end: the page behind a proxy that refuses WebSocket upgrades (403),
// in headless Chromium. The WASM client falls back to protocol v2 over plain
// HTTP by itself: streams keep their order and end with 0, ping-pong is true
// bidi, and it reconnects after the server is killed and restarted. Every
// wait is for an event (a state change, a promise, a process exit).
//
// STREAMBRIDGE_BIN: the streambridge binary (cargo xtask test sets it).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { launchChromium } from './chromium.mjs';
import { startBlockingProxy } from './blocking-proxy.mjs';
import { startStreambridge, staticDir } from './streambridge.mjs';

let browser;
const cleanups = [];

before(async () => {
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  for (const cleanup of cleanups) cleanup();
});

async function start(options) {
  const server = await startStreambridge(['--static-dir', staticDir], options);
  cleanups.push(() => server.child.kill('SIGKILL'));
  return server;
}

/** A page loaded through `proxy`, with `window.client` connected through it. */
async function pageBehind(proxy, options = {}) {
  const page = await browser.newPage();
  const problems = [];
  page.on('pageerror', (error) => problems.push(error.message));
  await page.goto(`http://${proxy.address}/pkg/package.json`);
  await page.evaluate(
    async ([url, options]) => {
      const { default: init, DataClient } = await import('/pkg/streambridge_client.js');
      await init();
      window.states = [];
      window.client = await DataClient.connect(url, options);
      window.client.onstatechange = (state) => window.states.push(state);
    },
    [`ws://${proxy.address}/ws`, { reconnect: { initialDelayMs: 20, maxDelayMs: 250 }, ...options }],
  );
  return { page, problems };
}

test('behind a proxy that refuses WebSockets the client falls back to HTTP and streams in order', async () => {
  const server = await start();
  const proxy = await startBlockingProxy(server.address);
  cleanups.push(proxy.close);
  const { page, problems } = await pageBehind(proxy);
  assert.ok(proxy.stats.refused >= 1, 'the WebSocket was tried first, and refused');
  assert.equal(await page.evaluate(() => window.client.transport), 'http');

  const result = await page.evaluate(async () => {
    const client = window.client;
    // Twenty streams at once, five messages each, and a call() beside them.
    const streams = Array.from({ length: 20 }, () => client.bidirectionalStream());
    const replies = streams.map(async (stream, s) => {
      for (let i = 0; i < 5; i++) stream.send(`s${s} m${i}`);
      stream.closeSend();
      const got = [];
      for await (const reply of stream) got.push(reply.result);
      return { got, code: (await stream.finished()).code };
    });
    const call = client.call('/DataService/BidirectionalStream');
    call.send({ data: 'by call()' });
    call.closeSend();
    const called = [];
    for await (const message of call) called.push(message.result);
    // Ping-pong: each message sent only after the previous reply came, so
    // this is true bidirectional streaming, not a request then a response.
    const pingPong = client.bidirectionalStream();
    const rounds = [];
    const started = performance.now();
    for (let i = 0; i < 10; i++) {
      pingPong.send(`ping ${i}`);
      rounds.push((await pingPong.next()).result);
    }
    const perRound = (performance.now() - started) / 10;
    pingPong.closeSend();
    return {
      streams: await Promise.all(replies),
      called,
      callCode: (await call.finished()).code,
      rounds,
      pingPongCode: (await pingPong.finished()).code,
      perRound,
    };
  });
  result.streams.forEach(({ got, code }, s) => {
    assert.deepEqual(got, [0, 1, 2, 3, 4].map((i) => `processed: s${s} m${i}`), `stream ${s} in order`);
    assert.equal(code, 0);
  });
  assert.deepEqual(result.called, ['processed: by call()']);
  assert.equal(result.callCode, 0);
  assert.deepEqual(result.rounds, Array.from({ length: 10 }, (_, i) => `processed: ping ${i}`));
  assert.equal(result.pingPongCode, 0);
  // Reported, not asserted (timings never decide a test on shared machines).
  console.log(`# ping-pong round trip over the HTTP fallback: ${result.perRound.toFixed(1)} ms`);
  assert.deepEqual(problems, []);
  await page.close();
});

test('over the HTTP fallback the client reconnects after the server is killed and restarted', async () => {
  let server = await start();
  const address = server.address;
  const proxy = await startBlockingProxy(address);
  cleanups.push(proxy.close);
  const { page, problems } = await pageBehind(proxy);
  assert.equal(await page.evaluate(() => window.client.transport), 'http');
  const first = await page.evaluate(async () => {
    window.live = window.client.bidirectionalStream();
    window.live.send('before');
    return (await window.live.next()).result;
  });
  assert.equal(first, 'processed: before');

  server.child.kill('SIGKILL');
  await server.exit;
  const cut = await page.evaluate(async () => {
    const error = await window.live.next().then(() => null, (e) => ({ name: e.name, code: e.code }));
    return { error, status: (await window.live.finished()).code };
  });
  assert.deepEqual(cut, { error: { name: 'StreamError', code: 14 }, status: 14 }, 'the live call ends with UNAVAILABLE');
  await page.waitForFunction(() => window.client.state === 'reconnecting');
  const waiting = page.evaluate(async () => {
    const stream = window.client.bidirectionalStream();
    stream.send('sent while reconnecting');
    stream.closeSend();
    const replies = [];
    for await (const reply of stream) replies.push(reply.result);
    return { replies, code: (await stream.finished()).code };
  });

  server = await start({ listen: address });
  await page.waitForFunction(() => window.client.state === 'open');
  assert.deepEqual(await waiting, { replies: ['processed: sent while reconnecting'], code: 0 });
  assert.equal(await page.evaluate(() => window.client.transport), 'http');
  assert.deepEqual(problems, []);
  await page.close();
});

test('transports restricts the ways in: websocket only fails behind the proxy, http only skips the upgrade', async () => {
  const server = await start();
  const proxy = await startBlockingProxy(server.address);
  cleanups.push(proxy.close);
  const { page } = await pageBehind(proxy, { transports: ['http'] });
  const refusedBefore = proxy.stats.refused;
  assert.equal(await page.evaluate(() => window.client.transport), 'http');
  const failed = await page.evaluate(async (url) => {
    const { DataClient } = await import('/pkg/streambridge_client.js');
    return DataClient.connect(url, { transports: ['websocket'], reconnect: false }).then(
      () => null,
      (error) => ({ name: error.name, code: error.code }),
    );
  }, `ws://${proxy.address}/ws`);
  assert.deepEqual(failed, { name: 'StreamError', code: 14 });
  assert.equal(proxy.stats.refused, refusedBefore + 1, 'only the websocket-only client tried an upgrade');
  const invalid = await page.evaluate(async (url) => {
    const { DataClient } = await import('/pkg/streambridge_client.js');
    return DataClient.connect(url, { transports: ['carrier-pigeon'] }).then(
      () => null,
      (error) => ({ code: error.code, message: error.message }),
    );
  }, `ws://${proxy.address}/ws`);
  assert.equal(invalid.code, 3);
  assert.match(invalid.message, /transports/);
  await page.close();
});

// WebTransport from a real browser: headless Chromium's own WebTransport,
// no client library, speaking protocol v2's WebTransport binding
// (docs/protocol-v2.md §12) to a streambridge with --webtransport-listen. The
// certificate is made here as WebTransport's certificate hashes require
// (ECDSA P-256, valid under 14 days, with BasicConstraints, KeyUsage and
// ExtKeyUsage) and given to the page as `serverCertificateHashes`.
//
// STREAMBRIDGE_BIN: the streambridge binary (cargo xtask test sets it).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { launchChromium } from './chromium.mjs';
import { startStreambridge, staticDir } from './streambridge.mjs';
import { makeCertificate } from './webtransport-certificate.mjs';

let browser;
let dir;
const cleanups = [];

before(async () => {
  browser = await launchChromium();
  dir = mkdtempSync(path.join(tmpdir(), 'streambridge-wt-'));
});

after(async () => {
  await browser?.close();
  for (const cleanup of cleanups) cleanup();
  rmSync(dir, { recursive: true, force: true });
});

/** A certificate WebTransport accepts by hash; its PEM files and SHA-256. */
function certificate() {
  return makeCertificate(dir);
}

async function start(args, options) {
  const server = await startStreambridge(args, options);
  cleanups.push(() => server.child.kill('SIGKILL'));
  return server;
}

/**
 * In the page: a session to `url`, then `calls` (each a list of records)
 * each on a stream of its own; resolves to every call's records and close,
 * or to how the session ended if it did not open.
 */
function runInPage(page, url, hash, calls) {
  return page.evaluate(async ([url, hash, calls]) => {
    const transport = new WebTransport(url, {
      serverCertificateHashes: [{ algorithm: 'sha-256', value: new Uint8Array(hash) }],
    });
    const closed = transport.closed.then(
      (info) => ({ closeCode: info.closeCode, reason: info.reason }),
      (error) => ({ error: String(error), source: error.source, code: error.streamErrorCode }),
    );
    try {
      await transport.ready;
    } catch (error) {
      return { refused: await closed, readyError: String(error) };
    }
    const frame = (records) => {
      const batch = new TextEncoder().encode(JSON.stringify(records));
      const bytes = new Uint8Array(5 + batch.length);
      new DataView(bytes.buffer).setUint32(0, batch.length + 1);
      bytes[4] = 0;
      bytes.set(batch, 5);
      return bytes;
    };
    const oneCall = async (records) => {
      const stream = await transport.createBidirectionalStream();
      const writer = stream.writable.getWriter();
      await writer.write(frame(records));
      const reader = stream.readable.getReader();
      let buffer = new Uint8Array(0);
      const got = [];
      for (;;) {
        while (buffer.length >= 4) {
          const length = new DataView(buffer.buffer, buffer.byteOffset).getUint32(0);
          if (buffer.length < 4 + length) break;
          const kind = buffer[4];
          const payload = buffer.slice(5, 4 + length);
          buffer = buffer.slice(4 + length);
          if (kind === 0) got.push(...JSON.parse(new TextDecoder().decode(payload)));
          else got.push({ close: new DataView(payload.buffer).getUint16(0) });
        }
        const { value, done } = await reader.read();
        if (done) break;
        const joined = new Uint8Array(buffer.length + value.length);
        joined.set(buffer);
        joined.set(value, buffer.length);
        buffer = joined;
      }
      return got;
    };
    const results = await Promise.all(calls.map(oneCall));
    transport.close({ closeCode: 0, reason: 'done' });
    return { results };
  }, [url, hash, calls]);
}

/**
 * In the page: how a session to `url` ends when the server refuses it: the
 * CLOSE frame on its control stream, and how the session itself ends.
 */
function endOf(page, url, hash) {
  return page.evaluate(async ([url, hash]) => {
    const transport = new WebTransport(url, {
      serverCertificateHashes: [{ algorithm: 'sha-256', value: new Uint8Array(hash) }],
    });
    const ended = transport.closed.then(
      (info) => ({ closeCode: info.closeCode, reason: info.reason }),
      (error) => ({ error: String(error) }),
    );
    await transport.ready;
    const { value: control } = await transport.incomingUnidirectionalStreams.getReader().read();
    const reader = control.getReader();
    let bytes = new Uint8Array(0);
    for (;;) {
      if (bytes.length >= 4 && bytes.length >= 4 + new DataView(bytes.buffer).getUint32(0)) break;
      const { value, done } = await reader.read();
      if (done) break;
      const joined = new Uint8Array(bytes.length + value.length);
      joined.set(bytes);
      joined.set(value, bytes.length);
      bytes = joined;
    }
    const view = new DataView(bytes.buffer);
    // Told why: the client closes (the server waits for it).
    transport.close({ closeCode: 0, reason: 'refused' });
    return {
      kind: bytes[4],
      closeCode: view.getUint16(5),
      reason: new TextDecoder().decode(bytes.slice(7, 4 + view.getUint32(0))),
      session: await ended,
    };
  }, [url, hash]);
}

const call = (data) => [
  { call: 1, open: { method: '/DataService/BidirectionalStream' } },
  ...data.map((d) => ({ call: 1, message: { data: d } })),
  { call: 1, closeSend: {} },
];

test('Chromium\'s WebTransport runs calls on streams of their own, and refusals say why', async () => {
  const { cert, key, hash } = certificate();
  const page = await start(['--static-dir', staticDir]);
  const pageOrigin = `http://${page.address}`;
  const server = await start([
    '--tls-cert', cert, '--tls-key', key, '--webtransport-listen', '127.0.0.1:0',
    '--allowed-origin', pageOrigin, '--auth-token', 's3cret',
  ]);
  assert.ok(server.webtransport, 'the server says where WebTransport listens');
  const tab = await browser.newPage();
  await tab.goto(`${pageOrigin}/pkg/package.json`);
  const url = `https://${server.webtransport}/ws?protocol=streambridge.v2.json&token=s3cret`;

  const { results } = await runInPage(tab, url, hash, [call(['a', 'b']), call(['c'])]);
  const messages = (got) => got.filter((r) => r.message).map((r) => r.message.result);
  assert.deepEqual(messages(results[0]), ['processed: a', 'processed: b']);
  assert.deepEqual(messages(results[1]), ['processed: c']);
  for (const got of results) {
    assert.deepEqual(got.find((r) => r.status)?.status, { code: 0 });
    assert.deepEqual(got.at(-1), { close: 1000 }, 'the stream closes after its call');
  }

  // A wrong token: the session ends, and the page learns why.
  const refused = await endOf(tab, url.replace('s3cret', 'wrong'), hash);
  console.log('a refused session as the page sees it:', JSON.stringify(refused));
  assert.equal(refused.kind, 1, 'a CLOSE frame');
  assert.equal(refused.closeCode, 4401, JSON.stringify(refused));
  assert.match(refused.reason, /token/);
  await tab.close();
});

// The WASM client over WebTransport. The server has TLS (WebTransport needs
// it), so its page is HTTPS with the test's certificate: the browser context
// ignores certificate errors for the page and its WebSocket fallback, while
// WebTransport itself trusts the certificate by hash, as a page would.

/** A page of `server` with `window.client` connected; `options` add to or override connect's. */
async function clientPage(server, hash, options = {}) {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (error) => problems.push(error.message));
  await page.goto(`https://${server.address}/pkg/package.json`);
  await page.evaluate(
    async ([url, options, hash]) => {
      const { default: init, DataClient } = await import('/pkg/streambridge_client.js');
      await init();
      window.states = [];
      window.client = await DataClient.connect(url, {
        reconnect: { initialDelayMs: 20, maxDelayMs: 250 },
        serverCertificateHashes: [{ algorithm: 'sha-256', value: new Uint8Array(hash) }],
        ...options,
      });
      window.client.onstatechange = (state) => window.states.push(state);
      // The server's live calls over WebTransport (its /metrics), once they
      // are `count` (looked at every 20 ms for up to 5 s); else the last seen.
      window.liveCallsReach = async (count) => {
        let seen;
        for (let look = 0; look < 250; look++) {
          const text = await (await fetch('/metrics')).text();
          const line = text.split('\n').find((l) => l.startsWith('streambridge_active_streams{transport="webtransport"}'));
          seen = Number(line?.split(' ').pop() ?? 0);
          if (seen === count) return seen;
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
        return seen;
      };
    },
    [`wss://${server.address}/ws`, { webtransport: `https://${server.webtransport}/ws`, ...options }, hash],
  );
  return { page, problems, close: () => context.close() };
}

async function wtServer(cert, extra = [], listen) {
  return start(['--tls-cert', cert.cert, '--tls-key', cert.key, '--static-dir', staticDir, ...extra], listen);
}

test('the WASM client runs streams and call()s on WebTransport, each call on a stream of its own', async () => {
  const cert = certificate();
  const server = await wtServer(cert, ['--webtransport-listen', '127.0.0.1:0']);
  for (const codec of ['json', 'proto']) {
    const { page, problems, close } = await clientPage(server, cert.hash, { codec });
    assert.equal(await page.evaluate(() => window.client.transport), 'webtransport', codec);
    const result = await page.evaluate(async () => {
      const client = window.client;
      const streams = Array.from({ length: 20 }, () => client.bidirectionalStream());
      const replies = streams.map(async (stream, s) => {
        for (let i = 0; i < 5; i++) stream.send(`s${s} m${i}`);
        stream.closeSend();
        const got = [];
        for await (const reply of stream) got.push(reply.result);
        return { got, code: (await stream.finished()).code };
      });
      // Ping-pong: each message only after the previous reply.
      const pingPong = client.bidirectionalStream();
      const rounds = [];
      for (let i = 0; i < 10; i++) {
        pingPong.send(`ping ${i}`);
        rounds.push((await pingPong.next()).result);
      }
      pingPong.closeSend();
      return {
        streams: await Promise.all(replies),
        rounds,
        pingPong: (await pingPong.finished()).code,
        sockets: client.socketCount,
      };
    });
    result.streams.forEach(({ got, code }, s) => {
      assert.deepEqual(got, [0, 1, 2, 3, 4].map((i) => `processed: s${s} m${i}`));
      assert.equal(code, 0);
    });
    assert.deepEqual(result.rounds, Array.from({ length: 10 }, (_, i) => `processed: ping ${i}`));
    assert.equal(result.pingPong, 0);
    assert.equal(result.sockets, 1, 'one session');
    if (codec === 'json') {
      const called = await page.evaluate(async () => {
        const call = window.client.call('/DataService/BidirectionalStream');
        call.send({ data: 'by call()' });
        call.closeSend();
        const got = [];
        for await (const message of call) got.push(message.result);
        return { got, code: (await call.finished()).code };
      });
      assert.deepEqual(called, { got: ['processed: by call()'], code: 0 });
    }
    // Every call ended at the server.
    assert.equal(await page.evaluate(() => window.liveCallsReach(0)), 0);
    assert.deepEqual(problems, []);
    await close();
  }
});

test('over WebTransport a cancel and a deadline end the call at the server, and the session goes on', async () => {
  const cert = certificate();
  // Two QUIC streams at once: the calls below run one after another, so
  // each call's stream must be freed when the call ends, or the third
  // waits forever.
  const server = await wtServer(cert, ['--webtransport-listen', '127.0.0.1:0', '--ws-max-calls', '2']);
  const { page, problems, close } = await clientPage(server, cert.hash, { maxCalls: 1 });
  const outcome = await page.evaluate(async () => {
    const client = window.client;
    const cancelled = client.bidirectionalStream();
    cancelled.send('a');
    const first = (await cancelled.next()).result;
    const liveBefore = await window.liveCallsReach(1);
    cancelled.cancel();
    const liveAfterCancel = await window.liveCallsReach(0);
    // maxCalls 1: this call starts only once the cancelled one freed its slot.
    const timed = client.bidirectionalStream({ timeoutMs: 200 });
    timed.send('b');
    const timedReply = (await timed.next()).result;
    const timedStatus = await timed.finished();
    const liveAfterDeadline = await window.liveCallsReach(0);
    const next = client.bidirectionalStream();
    next.send('c');
    next.closeSend();
    return {
      first,
      liveBefore,
      cancelled: (await cancelled.finished()).code,
      liveAfterCancel,
      timedReply,
      timed: timedStatus.code,
      liveAfterDeadline,
      next: (await next.next()).result,
      nextStatus: (await next.finished()).code,
      transport: client.transport,
    };
  });
  assert.deepEqual(outcome, {
    first: 'processed: a',
    liveBefore: 1,
    cancelled: 1,
    liveAfterCancel: 0,
    timedReply: 'processed: b',
    timed: 4,
    liveAfterDeadline: 0,
    next: 'processed: c',
    nextStatus: 0,
    transport: 'webtransport',
  });
  assert.deepEqual(problems, []);
  await close();
});

test('a drain over WebTransport: goaway, the call ends with 14, and the client is back on WebTransport after the restart', async () => {
  const cert = certificate();
  const first = await wtServer(cert, ['--webtransport-listen', '127.0.0.1:0', '--drain-timeout', '30s']);
  const { page, problems, close } = await clientPage(first, cert.hash);
  await page.evaluate(async () => {
    window.live = window.client.bidirectionalStream();
    window.live.send('a');
    await window.live.next();
  });
  first.child.kill('SIGTERM');
  const live = await page.evaluate(() => window.live.finished());
  assert.equal(live.code, 14, `the built-in service ends its calls at the drain: ${JSON.stringify(live)}`);
  assert.equal(await first.exit, 0, 'the server drained and exited');
  await page.waitForFunction(() => window.client.state === 'reconnecting');

  await wtServer(cert, ['--webtransport-listen', first.webtransport], { listen: first.address });
  await page.waitForFunction(() => window.client.state === 'open');
  const after = await page.evaluate(async () => {
    const stream = window.client.bidirectionalStream();
    stream.send('after');
    stream.closeSend();
    return {
      reply: (await stream.next()).result,
      code: (await stream.finished()).code,
      transport: window.client.transport,
      states: window.states,
    };
  });
  assert.deepEqual(after, {
    reply: 'processed: after',
    code: 0,
    transport: 'webtransport',
    states: ['reconnecting', 'open'],
  });
  assert.deepEqual(problems, []);
  await close();
});

test('with the UDP port closed the WASM client falls back to the WebSocket', async () => {
  const cert = certificate();
  // TLS, but no WebTransport: the page's `webtransport` URL reaches nothing.
  const server = await wtServer(cert);
  const { page, problems, close } = await clientPage(
    { address: server.address, webtransport: server.address },
    cert.hash,
  );
  const outcome = await page.evaluate(async () => {
    const stream = window.client.bidirectionalStream();
    stream.send('over the fallback');
    stream.closeSend();
    return { transport: window.client.transport, reply: (await stream.next()).result };
  });
  assert.deepEqual(outcome, { transport: 'websocket', reply: 'processed: over the fallback' });
  assert.deepEqual(problems, []);
  await close();
});

test('over WebTransport the WASM client sends its token, and a refusal says why', async () => {
  const cert = certificate();
  // `+` would be a space if the server did not percent-decode the parameter.
  const token = 's3cret+x~y';
  const server = await wtServer(cert, ['--webtransport-listen', '127.0.0.1:0', '--auth-token', token]);
  const { page, problems, close } = await clientPage(server, cert.hash, { token, transports: ['webtransport'] });
  assert.equal(await page.evaluate(() => window.client.transport), 'webtransport');
  const refused = await page.evaluate(
    async ([url, webtransport, hash]) => {
      const { DataClient } = await import('/pkg/streambridge_client.js');
      const serverCertificateHashes = [{ algorithm: 'sha-256', value: new Uint8Array(hash) }];
      return DataClient.connect(url, { webtransport, serverCertificateHashes, transports: ['webtransport'], token: 'wrong' }).then(
        () => 'connected',
        (error) => ({ code: error.code, message: error.message }),
      );
    },
    [`wss://${server.address}/ws`, `https://${server.webtransport}/ws`, cert.hash],
  );
  assert.equal(refused.code, 14, JSON.stringify(refused));
  assert.match(refused.message, /close code 4401|bearer token/, 'the reason the server gave on the control stream');
  assert.deepEqual(problems, []);
  await close();
});

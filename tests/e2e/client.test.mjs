// End-to-end: the WASM client (protocol v2) in headless Chromium against
// real servers this file starts, stops and restarts itself: many streams on
// one socket counted at the server, reconnecting after the server is killed
// and restarted on the same port, a rolling restart (goaway while calls are
// live), and calls through a bridge in front of an upstream. Every wait is
// for an event (a state change, a promise, a process exit), never a sleep.
//
// STREAMBRIDGE_BIN: the streambridge binary (cargo xtask test sets it).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { launchChromium } from './chromium.mjs';
import { metric, startStreambridge, staticDir } from './streambridge.mjs';

let browser;
const servers = [];

before(async () => {
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  for (const server of servers) server.child.kill('SIGKILL');
});

async function start(args = [], options) {
  const server = await startStreambridge(['--static-dir', staticDir, ...args], options);
  servers.push(server);
  return server;
}

/**
 * A page of `server`'s origin with the package loaded and `window.client`
 * connected (with fast reconnects); every page error is collected.
 */
async function clientPage(server, options = {}) {
  const page = await browser.newPage();
  const problems = [];
  page.on('pageerror', (error) => problems.push(error.message));
  // The package's own file as the document: no app.js, so no other socket.
  await page.goto(`http://${server.address}/pkg/package.json`);
  await page.evaluate(
    async ([url, options]) => {
      const { default: init, DataClient } = await import('/pkg/streambridge_client.js');
      await init();
      window.states = [];
      window.client = await DataClient.connect(url, options);
      window.client.onstatechange = (state) => window.states.push(state);
    },
    [`ws://${server.address}/ws`, { reconnect: { initialDelayMs: 20, maxDelayMs: 250 }, ...options }],
  );
  return { page, problems };
}

test('twenty concurrent streams run on one socket, counted at the server', async () => {
  const server = await start();
  const { page, problems } = await clientPage(server);
  // The page's document and package requests may keep HTTP connections open:
  // count from a closed client on.
  await page.evaluate(() => window.client.close());
  const before = await metric(server.address, 'streambridge_open_connections');
  const results = await page.evaluate(async (url) => {
    const { DataClient } = await import('/pkg/streambridge_client.js');
    window.client = await DataClient.connect(url);
    window.transport = window.client.transport;
    const streams = Array.from({ length: 20 }, () => window.client.bidirectionalStream());
    streams.forEach((stream, i) => stream.send(`stream ${i}`));
    const first = await Promise.all(streams.map((stream) => stream.next()));
    window.streams = streams;
    return first.map((reply) => reply.result);
  }, `ws://${server.address}/ws`);
  assert.deepEqual(results, Array.from({ length: 20 }, (_, i) => `processed: stream ${i}`));
  assert.equal(await page.evaluate(() => window.transport), 'websocket', 'where WebSockets pass, they are used');
  const during = await metric(server.address, 'streambridge_open_connections');
  assert.equal(during - before, 1, 'twenty live streams, one more connection at the server');
  const statuses = await page.evaluate(async () => {
    window.streams.forEach((stream) => stream.closeSend());
    return Promise.all(window.streams.map((stream) => stream.finished().then((s) => s.code)));
  });
  assert.deepEqual(statuses, Array(20).fill(0));
  assert.deepEqual(problems, []);
  await page.close();
});

test('the client reconnects by itself when the server is killed and restarted on the same port', async () => {
  let server = await start();
  const address = server.address;
  const { page, problems } = await clientPage(server);
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

  // Calls made while the server is away wait for the socket, within their deadline.
  const expired = await page.evaluate(async () => {
    window.waiting = window.client.bidirectionalStream();
    window.waiting.send('sent while reconnecting');
    window.waiting.closeSend();
    const timed = window.client.bidirectionalStream({ timeoutMs: 50 });
    return (await timed.finished()).code;
  });
  assert.equal(expired, 4, 'a call whose deadline passes while waiting ends with DEADLINE_EXCEEDED');

  server = await start([], { listen: address });
  await page.waitForFunction(() => window.client.state === 'open');
  const after = await page.evaluate(async () => {
    const replies = [];
    for await (const reply of window.waiting) replies.push(reply.result);
    return { replies, status: (await window.waiting.finished()).code, states: window.states };
  });
  assert.deepEqual(after.replies, ['processed: sent while reconnecting']);
  assert.equal(after.status, 0);
  assert.equal(after.states[0], 'reconnecting');
  assert.equal(after.states.at(-1), 'open');
  assert.ok(after.states.every((s) => s === 'reconnecting' || s === 'open'), after.states.join());
  assert.deepEqual(problems, []);
  await page.close();
});

test('a rolling restart: live calls finish on the draining bridge, new calls start on the next', async () => {
  // Bridges in front of one upstream, as in production: the built-in service
  // ends its own streams at a drain, an upstream's calls run on until
  // --drain-timeout, which is what goaway is for.
  const upstream = await start();
  const bridgeArgs = ['--upstream', `http://${upstream.address}`, '--drain-timeout', '30s'];
  const first = await start(bridgeArgs);
  const address = first.address;
  const { page, problems } = await clientPage(first);
  const reply = await page.evaluate(async () => {
    window.live = window.client.bidirectionalStream();
    window.live.send('a');
    return (await window.live.next()).result;
  });
  assert.equal(reply, 'processed: a');

  first.child.kill('SIGTERM');
  // goaway: the client opens its next socket at once; the draining bridge no
  // longer listens, so it keeps trying until the next one is up.
  await page.waitForFunction(() => window.client.state === 'reconnecting');
  const onDraining = await page.evaluate(async () => {
    window.live.send('b');
    return (await window.live.next()).result;
  });
  assert.equal(onDraining, 'processed: b', 'the live call still runs on the draining socket');

  await start(bridgeArgs.slice(0, 2), { listen: address });
  await page.waitForFunction(() => window.client.state === 'open');
  const outcome = await page.evaluate(async () => {
    const fresh = window.client.bidirectionalStream();
    fresh.send('c');
    fresh.closeSend();
    const freshReply = (await fresh.next()).result;
    const sockets = window.client.socketCount;
    window.live.send('d');
    window.live.closeSend();
    const rest = [];
    for await (const reply of window.live) rest.push(reply.result);
    return {
      freshReply,
      fresh: (await fresh.finished()).code,
      sockets,
      rest,
      live: (await window.live.finished()).code,
      states: window.states,
    };
  });
  assert.deepEqual(outcome, {
    freshReply: 'processed: c',
    fresh: 0,
    sockets: 2,
    rest: ['processed: d'],
    live: 0,
    states: ['reconnecting', 'open'],
  });
  assert.equal(await first.exit, 0, 'the first bridge exits 0: everything drained in time');
  assert.deepEqual(problems, []);
  await page.close();
});

test('the built-in service ends its streams at a drain with UNAVAILABLE, never silently', async () => {
  const server = await start(['--drain-timeout', '30s']);
  const { page, problems } = await clientPage(server);
  await page.evaluate(async () => {
    window.live = window.client.bidirectionalStream();
    window.live.send('a');
    await window.live.next();
  });
  server.child.kill('SIGTERM');
  const status = await page.evaluate(() => window.live.finished());
  assert.equal(status.code, 14);
  assert.match(status.message, /shutting down/);
  assert.equal(await server.exit, 0);
  assert.deepEqual(problems, []);
  await page.close();
});

test('call() and the typed stream work through a bridge in front of an upstream', async () => {
  const upstream = await start();
  const bridge = await start(['--upstream', `http://${upstream.address}`]);
  for (const codec of ['json', 'proto']) {
    const { page, problems } = await clientPage(bridge, { codec });
    const outcome = await page.evaluate(async (codec) => {
      const stream = window.client.bidirectionalStream();
      stream.send('through the bridge');
      stream.closeSend();
      const typed = [];
      for await (const reply of stream) typed.push(reply.result);
      const call = window.client.call('/DataService/BidirectionalStream', { metadata: { 'x-trace': 't1' } });
      // JSON: the method's own JSON, transcoded with the upstream's reflection.
      // proto: StreamRequest { data: "raw" } as bytes.
      call.send(codec === 'json' ? { data: 'as json' } : new Uint8Array([10, 3, 114, 97, 119]));
      call.closeSend();
      const reply = await call.next();
      return {
        typed,
        reply: reply instanceof Uint8Array ? Array.from(reply) : reply,
        status: (await call.finished()).code,
        sockets: window.client.socketCount,
      };
    }, codec);
    assert.deepEqual(outcome.typed, ['processed: through the bridge'], codec);
    assert.deepEqual(
      outcome.reply,
      codec === 'json'
        ? { result: 'processed: as json' }
        : [10, 14, ...Buffer.from('processed: raw')],
      codec,
    );
    assert.equal(outcome.status, 0, codec);
    assert.equal(outcome.sockets, 1, codec);
    assert.deepEqual(problems, []);
    await page.close();
  }
});

/** An ES256 key made here: its JWKS, and tokens signed with it. */
async function jwtSigner() {
  const { generateKeyPairSync, sign } = await import('node:crypto');
  const { publicKey, privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwks = { keys: [{ ...publicKey.export({ format: 'jwk' }), kid: 'page', alg: 'ES256' }] };
  const b64 = (bytes) => Buffer.from(bytes).toString('base64url');
  const token = (claims) => {
    const header = b64(JSON.stringify({ alg: 'ES256', kid: 'page', typ: 'JWT' }));
    const body = b64(JSON.stringify({ exp: Math.floor(Date.now() / 1000) + 600, ...claims }));
    const signature = sign('sha256', Buffer.from(`${header}.${body}`), { key: privateKey, dsaEncoding: 'ieee-p1363' });
    return `${header}.${body}.${b64(signature)}`;
  };
  return { jwks, token };
}

test('a token function is asked before the socket and before each call, and each call carries its own token', async () => {
  const { mkdtempSync, writeFileSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const { join } = await import('node:path');
  const { jwks, token } = await jwtSigner();
  const dir = mkdtempSync(join(tmpdir(), 'streambridge-token-'));
  writeFileSync(join(dir, 'jwks.json'), JSON.stringify(jwks));
  // The built-in service needs a scope the socket's token does not have:
  // only a call's own token can pass.
  writeFileSync(
    join(dir, 'policy.toml'),
    '[[rules]]\nmethods = ["/DataService/*"]\nallow = "authenticated"\nclaims = { scope = "write" }\n',
  );
  const server = await start(['--jwt-jwks', join(dir, 'jwks.json'), '--policy', join(dir, 'policy.toml')]);
  const page = await browser.newPage();
  const problems = [];
  page.on('pageerror', (error) => problems.push(error.message));
  await page.goto(`http://${server.address}/pkg/package.json`);
  const outcome = await page.evaluate(
    async ([url, socketToken, callToken]) => {
      const { default: init, DataClient } = await import('/pkg/streambridge_client.js');
      await init();
      const echo = async (client, data) => {
        const call = client.call('/DataService/BidirectionalStream');
        call.send({ data });
        call.closeSend();
        const reply = await call.next().catch(() => null);
        const status = await call.finished();
        return { reply, code: status.code, message: status.message };
      };
      const asked = [];
      let failing = false;
      const client = await DataClient.connect(url, {
        reconnect: false,
        // A promise, as a page refreshing its token from its own server gives.
        token: () => {
          asked.push(asked.length === 0 ? 'socket' : 'call');
          if (failing) return Promise.reject(new Error('no session'));
          return new Promise((resolve) => setTimeout(() => resolve(asked.length === 1 ? socketToken : callToken), 0));
        },
      });
      const calls = [await echo(client, 'one'), await echo(client, 'two')];
      failing = true;
      const failed = await echo(client, 'three');
      // The same socket token as a fixed string: the policy refuses its calls.
      const fixed = await DataClient.connect(url, { token: socketToken, reconnect: false });
      const refused = await echo(fixed, 'four');
      return { asked, calls, failed, refused, sockets: client.socketCount };
    },
    [`ws://${server.address}/ws`, token({ sub: 'page' }), token({ sub: 'page', scope: 'write' })],
  );
  assert.deepEqual(outcome.asked, ['socket', 'call', 'call', 'call']);
  assert.deepEqual(
    outcome.calls.map((c) => [c.reply, c.code]),
    [
      [{ result: 'processed: one' }, 0],
      [{ result: 'processed: two' }, 0],
    ],
  );
  assert.equal(outcome.sockets, 1, 'one socket for every call');
  assert.equal(outcome.failed.code, 16, outcome.failed.message);
  assert.match(outcome.failed.message, /the token function failed: no session/);
  assert.equal(outcome.refused.code, 7, outcome.refused.message);
  assert.deepEqual(problems, []);
  await page.close();
});

test('calls past the server\'s --ws-max-calls wait in the client for a slot, in order, and all end with 0', async () => {
  const server = await start(['--ws-max-calls', '10']);
  const { page, problems } = await clientPage(server, { maxCalls: 10 });
  const outcome = await page.evaluate(async () => {
    // 60 calls at once on one socket whose server takes 10 at a time.
    const calls = Array.from({ length: 60 }, (_, i) => {
      const call = window.client.call('/DataService/BidirectionalStream');
      call.send({ data: `c${i}` });
      call.closeSend();
      return call;
    });
    return Promise.all(
      calls.map(async (call) => ({ reply: await call.next(), code: (await call.finished()).code })),
    );
  });
  assert.equal(outcome.length, 60);
  outcome.forEach(({ reply, code }, i) => {
    assert.equal(code, 0, `call ${i}`);
    assert.deepEqual(reply, { result: `processed: c${i}` });
  });
  assert.deepEqual(problems, []);
  await page.close();
});

test('what an async producer sends in one turn travels in one WebSocket message', async () => {
  const server = await start();
  const { page, problems } = await clientPage(server);
  const outcome = await page.evaluate(async () => {
    // Each message comes from a microtask of its own (as from connect-es's
    // iterators): the batch must still wait for the end of the turn.
    const frames = [];
    const send = WebSocket.prototype.send;
    WebSocket.prototype.send = function (data) {
      frames.push(data);
      return send.call(this, data);
    };
    try {
      const call = window.client.call('/DataService/BidirectionalStream');
      async function* produce() {
        for (let i = 0; i < 200; i++) yield { data: `m${i}` };
      }
      for await (const message of produce()) call.send(message);
      call.closeSend();
      const replies = [];
      for await (const reply of call) replies.push(reply.result);
      return { frames: frames.length, replies };
    } finally {
      WebSocket.prototype.send = send;
    }
  });
  assert.equal(outcome.frames, 1, 'open, 200 messages and closeSend in one batch');
  assert.deepEqual(outcome.replies, Array.from({ length: 200 }, (_, i) => `processed: m${i}`));
  assert.deepEqual(problems, []);
  await page.close();
});

test('a producer that awaits drained() runs no further ahead than the call\'s request credit, and loses nothing', async () => {
  const server = await start();
  const { page, problems } = await clientPage(server);
  const outcome = await page.evaluate(async () => {
    // A window of 4 replies, not read yet: the server answers 4 and then
    // grants no request credit, so past its first 256 requests wait.
    const call = window.client.call('/DataService/BidirectionalStream', { window: 4 });
    let pulled = 0;
    const producer = (async () => {
      for (let i = 0; i < 1000; i++) {
        pulled++;
        call.send({ data: `m${i}` });
        if (call.queuedRequests > 0) await call.drained();
      }
      call.closeSend();
    })();
    // Every pending microtask has run by the next task: the producer ran
    // until it sent past the credit (256 on the wire, one queued) and waits.
    await new Promise((resolve) => setTimeout(resolve, 0));
    const whileUnread = { pulled, queued: call.queuedRequests };
    const replies = [];
    for await (const reply of call) replies.push(reply.result);
    await producer;
    return { whileUnread, replies, status: (await call.finished()).code };
  });
  assert.deepEqual(outcome.whileUnread, { pulled: 257, queued: 1 });
  assert.equal(outcome.replies.length, 1000);
  outcome.replies.forEach((reply, i) => assert.equal(reply, `processed: m${i}`));
  assert.equal(outcome.status, 0);
  assert.deepEqual(problems, []);
  await page.close();
});

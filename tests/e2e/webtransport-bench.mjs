// Browser benchmark of WebTransport (a report, not a test): in one page of
// headless Chromium, the WASM client streams 16-byte messages on one stream,
// and then ping-pongs one message at a time, over WebTransport and over its
// WebSocket (wss: both encrypted, to the same TLS server), alternating
// within each round. Throughput: messages sent at once, every reply read
// (msg/s). Ping-pong: each message sent only after the previous reply
// (p50/p99 of the round trips). `cargo xtask bench-browser` runs it
// against a release server pinned to its own CPU; see docs/benchmarks.md.
//
//   STREAMBRIDGE_BIN   the server (required): the release streambridge binary
//                      (the built-in service), or the bench crate's
//                      bench-added-service (the same method as an added
//                      service: the path users' services take; xtask uses it)
//   BENCH_ROUNDS       rounds (default 5)
//   BENCH_MESSAGES     messages per throughput run (default 100000)
//   BENCH_PINGS        round trips per ping-pong run (default 2000)
//   BENCH_SERVER_CPU   the CPU the server is pinned to (default 1; Chromium
//                      runs where this script runs: pin it with taskset)
//   BENCH_OUT          file to write the results to as JSON (optional)
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { launchChromium } from './chromium.mjs';
import { startStreambridge, staticDir } from './streambridge.mjs';
import { makeCertificate } from './webtransport-certificate.mjs';

const rounds = Number(process.env.BENCH_ROUNDS ?? 5);
const messages = Number(process.env.BENCH_MESSAGES ?? 100000);
const pings = Number(process.env.BENCH_PINGS ?? 2000);
const serverCpu = process.env.BENCH_SERVER_CPU ?? '1';

const dir = mkdtempSync(path.join(tmpdir(), 'streambridge-wt-bench-'));
const { cert, key, hash } = makeCertificate(dir);

const server = await startStreambridge(
  ['--tls-cert', cert, '--tls-key', key, '--static-dir', staticDir, '--webtransport-listen', '127.0.0.1:0'],
  { program: process.env.STREAMBRIDGE_BIN },
);
// Every thread of the server on its own CPU (threads it starts later inherit it).
execFileSync('taskset', ['-a', '-pc', serverCpu, String(server.child.pid)], { stdio: 'ignore' });
const browser = await launchChromium();
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  await page.goto(`https://${server.address}/pkg/package.json`);
  await page.evaluate(async ([url, webtransport, hash]) => {
    const { default: init, DataClient } = await import('/pkg/streambridge_client.js');
    await init();
    const serverCertificateHashes = [{ algorithm: 'sha-256', value: new Uint8Array(hash) }];
    window.clients = {
      webtransport: await DataClient.connect(url, { webtransport, serverCertificateHashes, transports: ['webtransport'] }),
      websocket: await DataClient.connect(url, { transports: ['websocket'] }),
    };
    const payload = 'x'.repeat(16);
    window.throughput = async (way, count) => {
      const stream = window.clients[way].bidirectionalStream();
      const started = performance.now();
      for (let i = 0; i < count; i++) stream.send(payload);
      stream.closeSend();
      let received = 0;
      for await (const _ of stream) received++;
      const seconds = (performance.now() - started) / 1000;
      if (received !== count || (await stream.finished()).code !== 0) throw new Error(`${way}: ${received} of ${count}`);
      return count / seconds;
    };
    window.pingPong = async (way, count) => {
      const stream = window.clients[way].bidirectionalStream();
      const trips = [];
      for (let i = 0; i < count; i++) {
        const sent = performance.now();
        stream.send(payload);
        await stream.next();
        trips.push(performance.now() - sent);
      }
      stream.closeSend();
      await stream.finished();
      trips.sort((a, b) => a - b);
      const at = (q) => trips[Math.min(trips.length - 1, Math.floor(q * trips.length))];
      return { p50: at(0.5), p99: at(0.99) };
    };
    if (window.clients.webtransport.transport !== 'webtransport') throw new Error('not on WebTransport');
  }, [`wss://${server.address}/ws`, `https://${server.webtransport}/ws`, hash]);

  const run = (fn, way, count) => page.evaluate(([fn, way, count]) => window[fn](way, count), [fn, way, count]);
  // Warm-up, not reported: WASM and JavaScript compile in tiers.
  for (const way of ['webtransport', 'websocket']) {
    await run('throughput', way, Math.min(messages, 20000));
    await run('pingPong', way, Math.min(pings, 200));
  }
  const results = [];
  for (let round = 1; round <= rounds; round++) {
    // Alternate which goes first: neither always runs on a warmer page.
    const order = round % 2 ? ['webtransport', 'websocket'] : ['websocket', 'webtransport'];
    const result = { round };
    for (const way of order) {
      result[way] = { msgPerSec: await run('throughput', way, messages), ...(await run('pingPong', way, pings)) };
    }
    result.throughputRatio = result.webtransport.msgPerSec / result.websocket.msgPerSec;
    result.p50Ratio = result.webtransport.p50 / result.websocket.p50;
    results.push(result);
    const show = (r) => `${Math.round(r.msgPerSec)} msg/s, ping p50 ${r.p50.toFixed(3)} ms p99 ${r.p99.toFixed(3)} ms`;
    console.log(
      `round ${round}: WebTransport ${show(result.webtransport)}; WebSocket ${show(result.websocket)}; ` +
        `throughput WT/WS ${result.throughputRatio.toFixed(2)}x, p50 WT/WS ${result.p50Ratio.toFixed(2)}x`,
    );
  }
  const spread = (pick) => {
    const values = results.map(pick).sort((a, b) => a - b);
    return { median: values[Math.floor(values.length / 2)], min: values[0], max: values.at(-1) };
  };
  const summary = {
    messages,
    pings,
    webtransportMsgPerSec: spread((r) => r.webtransport.msgPerSec),
    websocketMsgPerSec: spread((r) => r.websocket.msgPerSec),
    throughputRatio: spread((r) => r.throughputRatio),
    webtransportP50: spread((r) => r.webtransport.p50),
    websocketP50: spread((r) => r.websocket.p50),
    webtransportP99: spread((r) => r.webtransport.p99),
    websocketP99: spread((r) => r.websocket.p99),
  };
  console.log(JSON.stringify(summary, null, 2));
  if (process.env.BENCH_OUT) writeFileSync(process.env.BENCH_OUT, JSON.stringify({ results, summary }, null, 2));
} finally {
  await browser.close();
  server.child.kill('SIGTERM');
  rmSync(dir, { recursive: true, force: true });
}

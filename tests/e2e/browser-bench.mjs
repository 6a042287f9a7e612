// Browser throughput benchmark (a report, not a test): in one page and one
// run, headless Chromium streams 16-byte messages on one stream through the
// WASM client (protocol v2, batched) over its WebSocket and over the HTTP
// fallback (`transports: ['http']`), and through a raw JavaScript WebSocket
// sending one message per frame (protocol v1 json), all reading every reply.
// It drives the page's own demo (static/app.js), so the page shows the same
// figures, over Chromium's DevTools pipe with nothing but Runtime.evaluate
// (bare-chromium.mjs: Playwright would copy every frame to the driver).
// `cargo xtask bench` runs it against a release server pinned to its own
// CPU; see docs/benchmarks.md.
//
//   STREAMBRIDGE_BASE_URL  the server (required)
//   BENCH_ROUNDS           rounds, each running both (default 3)
//   BENCH_CLIENT_MESSAGES  messages per client run (default 200000)
//   BENCH_RAW_MESSAGES     messages per raw run (default 20000)
//   BENCH_OUT              file to write the results to as JSON (optional)
import { writeFileSync } from 'node:fs';
import { openBare } from './bare-chromium.mjs';

const base = process.env.STREAMBRIDGE_BASE_URL;
if (!base) throw new Error('set STREAMBRIDGE_BASE_URL to a running server');
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
const clientMessages = Number(process.env.BENCH_CLIENT_MESSAGES ?? 200000);
const rawMessages = Number(process.env.BENCH_RAW_MESSAGES ?? 20000);

const page = await openBare(base + '/');
const run = (kind, count, codec) =>
  page.evaluate(`window.streambridgeReady.then(() => window.streambridgeDemo.run(${JSON.stringify(kind)}, ${count}, ${JSON.stringify(codec ?? 'json')}))`);
try {
  // Warm-up, not reported: WASM and JavaScript are compiled in tiers, and the
  // first run of each path runs on the baseline tier.
  for (const codec of ['json', 'proto', 'http-json', 'http-proto']) {
    await run('client', Math.min(clientMessages, 50000), codec);
  }
  await run('raw', Math.min(rawMessages, 2000));
  const results = [];
  for (let round = 1; round <= rounds; round++) {
    // Raw first, then the client: neither always runs on a warmer page.
    const raw = await run('raw', rawMessages);
    const client = await run('client', clientMessages, 'json');
    const proto = await run('client', clientMessages, 'proto');
    const httpJson = await run('client', clientMessages, 'http-json');
    const httpProto = await run('client', clientMessages, 'http-proto');
    results.push({
      round,
      raw,
      client,
      proto,
      httpJson,
      httpProto,
      ratio: client / raw,
      protoRatio: proto / raw,
      httpJsonRatio: httpJson / raw,
      httpProtoRatio: httpProto / raw,
      httpJsonOfSocket: httpJson / client,
      httpProtoOfSocket: httpProto / proto,
    });
    console.log(
      `round ${round}: raw WebSocket ${Math.round(raw)} msg/s; wasm client json ${Math.round(client)} msg/s ` +
        `(${(client / raw).toFixed(1)}x), proto ${Math.round(proto)} msg/s (${(proto / raw).toFixed(1)}x); ` +
        `over HTTP json ${Math.round(httpJson)} msg/s (${(httpJson / raw).toFixed(1)}x raw, ` +
        `${(httpJson / client).toFixed(2)} of the socket), proto ${Math.round(httpProto)} msg/s ` +
        `(${(httpProto / raw).toFixed(1)}x raw, ${(httpProto / proto).toFixed(2)} of the socket)`,
    );
  }
  const sorted = (key) => results.map((r) => r[key]).sort((a, b) => a - b);
  const median = (values) => values[Math.floor(values.length / 2)];
  const summary = {
    clientMessages,
    rawMessages,
    rounds,
    results,
  };
  for (const key of [
    'raw',
    'client',
    'proto',
    'httpJson',
    'httpProto',
    'ratio',
    'protoRatio',
    'httpJsonRatio',
    'httpProtoRatio',
    'httpJsonOfSocket',
    'httpProtoOfSocket',
  ]) {
    const values = sorted(key);
    summary[key] = { median: median(values), min: values[0], max: values.at(-1) };
  }
  const rate = (key) =>
    `${Math.round(summary[key].median)} msg/s (${Math.round(summary[key].min)}–${Math.round(summary[key].max)})`;
  const ratio = (key) =>
    `${summary[key].median.toFixed(1)}x (${summary[key].min.toFixed(1)}–${summary[key].max.toFixed(1)}x)`;
  console.log(`raw WebSocket, one message per frame: ${rate('raw')}`);
  console.log(`WASM client, json:  ${rate('client')}, ${ratio('ratio')} raw (target ≥ 50x)`);
  console.log(`WASM client, proto: ${rate('proto')}, ${ratio('protoRatio')} raw`);
  console.log(
    `HTTP fallback, json:  ${rate('httpJson')}, ${ratio('httpJsonRatio')} raw (target ≥ 3x), ` +
      `${ratio('httpJsonOfSocket')} of the socket (target ≥ 0.5x)`,
  );
  console.log(
    `HTTP fallback, proto: ${rate('httpProto')}, ${ratio('httpProtoRatio')} raw (target ≥ 3x), ` +
      `${ratio('httpProtoOfSocket')} of the socket (target ≥ 0.5x)`,
  );
  if (process.env.BENCH_OUT) writeFileSync(process.env.BENCH_OUT, JSON.stringify(summary, null, 2));
} finally {
  await page.close();
}

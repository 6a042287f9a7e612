// connect-es on our transport in Chromium (a report, not a test; issue 25):
// one stream of 16 B messages through connect-es's generated DataService
// client against the WASM client's own typed stream and a raw WebSocket
// (one message per frame) in the same page, then 1 000 concurrent unary
// calls on one transport. Same harness as ../browser-bench.mjs (bare
// Chromium over its DevTools pipe); `cargo xtask bench-browser` runs both.
//
//   STREAMBRIDGE_BASE_URL  the server (required); its static dir is the
//                          repository's static/ (the page goes to static/connect-bench/)
//   BENCH_ROUNDS           rounds (default 3)
//   BENCH_CLIENT_MESSAGES  messages per connect-es and typed run (default 100000)
//   BENCH_RAW_MESSAGES     messages per raw run (default 20000)
//   BENCH_UNARY_CALLS      concurrent unary calls (default 1000)
//   BENCH_OUT              file to write the results to as JSON (optional)
import { execFileSync } from 'node:child_process';
import { gzipSync } from 'node:zlib';
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import { openBare } from '../bare-chromium.mjs';

const base = process.env.STREAMBRIDGE_BASE_URL;
if (!base) throw new Error('set STREAMBRIDGE_BASE_URL to a running server');
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
const messages = Number(process.env.BENCH_CLIENT_MESSAGES ?? 100000);
const rawMessages = Number(process.env.BENCH_RAW_MESSAGES ?? 20000);
const unaryCalls = Number(process.env.BENCH_UNARY_CALLS ?? 1000);

const here = path.dirname(fileURLToPath(import.meta.url));
const e2e = path.dirname(here);
const root = path.resolve(e2e, '../..');

// protoc-gen-es output for DataService and Health, and the bundle.
const gen = mkdtempSync(path.join(tmpdir(), 'streambridge-connect-bench-'));
const env = { ...process.env, PATH: `${path.join(e2e, 'node_modules/.bin')}:${process.env.PATH}` };
for (const input of [path.join(root, 'proto'), here]) {
  execFileSync(path.join(e2e, 'node_modules/.bin/buf'), ['generate', input, '--template', path.join(here, 'buf.gen.yaml'), '-o', path.join(gen, 'gen')], { env, stdio: 'inherit' });
}
copyFileSync(path.join(here, 'bench-app.ts'), path.join(gen, 'bench-app.ts'));
const pageDir = path.join(root, 'static/connect-bench');
mkdirSync(pageDir, { recursive: true });
await esbuild.build({
  entryPoints: [path.join(gen, 'bench-app.ts')],
  bundle: true,
  minify: true,
  format: 'esm',
  target: 'es2022',
  outfile: path.join(pageDir, 'app.js'),
  preserveSymlinks: true,
  nodePaths: [path.join(e2e, 'node_modules')],
  logLevel: 'warning',
});
writeFileSync(path.join(pageDir, 'index.html'), '<!doctype html><meta charset="utf-8"><script type="module" src="/connect-bench/app.js"></script>');

// What `./connect` adds to a page: its own JavaScript, and with connect-es
// and @bufbuild/protobuf (which an application using connect-es has anyway).
const connectOnly = await esbuild.build({
  stdin: { contents: "export * from 'streambridge-client/connect';", resolveDir: e2e },
  bundle: true,
  minify: true,
  format: 'esm',
  write: false,
  preserveSymlinks: true,
  external: ['@connectrpc/connect', '@connectrpc/connect/protocol', '@bufbuild/protobuf', '@bufbuild/protobuf/wire', './streambridge_client.js'],
  nodePaths: [path.join(e2e, 'node_modules')],
});
const connectJs = gzipSync(connectOnly.outputFiles[0].contents, { level: 9 }).length;
const wasm = gzipSync(readFileSync(path.join(root, 'static/pkg/streambridge_client_bg.wasm')), { level: 9 }).length;

const page = await openBare(`${base}/connect-bench/index.html`);
const run = (kind, count) => page.evaluate(`window.benchReady.then(() => window.bench.${kind}(${count}))`);
try {
  // Warm-up (tiers of JIT), not reported.
  await run('connect', Math.min(messages, 20000));
  await run('typed', Math.min(messages, 20000));
  await run('raw', Math.min(rawMessages, 2000));
  await run('unary', Math.min(unaryCalls, 100));
  const results = [];
  for (let round = 1; round <= rounds; round++) {
    const raw = await run('raw', rawMessages);
    const typed = await run('typed', messages);
    const connect = await run('connect', messages);
    const unary = await run('unary', unaryCalls);
    results.push({ round, raw, typed, connect, toTyped: connect / typed, toRaw: connect / raw, unaryP50: unary.p50, unaryP99: unary.p99, unaryAnswered: unary.answered });
    console.log(
      `round ${round}: connect-es ${Math.round(connect)} msg/s, typed stream ${Math.round(typed)} msg/s ` +
        `(${(connect / typed).toFixed(2)}x), raw ${Math.round(raw)} msg/s (${(connect / raw).toFixed(1)}x); ` +
        `${unary.answered}/${unaryCalls} unary calls, p50 ${unary.p50.toFixed(1)} ms, p99 ${unary.p99.toFixed(1)} ms`,
    );
  }
  const summary = { messages, rawMessages, unaryCalls, rounds, results, gzipped: { connectJs, wasm } };
  for (const key of ['raw', 'typed', 'connect', 'toTyped', 'toRaw', 'unaryP50', 'unaryP99']) {
    const values = results.map((r) => r[key]).sort((a, b) => a - b);
    summary[key] = { median: values[Math.floor(values.length / 2)], min: values[0], max: values.at(-1) };
  }
  const spread = (key, digits = 0) =>
    `${summary[key].median.toFixed(digits)} (${summary[key].min.toFixed(digits)}–${summary[key].max.toFixed(digits)})`;
  console.log(`connect-es bidi: ${spread('connect')} msg/s; ${spread('toTyped', 2)}x the typed stream (target ≥ 0.7x), ${spread('toRaw', 1)}x raw (target ≥ 10x)`);
  console.log(`${unaryCalls} concurrent unary calls: p50 ${spread('unaryP50', 1)} ms, p99 ${spread('unaryP99', 1)} ms`);
  console.log(`gzipped: ./connect ${connectJs} B of JavaScript; the .wasm ${wasm} B (budget 60 KB)`);
  if (process.env.BENCH_OUT) writeFileSync(process.env.BENCH_OUT, JSON.stringify(summary, null, 2));
} finally {
  await page.close();
}

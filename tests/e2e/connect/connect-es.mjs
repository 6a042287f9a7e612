// The connect-es transport in headless Chromium (run by tests/connect_es.rs,
// which starts the bridges and checks what the servers saw): code generated
// by protoc-gen-es (through buf) from tests/proto/echo.proto, bundled by
// esbuild with the package as a user installs it (`streambridge-client`
// from ../../static/pkg), on a page each bridge serves.
//
// STREAMBRIDGE_STATIC_DIR: the bridges' --static-dir (the page goes there).
// STREAMBRIDGE_BRIDGES: JSON [{ "name", "address" }].
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import { launchChromium } from '../chromium.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const e2e = path.dirname(here);
const root = path.resolve(e2e, '../..');
const staticDir = process.env.STREAMBRIDGE_STATIC_DIR;
const bridges = JSON.parse(process.env.STREAMBRIDGE_BRIDGES ?? '[]');

/** protoc-gen-es output for the test protos, in a fresh directory. */
function generate() {
  const out = mkdtempSync(path.join(tmpdir(), 'streambridge-connect-gen-'));
  const env = { ...process.env, PATH: `${path.join(e2e, 'node_modules/.bin')}:${process.env.PATH}` };
  const buf = path.join(e2e, 'node_modules/.bin/buf');
  for (const input of [path.join(root, 'tests/proto'), here]) {
    execFileSync(buf, ['generate', input, '--template', path.join(here, 'buf.gen.yaml'), '-o', path.join(out, 'gen')], {
      env,
      stdio: 'inherit',
    });
  }
  return out;
}

test('connect-es clients run on the streambridge transport', async (t) => {
  assert.ok(staticDir && bridges.length > 0, 'run by tests/connect_es.rs');
  const gen = generate();
  // The app beside its generated code, so `./gen/...` resolves.
  copyFileSync(path.join(here, 'app.ts'), path.join(gen, 'app.ts'));
  await esbuild.build({
    entryPoints: [path.join(gen, 'app.ts')],
    bundle: true,
    format: 'esm',
    target: 'es2022',
    outfile: path.join(staticDir, 'app.js'),
    // The package is a link into static/pkg: resolve its imports (the peer
    // dependencies) from here, where a user's node_modules would be.
    preserveSymlinks: true,
    nodePaths: [path.join(e2e, 'node_modules')],
    logLevel: 'warning',
  });
  copyFileSync(path.join(root, 'static/pkg/streambridge_client_bg.wasm'), path.join(staticDir, 'streambridge_client_bg.wasm'));
  writeFileSync(
    path.join(staticDir, 'index.html'),
    `<!doctype html><meta charset="utf-8"><title>connect-es</title>
<script>
  // Counts the page's WebSockets: every call must share one.
  window.sockets = 0;
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) { super(...args); window.sockets += 1; }
  };
</script>
<script type="module" src="/app.js"></script>`,
  );

  const browser = await launchChromium();
  try {
    // A bridge with `webtransport` (its UDP address) and `hash` (its
    // certificate's SHA-256, hex) has TLS: its page is HTTPS, its calls go
    // over WebTransport.
    const ways = (bridge) => (bridge.webtransport ? ['webtransport'] : ['websocket', 'http']);
    for (const [bridge, transport] of bridges.flatMap((bridge) => ways(bridge).map((way) => [bridge, way]))) {
      await t.test(`${bridge.name} over ${transport}`, async () => {
        const context = await browser.newContext({ ignoreHTTPSErrors: true });
        const page = await context.newPage();
        const problems = [];
        page.on('pageerror', (error) => problems.push(error.message));
        const origin = bridge.webtransport ? `https://${bridge.address}` : `http://${bridge.address}`;
        const wt = bridge.webtransport ? `&wt=${bridge.webtransport}&hash=${bridge.hash}` : '';
        await page.goto(`${origin}/index.html?transport=${transport}${wt}`);
        await page.waitForFunction(() => window.ready !== undefined);
        await page.evaluate(() => window.ready);
        const run = (name) => page.evaluate((name) => window.scenarios[name](), name);

        const unary = await run('unary');
        assert.deepEqual(
          { ...unary, timeoutMs: undefined },
          { text: 'hello', sawApp: 'page', sawInterceptor: 'yes', timeoutMs: undefined, header: 'from-upstream', trailerKnown: true },
        );
        assert.ok(unary.timeoutMs > 50_000 && unary.timeoutMs <= 60_000, `the service's deadline: ${unary.timeoutMs} ms`);
        assert.deepEqual(await run('serverStream'), ['s 0', 's 1', 's 2']);
        assert.equal(await run('clientStream'), 'a,b,c');
        assert.deepEqual(await run('bidiPingPong'), [
          'ping 1 (after 1 sent)',
          'ping 2 (after 2 sent)',
          'ping 3 (after 3 sent)',
        ]);
        const error = await run('errorWithDetails');
        assert.equal(error.code, 'FailedPrecondition', JSON.stringify(error));
        assert.equal(error.rawMessage, 'failed as asked: no');
        assert.deepEqual(error.details, ['google.rpc.ErrorInfo']);
        assert.ok(error.detailBytes[0].length > 0);
        assert.equal(error.trailer, 'from-upstream', 'trailers are the error\'s metadata');
        const streamError = await run('streamError');
        assert.deepEqual(streamError.texts, ['e 0', 'e 1']);
        assert.equal(streamError.error.code, 'NotFound');
        assert.equal((await run('unknownMethod')).code, 'Unimplemented');
        const aborted = await run('abort');
        assert.deepEqual(aborted.texts, ['a 0']);
        assert.equal(aborted.error.code, 'Canceled', JSON.stringify(aborted));
        assert.equal(aborted.endedAtTheBridge, true, 'the abort ended the call at the bridge');
        assert.equal((await run('deadline')).code, 'DeadlineExceeded');
        assert.equal(await run('fiftyUnary'), true);
        const counts = await run('counts');
        if (transport !== 'websocket') {
          assert.equal(counts.sockets, 0, `no WebSocket: every call over ${transport}`);
        } else {
          assert.equal(counts.sockets, 1, 'one WebSocket for every call of every client');
        }
        assert.ok(counts.intercepted >= 57, `the interceptor saw every call: ${counts.intercepted}`);
        // On a transport of its own (a second socket): after the counts.
        const producer = await run('fastProducer');
        console.log(`${bridge.name} over ${transport}: pulled ${producer.whileUnread} of ${producer.total} while no reply was read`);
        assert.ok(producer.whileUnread < producer.total / 2, `pulled ${producer.whileUnread} of ${producer.total} while no reply was read`);
        assert.deepEqual([producer.replies, producer.inOrder], [producer.total, true], 'every reply, in order');
        assert.deepEqual(problems, []);
        await context.close();
      });
    }
  } finally {
    await browser.close();
  }
});

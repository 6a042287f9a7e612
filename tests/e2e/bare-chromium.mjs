// Chromium driven over its DevTools pipe with nothing but Runtime.evaluate,
// for the browser benchmark. Playwright enables DevTools' Network domain on
// every page, which copies every WebSocket frame (payload included) to the
// driver: measured here, that costs the browser and the driver process about
// a third of a CPU at 100k messages/s. Benchmarks must not pay for it.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromiumArgs, executablePath } from './chromium.mjs';

/** Opens `url` in a fresh headless Chromium; returns `{ evaluate, close }`. */
export async function openBare(url) {
  const profile = mkdtempSync(path.join(tmpdir(), 'streambridge-chromium-'));
  const child = spawn(executablePath, [...chromiumArgs, '--remote-debugging-pipe', `--user-data-dir=${profile}`, 'about:blank'], {
    stdio: ['ignore', 'ignore', 'ignore', 'pipe', 'pipe'],
  });
  const [toBrowser, fromBrowser] = [child.stdio[3], child.stdio[4]];
  const waiting = new Map();
  const events = new Map();
  let nextId = 1;
  let buffered = '';
  fromBrowser.setEncoding('utf8');
  fromBrowser.on('data', (chunk) => {
    buffered += chunk;
    let end;
    while ((end = buffered.indexOf('\0')) >= 0) {
      const message = JSON.parse(buffered.slice(0, end));
      buffered = buffered.slice(end + 1);
      if (message.method) events.get(message.method)?.(message.params);
      const pending = waiting.get(message.id);
      if (!pending) continue;
      waiting.delete(message.id);
      if (message.error) pending.reject(new Error(`${pending.method}: ${message.error.message}`));
      else pending.resolve(message.result);
    }
  });
  const send = (method, params = {}, sessionId) =>
    new Promise((resolve, reject) => {
      const id = nextId++;
      waiting.set(id, { resolve, reject, method });
      toBrowser.write(JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) }) + '\0');
    });
  const { targetId } = await send('Target.createTarget', { url: 'about:blank' });
  const { sessionId } = await send('Target.attachToTarget', { targetId, flatten: true });
  await send('Page.enable', {}, sessionId);
  const loaded = new Promise((resolve) => events.set('Page.loadEventFired', resolve));
  await send('Page.navigate', { url }, sessionId);
  await loaded;
  return {
    /** A DevTools command on the page (for profiling by hand). */
    send: (method, params) => send(method, params, sessionId),
    /** The value of `expression` (awaited if it is a promise), or its exception. */
    async evaluate(expression) {
      const { result, exceptionDetails } = await send(
        'Runtime.evaluate',
        { expression, awaitPromise: true, returnByValue: true },
        sessionId,
      );
      if (exceptionDetails) throw new Error(exceptionDetails.exception?.description ?? exceptionDetails.text);
      return result.value;
    },
    async close() {
      await send('Browser.close').catch(() => {});
      if (child.exitCode === null) await once(child, 'exit');
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

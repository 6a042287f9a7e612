// WASM clients in headless Chromium for tests/deploy.rs's rolling restart
// (not a test of its own). Opens the page through the load balancer (HTTPS,
// trusting only the test's certificate), starts STREAMBRIDGE_CLIENTS
// clients (STREAMBRIDGE_HTTP_CLIENTS more on the HTTP fallback, with
// `transports: ['http']`), each ping-ponging on one DataService stream and
// starting a new one whenever a stream is cut, and talks to the Rust test
// over stdio:
//
//   prints `ready`        once every client has replies;
//   reads  `mark`         then prints `progressed` once every client has 20
//                         more replies (the restarts are over);
//   reads  `stop`         then stops the clients and prints one JSON line:
//                         { clients: [{ transport, sent, replied, unanswered, cut,
//                         repliedAfterRestart, longestOfflineMs, longestGapMs }],
//                         summary }: a gap is from a cut to the next reply.
//
// Every request is accounted for: `sent = replied + unanswered`, where an
// unanswered request's stream ended with a non-OK status.
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';
import { chromiumArgs, executablePath } from './chromium.mjs';

const base = process.env.STREAMBRIDGE_BASE_URL;
const count = Number(process.env.STREAMBRIDGE_CLIENTS ?? 10);
const httpCount = Number(process.env.STREAMBRIDGE_HTTP_CLIENTS ?? 0);
const spki = process.env.STREAMBRIDGE_CA_SPKI;

const browser = await chromium.launch({
  executablePath,
  args: [...chromiumArgs, ...(spki ? [`--ignore-certificate-errors-spki-list=${spki}`] : [])],
});
try {
  const page = await browser.newPage();
  page.on('pageerror', (error) => console.log(`page error: ${error.message}`));
  await page.goto(base + '/');
  await page.evaluate(async ([count, httpCount]) => {
    // The page's app.js may still be loading the module: init() is idempotent.
    const { default: init, DataClient } = await import('/pkg/streambridge_client.js');
    await init();
    const url = `wss://${location.host}/ws`;
    window.tallies = [];
    for (let i = 0; i < count + httpCount; i++) {
      const transports = i < count ? ['websocket'] : ['http'];
      const tally = { transport: transports[0], sent: 0, replied: 0, unanswered: 0, cut: 0, mark: 0, longestOfflineMs: 0, longestGapMs: 0, stop: false };
      window.tallies.push(tally);
      tally.done = (async () => {
        const client = await DataClient.connect(url, { transports, reconnect: { initialDelayMs: 50, maxDelayMs: 500 } });
        if (client.transport !== transports[0]) throw new Error(`connected over ${client.transport}`);
        let offlineSince = null;
        let lostAt = null;
        client.onstatechange = (state) => {
          if (state === 'reconnecting') offlineSince ??= performance.now();
          if (state === 'open' && offlineSince !== null) {
            tally.longestOfflineMs = Math.max(tally.longestOfflineMs, performance.now() - offlineSince);
            offlineSince = null;
          }
        };
        while (!tally.stop) {
          const stream = client.bidirectionalStream();
          try {
            while (!tally.stop) {
              const seq = ++tally.sent;
              stream.send(String(seq));
              const reply = await stream.next();
              if (reply === null) throw new Error(`stream ${seq} ended OK with a request unanswered`);
              if (reply.result !== `processed: ${seq}`) throw new Error(`reply ${reply.result} to ${seq}`);
              tally.replied++;
              if (lostAt !== null) {
                tally.longestGapMs = Math.max(tally.longestGapMs, performance.now() - lostAt);
                lostAt = null;
              }
            }
            stream.closeSend();
            const status = await stream.finished();
            if (status.code !== 0) throw new Error(`closing status ${status.code} (${tally.transport}): ${status.message}`);
          } catch (error) {
            if (error.name !== 'StreamError' || !error.code) throw error;
            tally.unanswered++;
            tally.cut++;
            lostAt ??= performance.now();
          }
        }
        client.close();
      })();
    }
  }, [count, httpCount]);
  const everyClientHas = (n) =>
    page.waitForFunction((n) => window.tallies.every((t) => t.replied - t.mark >= n), n, { timeout: 60_000 });
  await everyClientHas(5);
  console.log('ready');
  for await (const line of createInterface({ input: process.stdin })) {
    if (line === 'mark') {
      await page.evaluate(() => window.tallies.forEach((t) => (t.mark = t.replied)));
      await everyClientHas(20);
      console.log('progressed');
    } else if (line === 'stop') {
      const clients = await page.evaluate(async () => {
        window.tallies.forEach((t) => (t.stop = true));
        await Promise.all(window.tallies.map((t) => t.done));
        return window.tallies.map(({ transport, sent, replied, unanswered, cut, mark, longestOfflineMs, longestGapMs }) => ({
          transport,
          sent,
          replied,
          unanswered,
          cut,
          repliedAfterRestart: replied - mark,
          longestOfflineMs: Math.round(longestOfflineMs),
          longestGapMs: Math.round(longestGapMs),
        }));
      });
      const sum = (key) => clients.reduce((total, c) => total + c[key], 0);
      const longest = (key) => Math.max(...clients.map((c) => c[key]));
      const summary = `${clients.length} clients (${httpCount} over HTTP), ${sum('sent')} requests, ${sum('cut')} streams cut, ` +
        `longest gap ${longest('longestGapMs')} ms, longest without a socket ${longest('longestOfflineMs')} ms`;
      console.log(JSON.stringify({ clients, summary }));
      break;
    }
  }
} finally {
  await browser.close();
}

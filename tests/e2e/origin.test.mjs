// End-to-end: `--allowed-origin` as a browser meets it. Pages served from two
// other origins (small Node servers on their own ports) open a WebSocket to
// streambridge and make a gRPC-Web call with fetch(); the server allows one
// origin and not the other. The browser sends the real Origin header and
// enforces CORS itself: nothing here is simulated.
//
// STREAMBRIDGE_BIN: the streambridge binary (cargo xtask test sets it).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { once } from 'node:events';
import { launchChromium } from './chromium.mjs';
import { startStreambridge } from './streambridge.mjs';

/** An HTTP server on 127.0.0.1:0 answering every path with an empty page. */
async function pageServer() {
  const server = createServer((_, response) => {
    response.writeHead(200, { 'content-type': 'text/html' });
    response.end('<!doctype html><title>another origin</title>');
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}

let browser, allowed, refused, bridge;

before(async () => {
  [allowed, refused] = await Promise.all([pageServer(), pageServer()]);
  bridge = await startStreambridge(['--allowed-origin', allowed.origin]);
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  bridge?.child.kill();
  allowed?.server.close();
  refused?.server.close();
});

/** In a page of `origin`: one WebSocket round trip, and one gRPC-Web call. */
async function tryFrom(origin) {
  const page = await browser.newPage();
  await page.goto(origin + '/');
  const result = await page.evaluate(async (address) => {
    const websocket = await new Promise((resolve) => {
      const socket = new WebSocket(`ws://${address}/ws`, ['streambridge.v1.json']);
      socket.onopen = () => socket.send(JSON.stringify({ request: { data: 'from afar' } }));
      socket.onmessage = (event) => {
        resolve(JSON.parse(event.data).response?.result ?? event.data);
        socket.close();
      };
      socket.onclose = (event) => resolve(`closed ${event.code}`);
    });
    // One StreamRequest { data: "x" }: field 1, length 1, "x", in a gRPC-Web frame.
    const body = new Uint8Array([0, 0, 0, 0, 3, 0x0a, 0x01, 0x78]);
    let grpcWeb;
    try {
      const response = await fetch(`http://${address}/DataService/BidirectionalStream`, {
        method: 'POST',
        headers: { 'content-type': 'application/grpc-web', 'x-grpc-web': '1' },
        body,
      });
      const bytes = new Uint8Array(await response.arrayBuffer());
      grpcWeb = new TextDecoder().decode(bytes.slice(5, 5 + bytes[4])).slice(2);
    } catch (error) {
      grpcWeb = `fetch failed: ${error.message}`;
    }
    return { websocket, grpcWeb };
  }, bridge.address);
  await page.close();
  return result;
}

test('a page on an allowed origin streams over WebSocket and calls gRPC-Web', async () => {
  const result = await tryFrom(allowed.origin);
  assert.deepEqual(result, { websocket: 'processed: from afar', grpcWeb: 'processed: x' });
});

test('a page on any other origin is refused on both', async () => {
  const result = await tryFrom(refused.origin);
  // The browser hides the 403 of a refused upgrade: the socket just closes (1006).
  assert.equal(result.websocket, 'closed 1006');
  assert.match(result.grpcWeb, /^fetch failed/);
});

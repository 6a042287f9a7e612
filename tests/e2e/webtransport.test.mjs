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
import { execFileSync } from 'node:child_process';
import { X509Certificate, createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { launchChromium } from './chromium.mjs';
import { startStreambridge, staticDir } from './streambridge.mjs';

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
  const [cert, key] = [path.join(dir, 'cert.pem'), path.join(dir, 'key.pem')];
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '10', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    '-addext', 'basicConstraints=critical,CA:FALSE',
    '-addext', 'keyUsage=critical,digitalSignature',
    '-addext', 'extendedKeyUsage=serverAuth',
  ], { stdio: 'ignore' });
  const der = new X509Certificate(readFileSync(cert)).raw;
  return { cert, key, hash: [...createHash('sha256').update(der).digest()] };
}

async function start(args) {
  const server = await startStreambridge(args);
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

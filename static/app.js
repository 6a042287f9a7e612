// The page: concurrent bidirectional streams through the WASM client
// (static/pkg/), all on the client's one WebSocket, each with its own log; a
// connection badge that follows the client's state; and a throughput demo
// comparing the client with raw WebSocket. Everything goes through the
// package's public API, exactly as any other JavaScript would use it.
import init, { DataClient } from './pkg/streambridge_client.js';

const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
// A server started with --auth-token needs it: open the page as /?token=...
const token = new URLSearchParams(location.search).get('token') ?? undefined;
const $ = (id) => document.getElementById(id);

/** The demo's message: 16 bytes. */
const PAYLOAD = '0123456789abcdef';

let client = null;
let streamCount = 0;

function showState(state) {
  const badge = $('state');
  badge.dataset.state = state;
  badge.textContent = state;
  const usable = state !== 'closed' && state !== 'error';
  $('new-stream').disabled = !usable;
  $('demo-run').disabled = !usable;
  $('demo-raw').disabled = !usable;
}

function describe(status) {
  return `status ${status.code}${status.message ? `: ${status.message}` : ' (OK)'}`;
}

function log(card, kind, text) {
  const item = document.createElement('li');
  item.className = kind;
  item.textContent = text;
  const list = card.querySelector('.log');
  list.append(item);
  list.scrollTop = list.scrollHeight;
}

function setStreamState(card, state, text = state) {
  const badge = card.querySelector('.stream-state');
  badge.dataset.state = state;
  badge.textContent = text;
  const open = state === 'open';
  for (const selector of ['.message', '.send', '.close-send']) card.querySelector(selector).disabled = !open;
  card.querySelector('.cancel').disabled = !open && state !== 'half-closed';
}

/** A new stream on the client's socket, with its own card and log. */
function addStream() {
  const card = $('stream-template').content.firstElementChild.cloneNode(true);
  const number = ++streamCount;
  card.dataset.stream = String(number);
  card.querySelector('.stream-name').textContent = `Stream ${number}`;
  $('streams').append(card);
  const stream = client.bidirectionalStream();
  setStreamState(card, 'open');

  card.querySelector('.send-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const input = card.querySelector('.message');
    if (input.value === '') return;
    try {
      stream.send(input.value);
      log(card, 'sent', input.value);
      input.value = '';
    } catch (error) {
      log(card, 'error', error.message);
    }
  });
  card.querySelector('.close-send').addEventListener('click', () => {
    stream.closeSend();
    setStreamState(card, 'half-closed', 'half-closed');
  });
  card.querySelector('.cancel').addEventListener('click', () => stream.cancel());

  (async () => {
    try {
      for await (const message of stream) log(card, 'received', message.result);
    } catch (error) {
      log(card, 'error', `stream failed: ${error.message} (code ${error.code})`);
    }
    const status = await stream.finished();
    log(card, 'status', describe(status));
    setStreamState(card, status.code === 0 ? 'closed' : 'error', status.code === 0 ? 'closed' : `error ${status.code}`);
  })();
  card.querySelector('.message').focus();
  return card;
}

/**
 * The demo's clients by codec: the page's own (json), and the others made
 * when first asked for: `proto`, and `http-json` / `http-proto` on the HTTP
 * fallback (for the benchmark: the page itself takes the WebSocket where it can).
 */
const demoClients = {};

async function demoClient(codec) {
  if (codec === 'json') return client;
  const overHttp = codec.startsWith('http-');
  demoClients[codec] ??= await DataClient.connect(wsUrl, {
    token,
    codec: overHttp ? codec.slice('http-'.length) : codec,
    ...(overHttp ? { transports: ['http'] } : {}),
  });
  return demoClients[codec];
}

/** `count` messages on one stream of the WASM client; every reply read. */
async function runClient(count, progress, codec) {
  const stream = (await demoClient(codec)).bidirectionalStream();
  const started = performance.now();
  for (let i = 0; i < count; i++) stream.send(PAYLOAD);
  stream.closeSend();
  for await (const _ of stream) progress.received++;
  const seconds = (performance.now() - started) / 1000;
  const status = await stream.finished();
  if (status.code !== 0) throw Object.assign(new Error(status.message), { code: status.code });
  return { received: progress.received, seconds };
}

/** The same over a raw WebSocket, protocol v1 json: one message per frame each way. */
async function runRaw(count, progress) {
  const protocols = ['streambridge.v1.json', ...(token ? [`streambridge.bearer.${token}`] : [])];
  const socket = new WebSocket(wsUrl, protocols);
  await new Promise((resolve, reject) => {
    socket.onopen = resolve;
    socket.onerror = () => reject(new Error('the raw WebSocket did not open'));
  });
  const started = performance.now();
  const done = new Promise((resolve, reject) => {
    socket.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.response) progress.received++;
      else if (frame.status?.code) reject(Object.assign(new Error(frame.status.message), { code: frame.status.code }));
      else if (frame.status) resolve();
    };
    socket.onclose = (event) => reject(new Error(`the raw WebSocket closed (${event.code})`));
  });
  const frame = JSON.stringify({ request: { data: PAYLOAD } });
  for (let i = 0; i < count; i++) socket.send(frame);
  socket.send('{"closeSend":{}}');
  await done;
  const seconds = (performance.now() - started) / 1000;
  socket.close();
  return { received: progress.received, seconds };
}

/** Runs one demo with a live rate; returns messages per second. */
async function demo(run, count, resultId, codec) {
  const progress = { received: 0 };
  const started = performance.now();
  // Four updates a second: redrawing on every frame would cost the page a
  // good part of the throughput it is showing.
  const show = () => {
    const seconds = (performance.now() - started) / 1000;
    $('demo-rate').textContent = seconds > 0 ? Math.round(progress.received / seconds).toLocaleString('en') : '–';
    $('demo-progress').textContent = progress.received.toLocaleString('en');
  };
  const ticker = setInterval(show, 250);
  try {
    const { received, seconds } = await run(count, progress, codec);
    const rate = received / seconds;
    $(resultId).textContent =
      `${received.toLocaleString('en')} messages in ${seconds.toFixed(2)} s: ${Math.round(rate).toLocaleString('en')} messages/s`;
    return rate;
  } catch (error) {
    $(resultId).textContent = `failed: ${error.message} (code ${error.code})`;
    throw error;
  } finally {
    clearInterval(ticker);
    show();
  }
}

const rates = { client: null, raw: null };

function showRatio() {
  if (rates.client && rates.raw) $('demo-ratio').textContent = `${(rates.client / rates.raw).toFixed(1)}x`;
}

/**
 * Runs a demo (`client` with codec `json` or `proto`, or `raw`); resolves to
 * its rate (messages/s) or rejects (the result line says why).
 */
async function runDemo(kind, count, codec = $('demo-codec').value) {
  $('demo-run').disabled = $('demo-raw').disabled = true;
  try {
    const resultId = kind === 'client' ? 'demo-result' : 'demo-raw-result';
    rates[kind] = await demo(kind === 'client' ? runClient : runRaw, count, resultId, codec);
    showRatio();
    return rates[kind];
  } finally {
    showState(client?.state ?? 'closed');
  }
}

function demoCount() {
  return Math.max(1, Math.min(1_000_000, Number($('demo-count').value) || 1));
}

$('demo-form').addEventListener('submit', (event) => {
  event.preventDefault();
  runDemo('client', demoCount()).catch(() => {});
});
$('demo-raw').addEventListener('click', () => runDemo('raw', demoCount()).catch(() => {}));
$('new-stream').addEventListener('click', addStream);

// For the benchmark (tests/e2e/browser-bench.mjs): the same runs, driven
// from outside once the page is connected.
window.streambridgeDemo = { run: runDemo };
window.streambridgeReady = (async () => {
  await init();
  try {
    client = await DataClient.connect(wsUrl, { token });
    client.onstatechange = showState;
    showState(client.state);
    addStream();
  } catch (error) {
    showState('error');
    $('state').textContent = `cannot connect (code ${error.code})`;
    throw error;
  }
})();

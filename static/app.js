// The page: one bidirectional stream through the WASM client (static/pkg/),
// a message log, and a throughput demo. Everything goes through the package's
// public API, exactly as any other JavaScript would use it.
import init, { DataClient } from './pkg/streambridge_client.js';

const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
// A server started with --auth-token needs it: open the page as /?token=...
const token = new URLSearchParams(location.search).get('token') ?? undefined;
const $ = (id) => document.getElementById(id);

let client = null;
let stream = null;

function setState(state, text = state) {
  const badge = $('state');
  badge.dataset.state = state;
  badge.textContent = text;
  const open = state === 'open';
  $('message').disabled = !open;
  $('send').disabled = !open;
  $('close-send').disabled = !open;
  $('demo-run').disabled = client === null;
}

function log(kind, text) {
  const item = document.createElement('li');
  item.className = kind;
  item.textContent = text;
  $('log').append(item);
  item.scrollIntoView({ block: 'nearest' });
}

function describe(status) {
  return `status ${status.code}${status.message ? `: ${status.message}` : ' (OK)'}`;
}

/** Opens the page's stream and logs its replies until it ends. */
function openStream() {
  const current = client.bidirectionalStream();
  stream = current;
  setState('open');
  (async () => {
    try {
      for await (const message of current) log('received', message.result);
    } catch (error) {
      if (current === stream) log('error', `stream failed: ${error.message} (code ${error.code})`);
    }
    const status = await current.finished();
    if (current !== stream) return; // replaced by Reconnect
    log('status', describe(status));
    setState(status.code === 0 ? 'closed' : 'error', status.code === 0 ? 'closed' : `error ${status.code}`);
  })();
}

async function connect() {
  stream = null;
  client?.close();
  client = null;
  setState('connecting', 'connecting…');
  try {
    client = await DataClient.connect(wsUrl, { token });
    openStream();
  } catch (error) {
    setState('error', `cannot connect (code ${error.code})`);
    log('error', error.message);
  }
}

$('send-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const input = $('message');
  if (!stream || input.value === '') return;
  try {
    stream.send(input.value);
    log('sent', input.value);
    input.value = '';
  } catch (error) {
    log('error', error.message);
  }
});

$('close-send').addEventListener('click', () => {
  stream?.closeSend();
  setState('half-closed', 'half-closed: waiting for the last replies');
});

$('reconnect').addEventListener('click', connect);

$('demo-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  if (!client) return;
  const count = Math.max(1, Math.min(1_000_000, Number($('demo-count').value) || 1));
  $('demo-run').disabled = true;
  $('demo-result').textContent = '';
  const demo = client.bidirectionalStream();
  let received = 0;
  const started = performance.now();
  let running = true;
  const show = () => {
    const seconds = (performance.now() - started) / 1000;
    $('demo-rate').textContent = seconds > 0 ? Math.round(received / seconds).toLocaleString('en') : '–';
    $('demo-progress').textContent = received.toLocaleString('en');
    if (running) requestAnimationFrame(show);
  };
  requestAnimationFrame(show);
  try {
    for (let i = 0; i < count; i++) demo.send(`demo ${i}`);
    demo.closeSend();
    for await (const _ of demo) received++;
    const status = await demo.finished();
    running = false;
    show();
    const seconds = (performance.now() - started) / 1000;
    $('demo-result').textContent =
      `${received.toLocaleString('en')} messages in ${seconds.toFixed(2)} s, ${describe(status)}`;
  } catch (error) {
    running = false;
    $('demo-result').textContent = `demo failed: ${error.message} (code ${error.code})`;
  } finally {
    $('demo-run').disabled = client === null;
  }
});

await init();
await connect();

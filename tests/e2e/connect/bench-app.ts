// The connect-es benchmark's page: in one page, one stream of 16 B messages
// through connect-es on our transport, through the WASM client's typed
// stream, and through a raw WebSocket sending one message per frame (v1
// json); then 1 000 concurrent unary calls (grpc.health.v1.Health/Check) on
// one transport. Every reply is read.
import init, { DataClient } from 'streambridge-client';
import { createStreambridgeTransport } from 'streambridge-client/connect';
import { createClient } from '@connectrpc/connect';
import { DataService } from './gen/data_service_pb';
import { Health } from './gen/health_pb';

declare global {
  interface Window {
    benchReady: Promise<unknown>;
    bench: Record<string, (count: number) => Promise<unknown>>;
  }
}

const url = `ws://${location.host}/ws`;
const payload = 'x'.repeat(16);
window.benchReady = init({ module_or_path: '/pkg/streambridge_client_bg.wasm' });
// One transport for the page, as an application has.
const transport = createStreambridgeTransport({ url });
const dataService = createClient(DataService, transport);
const health = createClient(Health, transport);

/** Messages per second of `count` messages that took `ms`. */
const rate = (count: number, ms: number) => count / (ms / 1000);

window.bench = {
  async connect(count) {
    async function* requests() {
      for (let i = 0; i < count; i++) yield { data: payload };
    }
    const started = performance.now();
    let got = 0;
    for await (const reply of dataService.bidirectionalStream(requests())) {
      if (reply.result.length > 0) got++;
    }
    if (got !== count) throw new Error(`connect-es: ${got} of ${count} replies`);
    return rate(count, performance.now() - started);
  },

  async typed(count) {
    const client = await DataClient.connect(url, { codec: 'proto' });
    try {
      const stream = client.bidirectionalStream();
      const started = performance.now();
      for (let i = 0; i < count; i++) stream.send(payload);
      stream.closeSend();
      let got = 0;
      for await (const reply of stream) if (reply.result.length > 0) got++;
      if (got !== count) throw new Error(`typed stream: ${got} of ${count} replies`);
      return rate(count, performance.now() - started);
    } finally {
      client.close();
    }
  },

  async raw(count) {
    const socket = new WebSocket(url, ['streambridge.v1.json']);
    await new Promise((resolve, reject) => {
      socket.onopen = resolve;
      socket.onerror = reject;
    });
    const frame = JSON.stringify({ request: { data: payload } });
    const started = performance.now();
    const done = new Promise<void>((resolve) => {
      let got = 0;
      socket.onmessage = (event) => {
        if (String(event.data).startsWith('{"response"') && ++got === count) resolve();
      };
    });
    for (let i = 0; i < count; i++) socket.send(frame);
    await done;
    const took = performance.now() - started;
    socket.close();
    return rate(count, took);
  },

  async unary(count) {
    const latencies: number[] = [];
    const started = performance.now();
    const replies = await Promise.all(
      Array.from({ length: count }, async () => {
        const sent = performance.now();
        const reply = await health.check({});
        latencies.push(performance.now() - sent);
        return reply.status;
      }),
    );
    const took = performance.now() - started;
    latencies.sort((a, b) => a - b);
    const at = (q: number) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))];
    return { answered: replies.filter((s) => s === 1).length, ms: took, p50: at(0.5), p99: at(0.99) };
  },
};

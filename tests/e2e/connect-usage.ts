// The connect-es transport's declarations, as a TypeScript user meets them
// (strict; through the package's `./connect` export).
import type { Transport } from '@connectrpc/connect';
import { createStreambridgeTransport, type StreambridgeTransportOptions } from 'streambridge-client/connect';

const url = 'wss://example.com/ws';
export const plain: Transport = createStreambridgeTransport({ url });
const options: StreambridgeTransportOptions = {
  url,
  token: async () => 'fresh',
  reconnect: { initialDelayMs: 100 },
  window: 256,
  interceptors: [(next) => async (req) => next(req)],
  defaultTimeoutMs: 30_000,
};
export const configured: Transport = createStreambridgeTransport(options);
// @ts-expect-error: the bridge's URL is required
createStreambridgeTransport({});
// @ts-expect-error: a token is a string or a function giving one
createStreambridgeTransport({ url, token: 5 });

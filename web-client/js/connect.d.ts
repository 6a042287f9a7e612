// Types of `streambridge-client/connect`: a connect-es Transport over
// streambridge's WebSocket (protocol v2).
import type { Interceptor, Transport } from '@connectrpc/connect';
import type { BinaryReadOptions, BinaryWriteOptions } from '@bufbuild/protobuf';

/** Options of `createStreambridgeTransport`. */
export interface StreambridgeTransportOptions {
  /** The bridge's WebSocket endpoint, e.g. `wss://example.com/ws`. */
  url: string;
  /**
   * Bearer token (`--auth-token` or a JWT), or a function returning one (or
   * a promise of one), asked before the socket and before each call: as
   * `DataClient.connect`'s `token`.
   */
  token?: string | (() => string | Promise<string>);
  /** Reconnect when the socket drops: as `DataClient.connect`'s `reconnect`. */
  reconnect?: false | { initialDelayMs?: number; maxDelayMs?: number };
  /** Response messages a call may have in flight before it is read (default 1024). */
  window?: number;
  /** Calls live on the socket at once (default 100: the server's `--ws-max-calls`); more wait. */
  maxCalls?: number;
  /**
   * The ways to reach the server, in order (default `['webtransport',
   * 'websocket', 'http']` with a `webtransport` URL, else `['websocket',
   * 'http']`): as `DataClient.connect`'s `transports`. Behind a proxy that
   * refuses WebSockets, every call runs over the HTTP fallback unchanged.
   */
  transports?: ('webtransport' | 'websocket' | 'http')[];
  /** The server's WebTransport URL (`https://host:port/ws`): each call on a QUIC stream of its own. */
  webtransport?: string;
  /** WebTransport certificates to trust by SHA-256 digest, as `DataClient.connect` takes them. */
  serverCertificateHashes?: { algorithm: 'sha-256'; value: BufferSource }[];
  /** Interceptors applied to every call, as on every connect-es transport. */
  interceptors?: Interceptor[];
  /** The deadline of calls that set no `timeoutMs` of their own. */
  defaultTimeoutMs?: number;
  /** Options for the binary wire format. */
  binaryOptions?: Partial<BinaryReadOptions & BinaryWriteOptions>;
}

/**
 * A connect-es `Transport` whose calls (all four kinds) run on one
 * streambridge WebSocket, opened at the first call and reopened when it
 * drops. Initialise the WASM module first (`await init()`).
 */
export declare function createStreambridgeTransport(options: StreambridgeTransportOptions): Transport;

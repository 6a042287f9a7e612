// A connect-es Transport over streambridge's WebSocket (protocol v2): the
// clients protoc-gen-es and @connectrpc/connect generate, unchanged, with
// all four call types (client and bidi streaming really stream), on one
// socket for every call of every client made on the transport.
//
// It sits on the WASM client's `call()` with the proto codec: the generated
// code serialises, the server needs no descriptors, and the socket's
// multiplexing, flow control, batching, reconnect and goaway are the
// client's. What is connect-es's (interceptors, deadlines as signals,
// `ConnectError`) comes from @connectrpc/connect's own transport helpers.
//
// Peer dependencies: @connectrpc/connect and @bufbuild/protobuf (v2).

import { Code, ConnectError, createContextValues } from '@connectrpc/connect';
import { createClientMethodSerializers, runStreamingCall, runUnaryCall } from '@connectrpc/connect/protocol';
import { BinaryReader } from '@bufbuild/protobuf/wire';
import { DataClient } from './streambridge_client.js';

/** Request headers the bridge sets itself (or HTTP does): never sent as metadata. */
const RESERVED = /^(grpc-|:)|^(content-type|te|host|connection|keep-alive|transfer-encoding|upgrade|content-length|user-agent|accept-encoding|content-encoding|connect-.*)$/;

/**
 * A connect-es `Transport` whose calls run on one streambridge WebSocket,
 * opened at the first call (the WASM module must be initialised first:
 * `await init()`).
 */
export function createStreambridgeTransport(options) {
  if (!options || typeof options.url !== 'string') {
    throw new TypeError('createStreambridgeTransport: options.url (the bridge\'s ws:// or wss:// URL) is required');
  }
  const connectOptions = { codec: 'proto' };
  for (const name of ['token', 'reconnect', 'window', 'maxCalls', 'transports', 'webtransport', 'serverCertificateHashes']) {
    if (options[name] !== undefined) connectOptions[name] = options[name];
  }
  let client;
  // One client for every call; a first connect that fails is tried again
  // by the next call rather than failing every call for good.
  const connected = () => {
    client ??= DataClient.connect(options.url, connectOptions).catch((error) => {
      client = undefined;
      throw asConnectError(error, Code.Unavailable);
    });
    return client;
  };
  const deadline = (timeoutMs) =>
    timeoutMs === undefined ? options.defaultTimeoutMs : timeoutMs <= 0 ? undefined : timeoutMs;

  return {
    async unary(method, signal, timeoutMs, header, input, contextValues) {
      const { serialize, parse } = createClientMethodSerializers(method, true, undefined, options.binaryOptions);
      timeoutMs = deadline(timeoutMs);
      return await runUnaryCall({
        interceptors: options.interceptors,
        signal,
        timeoutMs,
        req: request(method, header, contextValues, input, false, options.url),
        next: async (req) => {
          const call = await open(connected, req, timeoutMs);
          call.send(serialize(req.message));
          call.closeSend();
          let message;
          for (;;) {
            const reply = await call.next().catch(() => null);
            if (reply === null) break;
            if (message !== undefined) {
              call.cancel();
              throw new ConnectError('protocol error: more than one response message for a unary call', Code.Unimplemented);
            }
            message = parse(reply);
          }
          const status = await call.finished();
          const trailer = headersOf(status.metadata);
          if (status.code !== 0) throw statusError(status, trailer);
          if (message === undefined) {
            throw new ConnectError('protocol error: missing response message', Code.Unimplemented);
          }
          return {
            stream: false,
            service: method.parent,
            method,
            header: headersOf(call.headers),
            message,
            trailer,
          };
        },
      });
    },

    async stream(method, signal, timeoutMs, header, input, contextValues) {
      const { serialize, parse } = createClientMethodSerializers(method, true, undefined, options.binaryOptions);
      timeoutMs = deadline(timeoutMs);
      return runStreamingCall({
        interceptors: options.interceptors,
        signal,
        timeoutMs,
        req: request(method, header, contextValues, input, true, options.url),
        next: async (req) => {
          const call = await open(connected, req, timeoutMs);
          // Requests go out as the application produces them, while replies
          // come in: a reply may arrive before the client half-closes.
          (async () => {
            try {
              for await (const message of req.message) {
                call.send(serialize(message));
                if (call.queuedRequests > 0) await call.drained();
              }
              call.closeSend();
            } catch {
              // The input failed (or the call is over): the call cannot go on.
              call.cancel();
            }
          })();
          // The response (and its headers) once the first reply, or the
          // end, has come.
          const first = await call.next().then(
            (reply) => ({ reply }),
            () => ({ reply: null }),
          );
          const trailer = new Headers();
          async function* replies() {
            if (first.reply !== null) {
              yield parse(first.reply);
              try {
                // The call's own iterator: one promise per reply, no more.
                for await (const reply of call) yield parse(reply);
              } catch {
                // Its status says why.
              }
            }
            const status = await call.finished();
            headersOf(status.metadata).forEach((value, key) => trailer.set(key, value));
            if (status.code !== 0) throw statusError(status, trailer);
          }
          return {
            stream: true,
            service: method.parent,
            method,
            header: headersOf(call.headers),
            message: replies(),
            trailer,
          };
        },
      });
    },
  };
}

/** The request connect-es's interceptors see. */
function request(method, header, contextValues, message, stream, url) {
  return {
    stream,
    service: method.parent,
    method,
    requestMethod: 'POST',
    url: `${url}/${method.parent.typeName}/${method.name}`,
    header: new Headers(header),
    contextValues: contextValues ?? createContextValues(),
    message,
  };
}

/** Starts the call on the transport's socket; the request's signal cancels it. */
async function open(connected, req, timeoutMs) {
  const client = await connected();
  const metadata = {};
  req.header.forEach((value, key) => {
    if (!RESERVED.test(key)) metadata[key] = value;
  });
  const call = client.call(`/${req.method.parent.typeName}/${req.method.name}`, {
    metadata,
    ...(timeoutMs === undefined ? {} : { timeoutMs: Math.max(1, Math.ceil(timeoutMs)) }),
  });
  // Aborted (by the application, the deadline, or connect-es once the call
  // is over): the server stops the call too. A finished call ignores it.
  if (req.signal.aborted) call.cancel();
  else req.signal.addEventListener('abort', () => call.cancel(), { once: true });
  return call;
}

/** Metadata (`Record<string, string>`, or null) as `Headers`. */
function headersOf(metadata) {
  const headers = new Headers();
  for (const [key, value] of Object.entries(metadata ?? {})) headers.set(key, value);
  return headers;
}

/** A call's failed status as the `ConnectError` connect-es clients expect. */
function statusError(status, trailer) {
  const details = status.details ? statusDetails(status.details) : [];
  return new ConnectError(status.message, status.code, trailer, details);
}

/** A thrown `StreamError` (or anything) as a `ConnectError`. */
function asConnectError(error, code) {
  if (error instanceof ConnectError) return error;
  if (error && typeof error.code === 'number') return new ConnectError(error.message, error.code, undefined, undefined, error);
  return ConnectError.from(error, code);
}

/**
 * The details of `grpc-status-details-bin`, a `google.rpc.Status`:
 * `{ type, value }` for each `google.protobuf.Any` in its field 3.
 */
function statusDetails(bytes) {
  const details = [];
  try {
    const reader = new BinaryReader(bytes);
    while (reader.pos < reader.len) {
      const [field, wireType] = reader.tag();
      if (field !== 3) {
        reader.skip(wireType);
        continue;
      }
      const any = new BinaryReader(reader.bytes());
      let typeUrl = '';
      let value = new Uint8Array(0);
      while (any.pos < any.len) {
        const [anyField, anyWireType] = any.tag();
        if (anyField === 1) typeUrl = any.string();
        else if (anyField === 2) value = any.bytes();
        else any.skip(anyWireType);
      }
      details.push({ type: typeUrl.slice(typeUrl.lastIndexOf('/') + 1), value });
    }
  } catch {
    // Details that do not decode are dropped; the code and message stand.
  }
  return details;
}

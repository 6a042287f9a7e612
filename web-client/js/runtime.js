// The JavaScript half of streambridge-client's WASM: the few helpers that
// are cheaper (in `.wasm` size or in crossings) as JavaScript than as Rust.
// One module on purpose: every module is one more request when a page loads
// the client (and Chromium was seen hanging the load of a page that imports
// many small ones). Each section names the Rust module that binds it.

// --- lib.rs: `for await` over streams and calls

export function installAsyncIterator(prototype) {
  if (Object.prototype.hasOwnProperty.call(prototype, Symbol.asyncIterator)) return;
  Object.defineProperty(prototype, Symbol.asyncIterator, {
    configurable: true,
    value: function () {
      const stream = this;
      return {
        // The client makes the `{ value, done }` itself: one promise per message.
        next() {
          return stream.nextResult();
        },
        async return() {
          stream.cancel();
          return { value: undefined, done: true };
        },
        [Symbol.asyncIterator]() { return this; },
      };
    },
  });
}

// --- call.rs: what `next()` resolves with

export function iterationResult(value) {
  return value === null ? { value: undefined, done: true } : { value, done: false };
}
export function withResult(reply) {
  if (reply.result === undefined) reply.result = '';
  return reply;
}

// --- codec.rs: a JSON batch, split in one crossing
//
// One call into JavaScript per WebSocket message: the browser parses the
// batch and sorts its records by kind where property access is cheap, and
// WASM gets the calls and kinds as one copied array plus the values, instead
// of crossing the boundary several times per record.

const MESSAGE = 0, WINDOW = 1, STATUS = 2, HEADERS = 3, GOAWAY = 4, UNKNOWN = 5;
const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
export function splitBatch(text) {
  const parsed = JSON.parse(text);
  const records = Array.isArray(parsed) ? parsed : [parsed];
  const heads = new Uint32Array(records.length * 2);
  const values = new Array(records.length);
  for (let i = 0; i < records.length; i++) {
    const record = records[i];
    if (!isObject(record)) return null;
    let kind = UNKNOWN;
    if (record.message !== undefined) { kind = MESSAGE; values[i] = record.message; }
    else if (record.window !== undefined && record.window !== null) { kind = WINDOW; values[i] = Number(record.window) >>> 0; }
    else if (isObject(record.status)) { kind = STATUS; values[i] = record.status; }
    else if (isObject(record.headers)) { kind = HEADERS; values[i] = isObject(record.headers.metadata) ? record.headers.metadata : {}; }
    else if (isObject(record.goaway)) kind = GOAWAY;
    heads[2 * i] = record.call === undefined || record.call === null ? 0 : Number(record.call) >>> 0;
    heads[2 * i + 1] = kind;
  }
  return [heads, values];
}

// --- timer.rs: a task after the current turn
//
// A task of its own, not a microtask: an `async` producer (a `for await`
// loop, connect-es's iterators) sends each message from a microtask of its
// own, and a microtask queued at its first send would run before its
// second, sending one message per WebSocket message. A posted message runs
// once the current task and all its microtasks are done, without
// `setTimeout`'s clamping.

const channel = new MessageChannel();
const due = [];
channel.port1.onmessage = () => due.shift()();
export function queueTask(f) {
  due.push(f);
  channel.port2.postMessage(0);
}

// --- webtransport_link.rs: protocol v2's WebTransport binding (streams and frames)

const BATCH = 0, CLOSE = 1;
const encoder = new TextEncoder(), decoder = new TextDecoder();

export function hasWebTransport() {
  return typeof WebTransport === 'function';
}

function frame(kind, payload) {
  const out = new Uint8Array(5 + payload.length);
  new DataView(out.buffer).setUint32(0, 1 + payload.length);
  out[4] = kind;
  out.set(payload, 5);
  return out;
}

function closeFrame(payload) {
  if (payload.length < 2) throw new Error('a CLOSE frame without a code');
  return [new DataView(payload.buffer, payload.byteOffset).getUint16(0), decoder.decode(payload.subarray(2))];
}

// Calls `onFrame(kind, payload)` for each frame of `readable` until it ends;
// rejects if the stream is reset or breaks the framing.
async function readFrames(readable, onFrame) {
  const reader = readable.getReader();
  let buffered = new Uint8Array(0);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    if (buffered.length === 0) {
      buffered = value;
    } else {
      const joined = new Uint8Array(buffered.length + value.length);
      joined.set(buffered);
      joined.set(value, buffered.length);
      buffered = joined;
    }
    let at = 0;
    while (buffered.length - at >= 5) {
      const length = new DataView(buffered.buffer, buffered.byteOffset + at).getUint32(0);
      if (length === 0) throw new Error('a frame of length 0');
      if (buffered.length - at < 4 + length) break;
      onFrame(buffered[at + 4], buffered.subarray(at + 5, at + 4 + length));
      at += 4 + length;
    }
    buffered = buffered.subarray(at);
  }
}

// Events for `on(kind, stream, data, code)`: 0 admitted; 1 a batch (`data`:
// its text or bytes); 2 a call's stream ended (`stream`: the call, `data`:
// a reason, `code`: its CLOSE code, 1006 without one); 3 the session ended
// (`data`: a reason). Nothing is reported after `close()` or event 3.
export class WtLink {
  constructor(url, protocol, token, hashes, timeoutMs, on) {
    this.on = on;
    this.json = protocol.endsWith('json');
    url += `${url.includes('?') ? '&' : '?'}protocol=${protocol}`;
    if (token !== undefined) url += `&token=${encodeURIComponent(token)}`;
    this.streams = new Map();
    this.admitted = false;
    this.ended = false;
    this.told = null;
    try {
      this.session = new WebTransport(url, hashes ? { serverCertificateHashes: hashes } : {});
    } catch (error) {
      // A URL or hash the browser refuses: not this way in, try the next.
      queueMicrotask(() => this.end(1006, error.message));
      return;
    }
    this.timer = setTimeout(() => {
      this.end(1006, `no WebTransport session within ${timeoutMs} ms`);
      this.session.close();
    }, timeoutMs);
    this.session.closed.then(
      (info) => this.end(info.closeCode, info.reason),
      (error) => this.end(1006, error.message),
    );
    this.session.ready.then(() => this.control(), () => {});
  }

  async control() {
    try {
      const { value: stream } = await this.session.incomingUnidirectionalStreams.getReader().read();
      if (!stream) return;
      await readFrames(stream, (kind, payload) => {
        if (kind === CLOSE) {
          // Refused: told why here, as browsers show no HTTP status. The
          // server waits for the client to close.
          this.told = closeFrame(payload);
          this.session.close({ closeCode: this.told[0], reason: this.told[1] });
        } else if (!this.admitted) {
          this.admitted = true;
          clearTimeout(this.timer);
          if (!this.ended) this.on(0, 0, null, 0);
        } else if (kind === BATCH && !this.ended) {
          this.deliver(payload);
        }
      });
    } catch {
      // The session's own end says what happened.
    }
  }

  deliver(payload) {
    this.on(1, 0, this.json ? decoder.decode(payload) : payload, 0);
  }

  send(call, batch) {
    const bytes = frame(BATCH, typeof batch === 'string' ? encoder.encode(batch) : batch);
    let writer = this.streams.get(call);
    if (!writer) {
      // A call's first batch (its `open`) opens its stream.
      writer = this.session.createBidirectionalStream().then((stream) => {
        this.read(call, stream.readable);
        return stream.writable.getWriter();
      });
      writer.catch((error) => this.streamEnded(call, 1006, `cannot open a stream: ${error.message}`));
      this.streams.set(call, writer);
    }
    writer.then((open) => open.write(bytes)).catch(() => {});
  }

  async read(call, readable) {
    let code = 1006, reason = 'the stream ended without a CLOSE frame';
    try {
      await readFrames(readable, (kind, payload) => {
        if (kind === BATCH) {
          if (!this.ended) this.deliver(payload);
        } else if (kind === CLOSE) {
          [code, reason] = closeFrame(payload);
        } else {
          throw new Error(`a frame of unknown kind ${kind}`);
        }
      });
    } catch (error) {
      reason = `the stream broke: ${error.message}`;
    }
    // The server is done with the call: finish our side too (the server
    // has stopped reading; this ends the stream cleanly rather than by the
    // server's STOP_SENDING).
    this.streams.get(call)?.then((writer) => writer.close()).catch(() => {});
    this.streamEnded(call, code, reason);
  }

  streamEnded(call, code, reason) {
    this.streams.delete(call);
    if (!this.ended) this.on(2, call, reason, code);
  }

  end(code, reason) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.timer);
    const [toldCode, toldReason] = this.told ?? [code, reason];
    this.on(3, 0, toldReason, toldCode);
  }

  close(reason) {
    this.ended = true;
    clearTimeout(this.timer);
    try {
      this.session?.close({ closeCode: 0, reason });
    } catch {
      // Already closed.
    }
  }
}

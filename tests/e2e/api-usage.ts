// Compiled (not run) by types.test.mjs: the documented API, as a TypeScript
// user writes it against static/pkg.
import init, {
  DataClient,
  type BidiStream,
  type Call,
  type CallMessage,
  type CallStatus,
  type ClientState,
  type StreamMessage,
} from '../../static/pkg/streambridge_client.js';

export async function usage(url: string): Promise<string[]> {
  await init();
  const client: DataClient = await DataClient.connect(url);
  const stream: BidiStream = client.bidirectionalStream();
  stream.send('hello');
  stream.closeSend();
  const first: StreamMessage | null = await stream.next();
  const results: string[] = first ? [first.result] : [];
  for await (const message of stream) results.push(message.result.toUpperCase());
  const status: CallStatus = await stream.finished();
  const code: number = status.code;
  const trailers: Record<string, string> = status.metadata;
  const details: Uint8Array | undefined = status.details;
  // @ts-expect-error: a reply's result is a string, not a number
  const wrong: number = first!.result;
  // @ts-expect-error: next() may resolve to null at the end
  const notNull: StreamMessage = await stream.next();
  client.close();

  const withOptions: DataClient = await DataClient.connect(url, {
    token: 'secret',
    codec: 'proto',
    reconnect: { initialDelayMs: 100, maxDelayMs: 5000 },
    window: 512,
  });
  const state: ClientState = withOptions.state;
  withOptions.onstatechange = (next: ClientState) => results.push(next);
  const call: Call = withOptions.call('/grpc.health.v1.Health/Check', { metadata: { k: 'v' }, timeoutMs: 5000 });
  call.send(new Uint8Array());
  call.send({ service: '' });
  call.closeSend();
  const reply: CallMessage | null = await call.next();
  for await (const message of call) results.push(message instanceof Uint8Array ? String(message.length) : JSON.stringify(message));
  const headers: Record<string, string> | null = call.headers;
  const timed: BidiStream = withOptions.bidirectionalStream({ timeoutMs: 1000, window: 64 });
  timed.cancel();
  // A token function: asked before each socket and each call.
  await DataClient.connect(url, { token: async () => 'fresh' });
  await DataClient.connect(url, { token: () => 'fresh' });
  // @ts-expect-error: the token is a string, or a function giving one
  await DataClient.connect(url, { token: 5 });
  // @ts-expect-error: a token function gives a string
  await DataClient.connect(url, { token: async () => 5 });
  // @ts-expect-error: the codec is json or proto
  await DataClient.connect(url, { codec: 'xml' });
  // @ts-expect-error: state is one of three names
  const badState: ClientState = 'connecting';
  // @ts-expect-error: a message is an object or bytes, not a string
  call.send('text');
  withOptions.close();
  return [...results, String(code), String(wrong), String(notNull), state, String(reply), String(headers), String(details),
    String(trailers), badState];
}

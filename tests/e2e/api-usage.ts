// Compiled (not run) by types.test.mjs: the documented API, as a TypeScript
// user writes it against static/pkg.
import init, { DataClient, type BidiStream, type CallStatus, type StreamMessage } from '../../static/pkg/streambridge_client.js';

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
  // @ts-expect-error: a reply's result is a string, not a number
  const wrong: number = first!.result;
  // @ts-expect-error: next() may resolve to null at the end
  const notNull: StreamMessage = await stream.next();
  client.close();
  const withToken: DataClient = await DataClient.connect(url, { token: 'secret' });
  // @ts-expect-error: the token is a string
  await DataClient.connect(url, { token: 5 });
  withToken.close();
  return [...results, String(code), String(wrong), String(notNull)];
}

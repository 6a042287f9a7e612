// The chat room's page: the ChatRoom client protoc-gen-es generates from
// ../chat.proto, unchanged, on streambridge's connect-es transport. `Join`
// is a bidirectional stream (what you say goes up while the room's events
// come down, on the page's one WebSocket); `Members` is a unary call.
import init from 'streambridge-client';
import { createStreambridgeTransport } from 'streambridge-client/connect';
import { ConnectError, createClient } from '@connectrpc/connect';
import { ChatRoom, Event_Kind, type Event } from './gen/chat_pb';

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const log = $('log');
const status = $('status');

/** What the member says, as the request stream of `Join`. */
class Outbox implements AsyncIterable<{ name?: string; text?: string }> {
  private queue: { name?: string; text?: string }[] = [];
  private wake: (() => void) | undefined;
  private closed = false;

  push(message: { name?: string; text?: string }) {
    this.queue.push(message);
    this.wake?.();
  }

  close() {
    this.closed = true;
    this.wake?.();
  }

  async *[Symbol.asyncIterator]() {
    for (;;) {
      const next = this.queue.shift();
      if (next) {
        yield next;
        continue;
      }
      if (this.closed) return;
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = undefined;
    }
  }
}

function show(event: Event) {
  const line = document.createElement('p');
  if (event.kind === Event_Kind.JOINED) {
    line.className = 'joined';
    line.textContent = `${event.name} joined`;
  } else if (event.kind === Event_Kind.LEFT) {
    line.className = 'left';
    line.textContent = `${event.name} left`;
  } else {
    line.textContent = `${event.name}: ${event.text}`;
  }
  line.dataset.sequence = String(event.sequence);
  log.append(line);
  log.scrollTop = log.scrollHeight;
}

async function main() {
  await init({ module_or_path: '/streambridge_client_bg.wasm' });
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const room = createClient(ChatRoom, createStreambridgeTransport({ url: `${scheme}://${location.host}/ws` }));
  const outbox = new Outbox();

  $('join').addEventListener('submit', async (e) => {
    e.preventDefault();
    const name = $<HTMLInputElement>('name').value.trim();
    $('join').hidden = true;
    $('say').hidden = false;
    // The first message names the member.
    outbox.push({ name });
    status.textContent = 'joined';
    try {
      for await (const event of room.join(outbox)) {
        show(event);
        const members = await room.members({});
        $('members').textContent = `in the room: ${members.names.join(', ')}`;
      }
      status.textContent = 'left the room';
    } catch (error) {
      status.textContent = `the room ended the stream: ${ConnectError.from(error).message}`;
    }
  });

  $('say').addEventListener('submit', (e) => {
    e.preventDefault();
    const input = $<HTMLInputElement>('text');
    outbox.push({ text: input.value });
    input.value = '';
  });

  addEventListener('pagehide', () => outbox.close());
}

main().catch((error) => {
  status.textContent = `cannot start: ${error}`;
});

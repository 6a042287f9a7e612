// The chat example's page (examples/chat/web: a protoc-gen-es client on the
// connect-es transport) in headless Chromium, two tabs in one room, served
// by the example itself.
//
// STREAMBRIDGE_CHAT_BIN: the chat example (cargo xtask test builds it and
// the page).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { launchChromium } from './chromium.mjs';
import { startStreambridge } from './streambridge.mjs';

const program = process.env.STREAMBRIDGE_CHAT_BIN;
const page = fileURLToPath(new URL('../../examples/chat/web/dist', import.meta.url));
let browser;
let server;

before(async () => {
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  server?.child.kill('SIGKILL');
});

/** A tab of the chat page that joined as `name`. */
async function member(name) {
  const tab = await browser.newPage();
  const problems = [];
  tab.on('pageerror', (error) => problems.push(error.message));
  // Counts the tab's WebSockets: Join, Members and everything else share one.
  await tab.addInitScript(() => {
    window.sockets = 0;
    const Native = window.WebSocket;
    window.WebSocket = class extends Native {
      constructor(...args) {
        super(...args);
        window.sockets += 1;
      }
    };
  });
  await tab.goto(`http://${server.address}/index.html`);
  await tab.fill('#name', name);
  await tab.click('#join button');
  await tab.locator('#log p', { hasText: `${name} joined` }).waitFor();
  return { tab, problems };
}

test('two tabs chat in one room through the connect-es transport', { skip: !program && 'set STREAMBRIDGE_CHAT_BIN' }, async () => {
  server = await startStreambridge(['--static-dir', page], { program });
  const ann = await member('ann');
  const bob = await member('bob');
  await ann.tab.locator('#log p', { hasText: 'bob joined' }).waitFor();
  await ann.tab.fill('#text', 'hello bob');
  await ann.tab.click('#say button');
  await bob.tab.locator('#log p', { hasText: 'ann: hello bob' }).waitFor();
  await bob.tab.fill('#text', 'hi ann');
  await bob.tab.click('#say button');
  await ann.tab.locator('#log p', { hasText: 'bob: hi ann' }).waitFor();
  // Both see the room's events in one order, numbered without gaps.
  const sequence = (tab) => tab.$$eval('#log p', (lines) => lines.map((line) => `${line.dataset.sequence} ${line.textContent}`));
  const annSaw = await sequence(ann.tab);
  const bobSaw = await sequence(bob.tab);
  assert.deepEqual(bobSaw, annSaw.slice(annSaw.length - bobSaw.length), 'the same events, in the same order');
  await ann.tab.locator('#members', { hasText: 'ann' }).waitFor();
  assert.match(await ann.tab.textContent('#members'), /bob/);
  for (const { tab, problems } of [ann, bob]) {
    assert.equal(await tab.evaluate(() => window.sockets), 1, 'one WebSocket per tab');
    assert.deepEqual(problems, []);
    assert.equal(await tab.textContent('#status'), 'joined');
  }
});

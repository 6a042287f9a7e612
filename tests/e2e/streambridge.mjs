// The streambridge binary as a child process, for tests that need a server of
// their own (their own flags, or one they kill and restart).
//
// STREAMBRIDGE_BIN: the streambridge binary (cargo xtask test sets it).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const binary = process.env.STREAMBRIDGE_BIN;

/** The page and the WASM package, for servers that serve them. */
export const staticDir = fileURLToPath(new URL('../../static', import.meta.url));

/**
 * streambridge (or `program`, a server built on the library, such as the
 * chat example) with `args` (`--listen 127.0.0.1:0` unless `listen` is given);
 * resolves once it listens, to `{ child, address, webtransport, exit }` where
 * `webtransport` is the UDP address of `--webtransport-listen` (if on) and
 * `exit` resolves to the exit code.
 */
export async function startStreambridge(args, { listen = '127.0.0.1:0', program = binary } = {}) {
  assert.ok(program, 'set STREAMBRIDGE_BIN to the streambridge binary (cargo xtask test does)');
  const child = spawn(program, ['--listen', listen, ...args], {
    env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exit = once(child, 'exit').then(([code, signal]) => code ?? signal);
  exit.catch(() => {}); // a failed spawn rejects `exit` and throws below too
  const lines = createInterface({ input: child.stdout });
  for await (const line of lines) {
    const found = line.match(/listening on (\S+?):? /);
    if (found) {
      // Keep reading, so a full pipe never blocks the server's logging.
      lines.on('line', () => {});
      const webtransport = line.match(/WebTransport https:\/\/(\S+?)\/ws/)?.[1];
      return { child, address: found[1], webtransport, exit };
    }
  }
  throw new Error(`streambridge exited before it listened (${await exit})`);
}

/** The value of an unlabelled metric on the server's /metrics. */
export async function metric(address, name) {
  const text = await (await fetch(`http://${address}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  assert.ok(line, `${name} in /metrics`);
  return Number(line.split(' ')[1]);
}

// The package's TypeScript declarations type the API (no `any` where a user
// reads results): `api-usage.ts` and `connect-usage.ts` (the connect-es
// transport) must compile under `strict`, and the lines
// marked @ts-expect-error must fail to.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));

test('the generated .d.ts types the documented API', () => {
  const tsc = path.join(here, 'node_modules', 'typescript', 'bin', 'tsc');
  try {
    execFileSync(process.execPath, [tsc, '-p', path.join(here, 'tsconfig.json')], { encoding: 'utf8' });
  } catch (error) {
    assert.fail(`tsc reported errors:\n${error.stdout}${error.stderr}`);
  }
});

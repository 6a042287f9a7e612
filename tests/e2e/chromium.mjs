// Debian's Chromium, headless, as every browser test here launches it: as
// root it needs --no-sandbox, and the background-networking flags keep it
// from dialling Google's hosts, which this machine's closed network refuses.
import { chromium } from 'playwright-core';

export const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';

export const chromiumArgs = ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

export function launchChromium() {
  return chromium.launch({ executablePath, args: chromiumArgs });
}

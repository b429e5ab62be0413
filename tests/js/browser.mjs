// Drives wsloop's built-in page in headless Chromium (Debian's /usr/bin/chromium) with
// playwright-core.
//
// Usage: node browser.mjs chat|reconnect|deflate http[s]://127.0.0.1:PORT/ SCREENSHOT.png USER_DATA_DIR
//
// chat: two pages join a broadcast-mode server, each sends a line, and both must see both lines.
// reconnect: one page on an echo-mode server; after "ok A connected" the caller restarts the
// server on the same port; the page must show the loss, reconnect by itself and echo again.
// deflate: on a broadcast-mode server, the page opens two WebSockets of its own; both must have
// agreed on permessage-deflate (Chromium offers it), and 256 KiB of text sent on one must reach
// both intact (the server compresses it once for both).
// A screenshot of the first page is saved. Prints one "ok ..." line per check; exits non-zero
// on the first failure.
import { chromium } from 'playwright-core';

const [scenario, base, screenshot, userDataDir] = process.argv.slice(2);
const WAIT = 15000; // ms for any single step
const ARGS = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  // An https:// page is served with a certificate made for the test.
  ...(base.startsWith('https:') ? ['--ignore-certificate-errors'] : []),
];

let context;
const watchdog = setTimeout(() => fail(new Error('the whole run took too long')), 6 * WAIT);

async function fail(e) {
  console.error('FAILED: ' + (e && e.stack ? e.stack : String(e)));
  try { if (context) await context.close(); } catch (_) { /* already gone */ }
  process.exit(1);
}

async function openPage(name) {
  const page = await context.newPage();
  page.on('pageerror', (e) => fail(new Error(`${name}: script error on the page: ${e.message}`)));
  page.on('console', (m) => console.log(`[${name} console.${m.type()}] ${m.text()}`));
  const response = await page.goto(base, { timeout: WAIT });
  if (!response || response.status() !== 200) throw new Error(`${name}: GET / gave ${response && response.status()}`);
  await page.waitForFunction(() => document.getElementById('state').className === 'open', null, { timeout: WAIT });
  console.log(`ok ${name} connected`);
  return page;
}

async function say(page, text) {
  await page.fill('#msg', text);
  await page.press('#msg', 'Enter');
}

// Waits until the page's log has received (class "in") every one of `lines`.
async function received(page, lines) {
  await page.waitForFunction((want) => {
    const got = [...document.querySelectorAll('#log li.in')].map((li) => li.textContent);
    return want.every((w) => got.includes(w));
  }, lines, { timeout: WAIT });
}

async function chat() {
  const a = await openPage('A');
  const b = await openPage('B');
  const title = await a.title();
  if (title !== 'wsloop chat') throw new Error('title is ' + JSON.stringify(title));
  await say(a, 'hello from A');
  await say(b, 'hello from B');
  for (const [name, page] of [['A', a], ['B', b]]) {
    await received(page, ['hello from A', 'hello from B']);
    console.log(`ok ${name} sees both lines`);
  }
  return a;
}

async function reconnect() {
  const a = await openPage('A'); // the caller now restarts the server
  await a.waitForFunction(() => document.getElementById('state').className === 'closed', null, { timeout: WAIT });
  console.log('ok A saw the connection drop');
  await a.waitForFunction(() => document.getElementById('state').className === 'open', null, { timeout: 2 * WAIT });
  console.log('ok A reconnected');
  await say(a, 'back again');
  await received(a, ['back again']);
  console.log('ok A echo after reconnect');
  return a;
}

async function deflate() {
  const a = await openPage('A');
  const result = await a.evaluate(async (url) => {
    const open = () => new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      ws.onopen = () => resolve(ws);
      ws.onerror = () => reject(new Error('WebSocket error'));
    });
    const [x, y] = [await open(), await open()];
    const words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta'];
    let long = '';
    for (let i = 0; long.length < (256 << 10); i++) long += words[(i * 7919) % 8] + (i % 11 ? ' ' : '.\n');
    long = long.slice(0, 256 << 10);
    const next = (ws) => new Promise((resolve) => { ws.onmessage = (e) => resolve(e.data); });
    const got = [next(x), next(y)];
    x.send(long);
    const [gx, gy] = await Promise.all(got);
    x.close(1000);
    y.close(1000);
    return { extensions: [x.extensions, y.extensions], same: gx === long && gy === long, length: long.length };
  }, base.replace(/^http/, 'ws'));
  for (const e of result.extensions) {
    if (!e.includes('permessage-deflate')) throw new Error('no permessage-deflate agreed: ' + JSON.stringify(result.extensions));
  }
  console.log('ok permessage-deflate agreed: ' + result.extensions[0]);
  if (!result.same) throw new Error(`${result.length} bytes of text did not come back intact to both sockets`);
  console.log('ok 256 KiB of text reached both sockets');
  return a;
}

async function main() {
  // A persistent context is how playwright takes a fresh --user-data-dir of our choosing.
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ARGS,
    viewport: { width: 760, height: 420 },
    timeout: WAIT,
  });
  const a = scenario === 'reconnect' ? await reconnect() : scenario === 'deflate' ? await deflate() : await chat();
  await a.screenshot({ path: screenshot });
  console.log('ok screenshot ' + screenshot);
  await context.close();
  clearTimeout(watchdog);
  process.exit(0);
}

main().catch(fail);

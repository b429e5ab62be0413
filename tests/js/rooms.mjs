// examples/rooms.rs from headless Chromium (Debian's /usr/bin/chromium) driven by playwright-core.
//
// Usage: node rooms.mjs ws://127.0.0.1:PORT TOKEN USER_DATA_DIR
//
// Browsers cannot set headers on a WebSocket, so the page passes the token in the query. Checks
// that a wrong token is refused (the browser only sees the connection fail), that members of a
// room hear each other and not themselves, that nothing crosses rooms, and the join and leave
// notices. Prints one "ok ..." line per check; exits non-zero on the first failure.
import { chromium } from 'playwright-core';

const [base, token, userDataDir] = process.argv.slice(2);
const WAIT = 15000; // ms for any single step
const ARGS = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

let context;
const watchdog = setTimeout(() => fail(new Error('the whole run took too long')), 4 * WAIT);

async function fail(e) {
  console.error('FAILED: ' + (e && e.stack ? e.stack : String(e)));
  try { if (context) await context.close(); } catch (_) { /* already gone */ }
  process.exit(1);
}

// Runs in the page: every check, with the browser's own WebSocket.
async function scenario({ base, token, wait }) {
  const log = [];
  const timeout = (what) => new Promise((_, reject) =>
    setTimeout(() => reject(new Error('timed out: ' + what)), wait));

  // A member: its socket and a queue of what it received.
  function join(room, name, tok) {
    const ws = new WebSocket(`${base}/rooms/${room}?token=${tok}&name=${name}`);
    ws.binaryType = 'arraybuffer';
    const m = { ws, queue: [], waiters: [] };
    ws.onmessage = (e) => {
      const data = typeof e.data === 'string' ? e.data : 'binary:' + [...new Uint8Array(e.data)].join(',');
      const w = m.waiters.shift();
      if (w) w(data); else m.queue.push(data);
    };
    m.opened = Promise.race([new Promise((resolve, reject) => {
      ws.onopen = () => resolve(true);
      ws.onclose = (e) => resolve(false);
    }), timeout(`open ${name}`)]);
    m.next = () => Promise.race([
      m.queue.length ? Promise.resolve(m.queue.shift()) : new Promise((r) => m.waiters.push(r)),
      timeout(`a message for ${name}`),
    ]);
    m.expect = async (want) => {
      const got = await m.next();
      if (got !== want) throw new Error(`${name} got ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
    };
    return m;
  }

  const intruder = join('a', 'mallory', 'wrong');
  if (await intruder.opened) throw new Error('a wrong token was accepted');
  log.push('ok wrong token refused');

  const alice = join('a', 'alice', token);
  if (!(await alice.opened)) throw new Error('alice was refused');
  await alice.expect('* alice joined a (1 here)');
  const bob = join('a', 'bob', token);
  await bob.opened;
  await bob.expect('* bob joined a (2 here)');
  await alice.expect('* bob joined a (2 here)');
  const carol = join('b', 'carol', token);
  await carol.opened;
  await carol.expect('* carol joined b (1 here)');
  log.push('ok joined with the query token; joins announced');

  alice.ws.send('hello from chromium');
  await bob.expect('alice: hello from chromium');
  bob.ws.send('hi alice');
  await alice.expect('bob: hi alice'); // alice's own message would be ahead of this
  log.push('ok a message reaches the others in the room, not its sender');

  const dave = join('b', 'dave', token);
  await dave.opened;
  await dave.expect('* dave joined b (2 here)');
  await carol.expect('* dave joined b (2 here)'); // nothing from room a ahead of it
  carol.ws.send(new Uint8Array([0, 1, 2]));
  await dave.expect('binary:0,1,2');
  log.push('ok nothing crosses rooms; binary goes as it is');

  bob.ws.close(1000);
  await alice.expect('* bob left a (1 here)');
  log.push('ok leave announced');

  for (const m of [alice, carol, dave]) m.ws.close(1000);
  return log;
}

async function main() {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ARGS,
    timeout: WAIT,
  });
  const page = await context.newPage();
  page.on('pageerror', (e) => fail(new Error('script error on the page: ' + e.message)));
  const lines = await page.evaluate(scenario, { base, token, wait: WAIT });
  for (const line of lines) console.log(line);
  await context.close();
  clearTimeout(watchdog);
  process.exit(0);
}

main().catch(fail);

// Interop client for wsloop's tests, using the `ws` package.
//
// Usage: node interop.mjs ws://127.0.0.1:PORT/ echo|broadcast [deflate]
//
// Checks text, binary, a 1 MiB message sent in 16 fragments, ping/pong and a clean close with
// 1000. In broadcast mode a second connection checks that it receives the messages too.
// With `deflate` (ws offers permessage-deflate by default) it also checks that the server
// agreed, and that 256 KiB of text comes back to every connection in far fewer bytes on the
// wire. Prints one "ok ..." line per check; exits non-zero on the first failure.
import { randomBytes } from 'node:crypto';
import WebSocket from 'ws';

const [url, mode, compression] = process.argv.slice(2);
const WAIT = 15000; // ms for any single step
setTimeout(() => fail('the whole run took too long'), 4 * WAIT);

function fail(why) {
  console.error('FAILED: ' + why);
  process.exit(1);
}

// A connection whose messages queue up until a check takes them.
function open(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { maxPayload: 64 << 20 });
    const queue = [];
    const waiters = [];
    ws.on('message', (data, isBinary) => {
      const m = { data: Buffer.from(data), isBinary };
      const w = waiters.shift();
      if (w) w(m); else queue.push(m);
    });
    ws.next = () => new Promise((res, rej) => {
      const m = queue.shift();
      if (m) return res(m);
      const t = setTimeout(() => rej(new Error('no message within ' + WAIT + ' ms')), WAIT);
      waiters.push((m) => { clearTimeout(t); res(m); });
    });
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

async function main() {
  const ws = await open(url);
  const others = mode === 'broadcast' ? [await open(url)] : [];

  async function expect(sent, isBinary, what) {
    for (const [name, conn] of [['sender', ws], ...others.map((o) => ['listener', o])]) {
      const got = await conn.next();
      if (got.isBinary !== isBinary || !got.data.equals(sent)) {
        fail(`${what}: ${name} got ${got.isBinary ? 'binary' : 'text'} of ${got.data.length} bytes`);
      }
    }
    console.log('ok ' + what);
  }

  if (compression === 'deflate') {
    for (const conn of [ws, ...others]) {
      if (!conn.extensions.includes('permessage-deflate')) fail('no permessage-deflate agreed: ' + JSON.stringify(conn.extensions));
    }
    console.log('ok permessage-deflate agreed: ' + ws.extensions);
    const words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta'];
    let long = '';
    for (let i = 0; long.length < (256 << 10); i++) long += words[(i * 7919) % 8] + (i % 11 ? ' ' : '.\n');
    long = long.slice(0, 256 << 10);
    const before = [ws, ...others].map((c) => c._socket.bytesRead);
    ws.send(long);
    await expect(Buffer.from(long), false, '256 KiB of text');
    [ws, ...others].forEach((c, i) => {
      const wire = c._socket.bytesRead - before[i];
      if (wire * 4 > long.length) fail(`256 KiB of text took ${wire} bytes on the wire: not compressed`);
    });
    console.log('ok 256 KiB of text came compressed');
  }

  const text = 'hello from node ws \u2713 \u00e9';
  ws.send(text);
  await expect(Buffer.from(text), false, 'text');

  const blob = Buffer.alloc(1024, 0).map((_, i) => i & 0xff);
  ws.send(blob, { binary: true });
  await expect(blob, true, 'binary');

  const big = randomBytes(1 << 20);
  const piece = 64 << 10;
  for (let i = 0; i < big.length; i += piece) {
    ws.send(big.subarray(i, i + piece), { binary: true, fin: i + piece >= big.length });
  }
  await expect(big, true, '1 MiB in 16 fragments');

  await new Promise((resolve) => {
    const t = setTimeout(() => fail('no pong'), WAIT);
    ws.once('pong', (data) => {
      clearTimeout(t);
      if (data.toString() !== 'node ping') fail('pong carried ' + data.toString());
      resolve();
    });
    ws.ping('node ping');
  });
  console.log('ok ping');

  for (const o of others) o.close(1000, 'listener done');
  const code = await new Promise((resolve) => {
    ws.once('close', (code) => resolve(code));
    ws.close(1000, 'bye');
  });
  if (code !== 1000) fail('close: the server answered ' + code + ', expected 1000');
  console.log('ok close 1000');
  process.exit(0);
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));

'use strict';
// Scenario test against a live registry: lease, watch, register, find,
// revoke. The registry is GERYON_REGISTRY (host:port, or several endpoints
// host:port,host:port; default 127.0.0.1:6675), over TLS when GERYON_TLS_DIR names a directory holding
// ca.crt, cert.pem and key.pem. GERYON_TLS_SERVER_NAME, when set, is the name
// to check the registry's certificate against instead of the host dialled.
//
// Every step has a 10 s limit, so a registry that is down or silent fails the
// test instead of hanging it.

const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { connect, unary, waitForReady, grpc, DEFAULT_TARGET } = require('../geryon');

const STEP_MS = 10000;
const TARGET = process.env.GERYON_REGISTRY || DEFAULT_TARGET;
const TLS_DIR = process.env.GERYON_TLS_DIR || '';
const SERVER_NAME = process.env.GERYON_TLS_SERVER_NAME || '';

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Watcher wraps a Watch stream: it keeps every response and lets the test
// wait for the first one (since the last wait) matching a predicate.
class Watcher {
  constructor(call) {
    this.call = call;
    this.responses = [];
    this.cursor = 0;
    this.waiters = [];
    this.failure = null;
    call.on('data', (response) => {
      this.responses.push(response);
      this.wake();
    });
    call.on('error', (err) => {
      if (err.code !== grpc.status.CANCELLED) this.fail(err);
    });
    call.on('end', () => this.fail(new Error('watch stream ended by the registry')));
  }

  fail(err) {
    if (!this.failure) this.failure = err;
    this.wake();
  }

  wake() {
    for (const waiter of this.waiters.splice(0)) waiter();
  }

  // next resolves with the first response from the cursor on for which
  // predicate returns a value other than undefined, and moves the cursor
  // past it.
  next(predicate, what) {
    const look = (resolve, reject) => {
      while (this.cursor < this.responses.length) {
        const found = predicate(this.responses[this.cursor++]);
        if (found !== undefined) return resolve(found);
      }
      if (this.failure) return reject(this.failure);
      this.waiters.push(() => look(resolve, reject));
    };
    return withTimeout(new Promise(look), STEP_MS, what);
  }

  // event resolves with the first event of the given type for the named
  // service in a TYPE_EVENTS response.
  event(type, name) {
    return this.next((response) => {
      if (response.type !== 'TYPE_EVENTS') return undefined;
      return response.events.find((e) => e.type === type && e.service && e.service.name === name);
    }, `${type} event for ${name} on the watch`);
  }

  close() {
    this.call.end();
    this.call.cancel();
  }
}

test('registry scenario: lease, watch, register, find, revoke', async (t) => {
  const token = crypto.randomBytes(6).toString('hex');
  const svc = `nodetest-${token}`;
  const name = `tcp!nodetest!${token}`;
  const options = SERVER_NAME ? { 'grpc.ssl_target_name_override': SERVER_NAME } : {};
  const client = connect(TARGET, TLS_DIR, options);
  let watcher;
  let failed = false;
  t.after(() => {
    if (watcher) watcher.close();
    client.close();
  });

  // step runs one named step as a subtest with a 10 s limit; once a step has
  // failed, the rest are skipped.
  const step = (label, fn) =>
    t.test(label, async (st) => {
      if (failed) return st.skip('an earlier step failed');
      try {
        await withTimeout(Promise.resolve().then(fn), STEP_MS, label);
      } catch (err) {
        failed = true;
        throw err;
      }
    });

  await step(`connect to ${TARGET} (${TLS_DIR ? 'TLS' : 'insecure'})`, () => waitForReady(client, STEP_MS));

  let lease;
  await step('Grant a lease with ttl_ms 5000', async () => {
    const response = await unary(client, 'Grant', { ttl_ms: 5000 });
    lease = response.lease;
    assert.ok(lease && lease !== '0', `Grant returned lease ${lease}`);
    assert.equal(response.ttl_ms, '5000');
  });

  await step('open a Watch on svc=' + svc, async () => {
    watcher = new Watcher(client.Watch());
    watcher.call.write({ create_request: { attrs: { svc } } });
    // A progress notice answers only a watch that is in place, so every
    // change from here on reaches it.
    watcher.call.write({ progress_request: {} });
    await watcher.next((r) => (r.type === 'TYPE_PROGRESS' ? r : undefined), 'progress notice on the watch');
  });

  const attrs = { svc, lang: 'node' };
  await step(`Register ${name} under the lease`, async () => {
    const response = await unary(client, 'Register', { name, attrs, lease });
    assert.equal(response.service.name, name);
    assert.deepEqual({ ...response.service.attrs }, attrs);
    assert.equal(response.service.lease, lease);
  });

  await step('Find svc=' + svc + ' returns exactly that service', async () => {
    const response = await unary(client, 'Find', { attrs: { svc } });
    assert.equal(response.services.length, 1, `Find returned ${JSON.stringify(response.services)}`);
    const [found] = response.services;
    assert.equal(found.name, name);
    assert.deepEqual({ ...found.attrs }, attrs);
    assert.equal(found.lease, lease);
  });

  await step('the watch sees TYPE_PUT for it', async () => {
    const event = await watcher.event('TYPE_PUT', name);
    assert.deepEqual({ ...event.service.attrs }, attrs);
  });

  await step('Revoke the lease', async () => {
    const response = await unary(client, 'Revoke', { lease });
    assert.equal(response.deleted, '1');
  });

  await step('the watch sees TYPE_DELETE for it', () => watcher.event('TYPE_DELETE', name));

  await step('Find svc=' + svc + ' returns nothing', async () => {
    const response = await unary(client, 'Find', { attrs: { svc } });
    assert.deepEqual(response.services, []);
  });
});

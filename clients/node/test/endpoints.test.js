'use strict';
// Unit tests of the client's endpoint handling; no registry needed.

const test = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const { connect, splitTargets } = require('../geryon');

test('splitTargets checks addresses as Python geryon.endpoints.parse does', () => {
  assert.deepEqual(splitTargets('a:1, b:2'), ['a:1', 'b:2']);
  assert.deepEqual(splitTargets(['a:1', ' [::1]:2 ']), ['a:1', '[::1]:2']);
  assert.deepEqual(splitTargets('unix:/run/geryon.sock'), ['unix:/run/geryon.sock']);
  assert.deepEqual(splitTargets(''), ['127.0.0.1:6675']);
  const bad = [
    ['a:0', /bad address "a:0"/],
    ['a:65536', /bad address "a:65536"/],
    ['a', /bad address "a"/],
    [':1', /bad address ":1"/],
    [' , ', /no address/],
    ['a:1,a:1', /names an address twice/],
    ['unix:/x,a:1', /a unix: socket cannot be one of several/],
    [[], /non-empty array/],
    [['a:1,b:2'], /bad address "a:1,b:2" \(want one HOST:PORT an element\)/],
    [['', 'a:1'], /bad address ""/],
  ];
  for (const [target, says] of bad) assert.throws(() => splitTargets(target), says, JSON.stringify(target));
});

// A port nobody listens on: a stream there ends UNAVAILABLE.
function deadAddress() {
  return new Promise((resolve) => {
    const server = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(`127.0.0.1:${port}`));
    });
  });
}

test('a stream that ends UNAVAILABLE sends the next stream to the next endpoint', async () => {
  const registry = connect([await deadAddress(), await deadAddress()]);
  try {
    for (const [method, next] of [['Watch', 1], ['KeepAlive', 0]]) {
      const call = registry[method]();
      call.on('error', () => {});
      const status = await new Promise((resolve) => call.on('status', resolve));
      assert.equal(status.code, 14, `${method}: ${status.details}`); // UNAVAILABLE
      assert.equal(registry.current, next, method);
    }
  } finally {
    registry.close();
  }
});

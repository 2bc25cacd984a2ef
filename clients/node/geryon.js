'use strict';
// A small client for Geryon's registry (proto/geryon/v1/registry.proto).
//
// The proto is loaded at run time with @grpc/proto-loader, with these
// conventions throughout (use them when building requests and reading
// responses):
//   - field names as in the proto (keepCase: true): ttl_ms, create_request
//   - int64 fields as decimal strings (longs: String): lease ids, revisions
//   - enums as their names (enums: String): 'TYPE_PUT', 'TYPE_EVENTS'
//   - unset scalar fields and maps present with their defaults (defaults: true)
//   - the oneof in use named by a virtual field (oneofs: true):
//     WatchRequest.request is 'create_request' or 'progress_request'
//
//   const { connect, unary } = require('./geryon');
//   const registry = connect('127.0.0.1:6675,127.0.0.1:6676', process.env.GERYON_TLS_DIR);
//   const { lease } = await unary(registry, 'Grant', { ttl_ms: 5000 });
//
// A registry may have several endpoints (fronts over one etcd cluster): the
// client uses the first, and moves to the next when a call or a stream ends
// UNAVAILABLE or DEADLINE_EXCEEDED, or an attempt of unary() gets no answer
// within ATTEMPT_MS (doubled on each pass over the endpoints); unary()
// retries there. A stream (Watch, KeepAlive) is not reopened for you: open
// it again after its 'status' event (it follows 'error') and it opens on the
// next endpoint; resume a watch from the revision after the last one it
// delivered, and renew the lease there. A stream on an endpoint that stops
// answering without ending is not detected.

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'geryon/v1/registry.proto';
const DEFAULT_TARGET = '127.0.0.1:6675';
// Failures that say nothing about the request: try the next endpoint.
const TRANSIENT = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED]);
// With several endpoints, one attempt at one of them: an endpoint that
// accepts and never answers costs this, not the call's whole deadline.
const ATTEMPT_MS = 2500; // as geryon/client.py ATTEMPT_S (why: there)

const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
});

let cachedPackage;

// load returns the geryon.v1 package: its Registry client constructor and
// the message types.
function load() {
  if (!cachedPackage) {
    const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
    cachedPackage = grpc.loadPackageDefinition(definition).geryon.v1;
  }
  return cachedPackage;
}

// credentials returns TLS credentials from tlsDir (ca.crt, the CA that signed
// the registry's certificate; cert.pem and key.pem, this client's
// certificate and key), or insecure ones when tlsDir is empty.
function credentials(tlsDir) {
  if (!tlsDir) return grpc.credentials.createInsecure();
  const read = (name) => fs.readFileSync(path.join(tlsDir, name));
  return grpc.credentials.createSsl(read('ca.crt'), read('key.pem'), read('cert.pem'));
}

// Endpoints is a registry at one or more addresses: a geryon.v1.Registry
// client for the one in use (client()), made when first needed, and the
// streaming methods of that client, which move to the next endpoint when
// their stream ends with a transient status.
class Endpoints {
  constructor(targets, creds, options) {
    this.targets = targets;
    this.creds = creds;
    this.options = options;
    this.clients = new Map();
    this.current = 0;
  }

  // client returns the Registry client of the endpoint in use.
  client() {
    let client = this.clients.get(this.current);
    if (!client) {
      const { Registry } = load();
      client = new Registry(this.targets[this.current], this.creds, this.options);
      this.clients.set(this.current, client);
    }
    return client;
  }

  // failed tells that endpoint index failed with err: after a transient
  // failure the next call goes to the next endpoint.
  failed(index, err) {
    if (this.targets.length > 1 && index === this.current && TRANSIENT.has(err.code)) {
      this.current = (index + 1) % this.targets.length;
    }
  }

  // stream opens method's stream on the endpoint in use; a transient end
  // ('status' comes with every end, error or not) sends the next stream to
  // the next endpoint.
  stream(method, args) {
    const index = this.current;
    const call = this.client()[method](...args);
    call.on('status', (status) => this.failed(index, status));
    return call;
  }

  Watch(...args) {
    return this.stream('Watch', args);
  }

  KeepAlive(...args) {
    return this.stream('KeepAlive', args);
  }

  close() {
    for (const client of this.clients.values()) client.close();
    this.clients.clear();
  }
}

// hostPort checks one HOST:PORT (IPv6 hosts in brackets) as Python's
// geryon.endpoints.parse_hostport does, or throws naming it.
function hostPort(text) {
  const colon = text.lastIndexOf(':');
  let host = colon < 0 ? '' : text.slice(0, colon);
  const port = text.slice(colon + 1);
  if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
  if (colon < 0 || !host || !/^\d+$/.test(port) || Number(port) < 1 || Number(port) > 65535) {
    throw new Error(`geryon: bad address ${JSON.stringify(text)} (want HOST:PORT)`);
  }
}

// splitTargets turns "host:port[,host:port...]" (or an array of them, one an
// element), or a lone "unix:PATH", into a list, checked as Python's
// geryon.endpoints.parse checks a registry address; it throws naming what is
// wrong.
function splitTargets(target) {
  const what = JSON.stringify(target);
  let list;
  if (Array.isArray(target)) {
    if (target.length === 0 || !target.every((t) => typeof t === 'string')) {
      throw new Error('geryon: want a non-empty array of HOST:PORT strings');
    }
    for (const t of target) {
      if (!t.trim() || t.includes(',')) {
        throw new Error(`geryon: bad address ${JSON.stringify(t)} (want one HOST:PORT an element)`);
      }
    }
    list = target.map((t) => t.trim());
  } else {
    const text = String(target || DEFAULT_TARGET);
    list = text.split(',').map((t) => t.trim()).filter((t) => t);
    if (list.length === 0) {
      throw new Error(`geryon: no address in ${what} (want HOST:PORT[,HOST:PORT...])`);
    }
  }
  for (const t of list) {
    if (!t.startsWith('unix:')) hostPort(t);
    else if (list.length > 1) {
      throw new Error(`geryon: ${what}: a unix: socket cannot be one of several endpoints`);
    }
  }
  if (new Set(list).size !== list.length) {
    throw new Error(`geryon: ${what} names an address twice`);
  }
  return list;
}

// connect returns the registry at target ("host:port", or several endpoints
// "host:port,host:port" or an array; the default is 127.0.0.1:6675), over
// TLS when tlsDir names a directory with ca.crt, cert.pem and key.pem, else
// insecure. Extra channel options (e.g. {'grpc.ssl_target_name_override':
// 'registry'} when the registry's certificate does not name the host
// dialled) may be passed as options. Call close() when done.
function connect(target, tlsDir, options) {
  return new Endpoints(splitTargets(target), credentials(tlsDir), options || {});
}

function callOnce(client, method, request, metadata, deadline) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata || new grpc.Metadata(), { deadline }, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
  });
}

// unary calls a unary method ('Grant', 'Register', 'Find', ...) and resolves
// with its response, or rejects with the gRPC error (err.code is a
// grpc.status value). Within timeoutMs (10 s) a transient failure is retried
// on the next endpoint; with several endpoints, an attempt left unanswered
// for ATTEMPT_MS (doubled on each pass over them) moves on too.
async function unary(endpoints, method, request, { timeoutMs = 10000, metadata } = {}) {
  const end = Date.now() + timeoutMs;
  const many = endpoints.targets.length;
  let pause = 50;
  for (let tries = 0; ; tries++) {
    const index = endpoints.current;
    const attempt = many > 1 ? Math.min(end, Date.now() + ATTEMPT_MS * 2 ** Math.floor(tries / many)) : end;
    try {
      return await callOnce(endpoints.client(), method, request, metadata, new Date(attempt));
    } catch (err) {
      endpoints.failed(index, err);
      if (!TRANSIENT.has(err.code) || Date.now() + pause >= end) throw err;
    }
    await new Promise((resolve) => setTimeout(resolve, pause));
    pause = Math.min(pause * 2, 1000);
  }
}

// waitForReady resolves once an endpoint's channel is connected (trying each
// in turn), or rejects after timeoutMs.
async function waitForReady(endpoints, timeoutMs = 10000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const index = endpoints.current;
    const client = endpoints.client();
    const slice = endpoints.targets.length > 1 ? Math.min(1000, end - Date.now()) : end - Date.now();
    try {
      await new Promise((resolve, reject) => {
        client.waitForReady(new Date(Date.now() + slice), (err) => (err ? reject(err) : resolve()));
      });
      return;
    } catch (err) {
      if (Date.now() >= end) throw err;
      endpoints.failed(index, { code: grpc.status.UNAVAILABLE });
    }
  }
}

module.exports = {
  ATTEMPT_MS,
  Endpoints,
  connect,
  splitTargets,
  credentials,
  load,
  unary,
  waitForReady,
  grpc,
  DEFAULT_TARGET,
  LOADER_OPTIONS,
  PROTO_ROOT,
  PROTO_FILE,
};

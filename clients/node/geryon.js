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
//   const client = connect('127.0.0.1:6675,127.0.0.1:6676', process.env.GERYON_TLS_DIR);
//   const { lease } = await unary(client, 'Grant', { ttl_ms: 5000 });
//
// A registry may have several endpoints (fronts over one etcd cluster): the
// client uses the first, and moves to the next when a call fails UNAVAILABLE
// or DEADLINE_EXCEEDED; unary() retries there, and a stream (Watch,
// KeepAlive) opened after a failure opens there (resume a watch from the
// revision after the last one it delivered).

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'geryon/v1/registry.proto';
const DEFAULT_TARGET = '127.0.0.1:6675';
// Failures that say nothing about the request: try the next endpoint.
const TRANSIENT = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED]);

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
// streaming methods of that client.
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

  Watch(...args) {
    return this.client().Watch(...args);
  }

  KeepAlive(...args) {
    return this.client().KeepAlive(...args);
  }

  close() {
    for (const client of this.clients.values()) client.close();
    this.clients.clear();
  }
}

// splitTargets turns "host:port[,host:port...]" (or an array of them) into
// a list, or throws naming what is wrong.
function splitTargets(target) {
  const list = (Array.isArray(target) ? target : String(target || DEFAULT_TARGET).split(','))
    .map((t) => t.trim())
    .filter((t) => t);
  if (list.length === 0 || list.some((t) => !/^(\[[^\]]+\]|[^:,\s]+):\d{1,5}$/.test(t))) {
    throw new Error(`geryon: bad registry address ${JSON.stringify(target)} (want HOST:PORT[,HOST:PORT...])`);
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
// on the next endpoint.
async function unary(endpoints, method, request, { timeoutMs = 10000, metadata } = {}) {
  const end = Date.now() + timeoutMs;
  let pause = 50;
  for (;;) {
    const index = endpoints.current;
    try {
      return await callOnce(endpoints.client(), method, request, metadata, new Date(end));
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

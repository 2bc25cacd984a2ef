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
//   const client = connect('127.0.0.1:6675', process.env.GERYON_TLS_DIR);
//   const { lease } = await unary(client, 'Grant', { ttl_ms: 5000 });

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'geryon/v1/registry.proto';
const DEFAULT_TARGET = '127.0.0.1:6675';

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

// connect returns a geryon.v1.Registry client for target ("host:port"; the
// default is 127.0.0.1:6675), over TLS when tlsDir names a directory with
// ca.crt, cert.pem and key.pem, else insecure. Extra channel options (e.g.
// {'grpc.ssl_target_name_override': 'registry'} when the registry's
// certificate does not name the host dialled) may be passed as options.
// Call client.close() when done.
function connect(target, tlsDir, options) {
  const { Registry } = load();
  return new Registry(target || DEFAULT_TARGET, credentials(tlsDir), options || {});
}

// unary calls a unary method ('Grant', 'Register', 'Find', ...) and resolves
// with its response, or rejects with the gRPC error (err.code is a
// grpc.status value). The call is given a deadline of timeoutMs (10 s).
function unary(client, method, request, { timeoutMs = 10000, metadata } = {}) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutMs);
    client[method](request, metadata || new grpc.Metadata(), { deadline }, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
  });
}

// waitForReady resolves once the client's channel is connected, or rejects
// after timeoutMs.
function waitForReady(client, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    client.waitForReady(new Date(Date.now() + timeoutMs), (err) => (err ? reject(err) : resolve()));
  });
}

module.exports = {
  connect,
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

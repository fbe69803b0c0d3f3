'use strict';
/**
 * A small client for mpsd's public gRPC API.
 *
 * The .proto is loaded at run time straight from the repository, so there is no
 * generated code to keep in step with proto/mpsd/v1/inference.proto.
 */
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.join(__dirname, '..', '..', 'proto');
const DEFAULT_ADDRESS = '127.0.0.1:7700';

const definition = protoLoader.loadSync('mpsd/v1/inference.proto', {
  includeDirs: [PROTO_DIR],
  keepCase: true, // field names as in the .proto: max_tokens, not maxTokens
  longs: String, // uint64 seed: no precision lost above 2^53
  defaults: true, // an absent text arrives as '' rather than undefined
});
const { Inference } = grpc.loadPackageDefinition(definition).mpsd.v1;

/** Adds the bearer token to every call; a per-call interceptor also works on plaintext loopback,
 * where grpc-js refuses call credentials. */
function bearer(token) {
  return (options, nextCall) => new grpc.InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      metadata.set('authorization', `Bearer ${token}`);
      next(metadata, listener);
    },
  });
}

/**
 * The channel target and options for one address, several ('A,B,C': IPv4 or IPv6 literals with ports) or a
 * dns:/// name: several get round_robin and the retry policy of clients/service-config.json. grpc-js 1.14 has no
 * client-side health checking, so its healthCheckConfig is left out: a host that refuses with UNAVAILABLE (draining,
 * no worker) still gets calls, and the retry policy resends them (docs/multi-host.md).
 */
function balanced(address) {
  const hosts = address.split(',').map((a) => a.trim()).filter(Boolean);
  if (hosts.length === 1 && !hosts[0].startsWith('dns:')) return { target: hosts[0], options: {} };
  const config = JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'service-config.json'), 'utf8'));
  delete config.healthCheckConfig;
  const options = { 'grpc.service_config': JSON.stringify(config), 'grpc.max_reconnect_backoff_ms': 5000 };
  if (hosts.length === 1) return { target: hosts[0], options };
  const family = hosts.every((h) => h.startsWith('[')) ? 'ipv6' : 'ipv4';
  return { target: `${family}:${hosts.join(',')}`, options };
}

/**
 * Returns an Inference client for HOST:PORT, or for several hosts (see balanced).
 * tlsCa: PEM (Buffer or string) of the CA that signed the daemon's certificate; without it the channel is plaintext.
 * token: the daemon's bearer token (the contents of its token_file), if it requires one.
 */
function connect(address = process.env.MPSD_ADDRESS || DEFAULT_ADDRESS, { tlsCa, token } = {}) {
  const credentials = tlsCa
    ? grpc.credentials.createSsl(Buffer.from(tlsCa))
    : grpc.credentials.createInsecure();
  const { target, options } = balanced(address);
  return new Inference(target, credentials, { ...options, interceptors: token ? [bearer(token)] : [] });
}

/**
 * Streams GenerateResponse messages for a request ({model, prompt, max_tokens, temperature, top_p, seed, stop}).
 * Leave a field undefined to get the daemon's default; 0 is sent as 0 (temperature 0 = greedy).
 * A gRPC error is thrown from the loop with .code (grpc.status) and .details.
 */
function generate(client, request, { deadline } = {}) {
  return relay(client.Generate(request, deadline ? { deadline } : {}));
}

/**
 * Streams the reply to a conversation ({model, messages: [{role, content}], max_tokens, ...}), rendered by the
 * worker with the model's own chat template; messages arrive as from generate().
 */
function chat(client, request, { deadline } = {}) {
  return relay(client.Chat(request, deadline ? { deadline } : {}));
}

async function* relay(call) {
  try {
    yield* call;
  } finally {
    // A consumer that stops early cancels the call, which stops the worker's generation.
    call.cancel();
  }
}

/** The status name (NOT_FOUND, UNAVAILABLE ...) of a gRPC error, or undefined for any other error. */
function statusName(error) {
  return typeof error?.code === 'number' ? grpc.status[error.code] : undefined;
}

/** Reads a token file the way mpsctl does: surrounding whitespace is not part of the token. */
function readToken(file) {
  return fs.readFileSync(file, 'utf8').trim();
}

module.exports = { connect, generate, chat, statusName, readToken, DEFAULT_ADDRESS };

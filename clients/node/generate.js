#!/usr/bin/env node
'use strict';
/**
 * Streams generated text from mpsd to stdout, like `mpsctl generate`:
 *
 *   node clients/node/generate.js [--address HOST:PORT] [--model M] [--max-tokens N] [--temperature T]
 *       [--top-p P] [--seed S] [--stop TEXT]... [--token-file F] [--tls-ca F] PROMPT
 *
 * Text goes to stdout as tokens arrive, a summary line to stderr; a gRPC error exits 1 with
 * `mpsd: CODE_NAME: details`.
 */
const fs = require('node:fs');
const { parseArgs } = require('node:util');
const { connect, generate, statusName, readToken } = require('./mpsd-client');

const USAGE = 'usage: node generate.js [--address HOST:PORT] [--model M] [--max-tokens N] [--temperature T] '
  + '[--top-p P] [--seed S] [--stop TEXT]... [--token-file F] [--tls-ca F] PROMPT';

function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      address: { type: 'string', default: process.env.MPSD_ADDRESS || '127.0.0.1:7700' },
      model: { type: 'string', default: '' },
      'max-tokens': { type: 'string' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      seed: { type: 'string' },
      stop: { type: 'string', multiple: true, default: [] },
      'token-file': { type: 'string', default: process.env.MPSD_TOKEN_FILE },
      'tls-ca': { type: 'string', default: process.env.MPSD_TLS_CA },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help || positionals.length !== 1) throw new UsageError(USAGE);
  const number = (name, parseFn) => {
    if (values[name] === undefined) return undefined; // unset: the daemon's default, not 0
    const value = parseFn(values[name]);
    if (Number.isNaN(value)) throw new UsageError(`--${name}: not a number: ${values[name]}`);
    return value;
  };
  if (values.seed !== undefined && !/^\d+$/.test(values.seed)) {
    throw new UsageError(`--seed: not an unsigned integer: ${values.seed}`);
  }
  return {
    address: values.address,
    tokenFile: values['token-file'],
    tlsCa: values['tls-ca'],
    request: {
      model: values.model,
      prompt: positionals[0],
      max_tokens: number('max-tokens', (s) => Number.parseInt(s, 10)),
      temperature: number('temperature', Number.parseFloat),
      top_p: number('top-p', Number.parseFloat),
      seed: values.seed, // a decimal string: uint64 does not fit a JS number
      stop: values.stop,
    },
  };
}

class UsageError extends Error {}

async function main(argv) {
  const args = parse(argv);
  const client = connect(args.address, {
    tlsCa: args.tlsCa && fs.readFileSync(args.tlsCa),
    token: args.tokenFile && readToken(args.tokenFile),
  });
  try {
    // 300 s, mpsctl's default: long enough for a full context, short enough that a wedged call ends.
    for await (const message of generate(client, args.request, { deadline: Date.now() + 300_000 })) {
      if (message.finish) {
        const { reason, usage, worker_id: worker, worker_pid: pid } = message.finish;
        process.stdout.write('\n');
        process.stderr.write(`[${reason}: ${usage.prompt_tokens} prompt + ${usage.completion_tokens} generated tokens, `
          + `worker ${worker} pid ${pid}]\n`);
      } else {
        process.stdout.write(message.text);
      }
    }
  } finally {
    client.close();
  }
}

/** Says what went wrong in one line, like mpsctl, and returns the exit status. */
function report(error) {
  if (error instanceof UsageError || error.code?.startsWith?.('ERR_PARSE_ARGS')) {
    process.stderr.write(`${error.message}\n`);
    return 2;
  }
  const name = statusName(error);
  if (name) {
    process.stderr.write(`mpsd: ${name}: ${error.details}\n`);
  } else if (error.syscall) { // an unreadable --token-file or --tls-ca
    process.stderr.write(`mpsd: ${error.path || ''}: ${error.message}\n`);
  } else {
    throw error; // a bug: keep the stack trace
  }
  return 1;
}

main(process.argv.slice(2)).catch((error) => { process.exitCode = report(error); });

'use strict';
/**
 * What the command-line examples (generate.js, chat.js) share: their options, connecting, the summary line and
 * how an error is reported. Like mpsctl: text to stdout as it streams, a summary to stderr, `mpsd: CODE: details`
 * and exit 1 on a gRPC error.
 */
const fs = require('node:fs');
const { parseArgs } = require('node:util');
const { connect, statusName, readToken, DEFAULT_ADDRESS } = require('./mpsd-client');

const COMMON_USAGE = '[--address HOST:PORT] [--model M] [--max-tokens N] [--temperature T] [--top-p P] [--seed S] '
  + '[--stop TEXT]... [--token-file F] [--tls-ca F]';
const DEADLINE_MS = 300_000; // mpsctl's default: long enough for a full context, short enough that a wedged call ends

class UsageError extends Error {}

/** Parses the common options plus `extra`; returns {values, positionals, fields, address, tokenFile, tlsCa}. */
function parseCommon(argv, usage, extra = {}) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      address: { type: 'string', default: process.env.MPSD_ADDRESS || DEFAULT_ADDRESS },
      model: { type: 'string', default: '' },
      'max-tokens': { type: 'string' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      seed: { type: 'string' },
      stop: { type: 'string', multiple: true, default: [] },
      'token-file': { type: 'string', default: process.env.MPSD_TOKEN_FILE },
      'tls-ca': { type: 'string', default: process.env.MPSD_TLS_CA },
      help: { type: 'boolean', short: 'h' },
      ...extra,
    },
  });
  if (values.help || positionals.length !== 1) throw new UsageError(usage);
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
    values,
    positionals,
    address: values.address,
    tokenFile: values['token-file'],
    tlsCa: values['tls-ca'],
    // The fields GenerateRequest and ChatRequest share.
    fields: {
      model: values.model,
      max_tokens: number('max-tokens', (s) => Number.parseInt(s, 10)),
      temperature: number('temperature', Number.parseFloat),
      top_p: number('top-p', Number.parseFloat),
      seed: values.seed, // a decimal string: uint64 does not fit a JS number
      stop: values.stop,
    },
  };
}

function connectFor(args) {
  return connect(args.address, {
    tlsCa: args.tlsCa && fs.readFileSync(args.tlsCa),
    token: args.tokenFile && readToken(args.tokenFile),
  });
}

/** Writes a stream's text to stdout as it comes and its summary to stderr. */
async function printStream(messages) {
  for await (const message of messages) {
    if (message.finish) {
      const { reason, usage, worker_id: worker, worker_pid: pid } = message.finish;
      process.stdout.write('\n');
      process.stderr.write(`[${reason}: ${usage.prompt_tokens} prompt + ${usage.completion_tokens} generated tokens, `
        + `worker ${worker} pid ${pid}]\n`);
    } else {
      process.stdout.write(message.text);
    }
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

module.exports = { COMMON_USAGE, DEADLINE_MS, UsageError, parseCommon, connectFor, printStream, report };

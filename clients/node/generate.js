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
const { generate } = require('./mpsd-client');
const { COMMON_USAGE, DEADLINE_MS, parseCommon, connectFor, printStream, report } = require('./cli');

async function main(argv) {
  const args = parseCommon(argv, `usage: node generate.js ${COMMON_USAGE} PROMPT`);
  const client = connectFor(args);
  try {
    const request = { ...args.fields, prompt: args.positionals[0] };
    await printStream(generate(client, request, { deadline: Date.now() + DEADLINE_MS }));
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).catch((error) => { process.exitCode = report(error); });

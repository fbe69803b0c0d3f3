#!/usr/bin/env node
'use strict';
/**
 * Sends one chat turn to mpsd and streams the model's reply to stdout, like `mpsctl chat MESSAGE`:
 *
 *   node clients/node/chat.js [--system TEXT] [--address HOST:PORT] [--model M] [--max-tokens N]
 *       [--temperature T] [--top-p P] [--seed S] [--stop TEXT]... [--token-file F] [--tls-ca F] MESSAGE
 *
 * The worker renders the conversation with the model's own chat template; a model without one answers
 * FAILED_PRECONDITION. Text goes to stdout as it arrives, a summary line to stderr.
 */
const { chat } = require('./mpsd-client');
const { COMMON_USAGE, DEADLINE_MS, parseCommon, connectFor, printStream, report } = require('./cli');

async function main(argv) {
  const args = parseCommon(argv, `usage: node chat.js [--system TEXT] ${COMMON_USAGE} MESSAGE`,
    { system: { type: 'string' } });
  const messages = [
    ...(args.values.system ? [{ role: 'system', content: args.values.system }] : []),
    { role: 'user', content: args.positionals[0] },
  ];
  const client = connectFor(args);
  try {
    await printStream(chat(client, { ...args.fields, messages }, { deadline: Date.now() + DEADLINE_MS }));
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).catch((error) => { process.exitCode = report(error); });

// Subscribe to the hub's events (snapshot first), record an activity, complete it, and
// print the two events that come back. Then exit 0.
//
//   COLLAB_GRPC_TARGET=127.0.0.1:50051 COLLAB_TOKEN=... node example.js
//
// Without COLLAB_TOKEN the key `collab up` wrote to .collab/api_key is used (looked for
// in the current directory and in the repository root).

import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { createClient, fromStruct } from './client.js';

const TIMEOUT_MS = 15_000;

function findToken() {
  if (process.env.COLLAB_TOKEN) return process.env.COLLAB_TOKEN;
  const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
  for (const dir of [process.cwd(), repoRoot]) {
    const keyFile = path.join(dir, '.collab', 'api_key');
    if (existsSync(keyFile)) return readFileSync(keyFile, 'utf8').trim();
  }
  return undefined; // a server with COLLAB_AUTH=off needs none
}

/** The next message of `subscription`, or an error after `ms`. */
async function next(subscription, ms = TIMEOUT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no event within ${ms} ms`)), ms);
  });
  try {
    const { value, done } = await Promise.race([subscription.next(), timeout]);
    if (done) throw new Error('the event stream ended');
    return value;
  } finally {
    clearTimeout(timer);
  }
}

async function main() {
  const target = process.env.COLLAB_GRPC_TARGET || '127.0.0.1:50051';
  const hub = createClient({ target, token: findToken() });
  const agentId = `node_example_${process.pid}`;
  // Only this agent's events, starting with a snapshot: once it has arrived the
  // subscription is live, so nothing recorded afterwards can be missed.
  const events = hub.events({ includeSnapshot: true, agentIds: [agentId] });
  try {
    const first = await next(events);
    if (first.message !== 'snapshot') throw new Error(`expected a snapshot first, got ${first.message}`);
    const { snapshot } = first;
    console.log(`snapshot: epoch ${snapshot.epoch} seq ${snapshot.seq}, ${snapshot.agent_status.total_agents} agents`);

    const recorded = await hub.recordActivity({
      agentId,
      activityType: 'memory_write',
      department: 'engineering',
      metadata: { item: 'notes.md', bytes: 42, tags: ['example'] },
      relatedAgents: ['agent_2'],
    });
    console.log(`recorded ${recorded.activity_id}`);
    await hub.completeActivity({ activityId: recorded.activity_id, success: true });

    for (let i = 0; i < 2; i++) {
      const { event } = await next(events);
      const kind = event.payload; // 'activity_recorded' | 'activity_completed' | ...
      const activity = kind === 'activity_completed' ? event[kind].activity : event[kind];
      const metadata = JSON.stringify(fromStruct(activity.metadata));
      console.log(`event seq ${event.seq} ${kind}: ${activity.activity_id} ${activity.status} ${metadata}`);
    }
  } finally {
    events.cancel();
    hub.close();
  }
}

main().then(
  () => process.exit(0),
  (error) => {
    console.error(`example failed: ${error.message}`);
    process.exit(1);
  },
);

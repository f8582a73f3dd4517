// The Node client against a live hub: `node --test test/` with COLLAB_GRPC_TARGET and
// COLLAB_TOKEN (a read+write key) set. Every test is bounded in time, and every agent id
// is unique to this run, so the tests do not depend on what else the server holds.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { activityTypes, CollabError, createClient, eventKinds, fromStruct, timestampToDate } from '../client.js';

const TARGET = process.env.COLLAB_GRPC_TARGET;
const TOKEN = process.env.COLLAB_TOKEN;
const TEST_TIMEOUT = 20_000; // per test
const READ_TIMEOUT = 10_000; // per stream message
const QUIET_MS = 300; // how long "nothing more arrives" is watched for

const run = `${process.pid}_${Date.now()}`;
let counter = 0;
const newAgent = () => `node_${run}_${++counter}`;

/** The next message of a subscription, failing after `ms`. */
async function nextMessage(subscription, ms = READ_TIMEOUT) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no stream message within ${ms} ms`)), ms);
  });
  try {
    const { value, done } = await Promise.race([subscription.next(), timeout]);
    assert.equal(done, false, 'the stream ended');
    return value;
  } finally {
    clearTimeout(timer);
  }
}

/** Resolves to a message that arrives within `ms`, or to undefined. The pending read
 * is left to the stream: only call this last, before cancelling it. */
async function messageWithin(subscription, ms) {
  let timer;
  const quiet = new Promise((resolve) => {
    timer = setTimeout(() => resolve(undefined), ms);
  });
  try {
    const result = await Promise.race([subscription.next(), quiet]);
    return result?.done ? undefined : result?.value;
  } finally {
    clearTimeout(timer);
  }
}

/** `promise` must reject with a CollabError of gRPC status `code`. */
async function rejectsWithCode(promise, code) {
  await assert.rejects(promise, (error) => {
    assert.ok(error instanceof Error, 'rejected with an Error');
    assert.ok(error instanceof CollabError);
    assert.equal(error.code, code, `code ${error.code} (${error.details})`);
    assert.equal(typeof error.details, 'string');
    assert.ok(error.details.length > 0);
    return true;
  });
}

const seqOf = (message) => BigInt(message.event.seq);

describe('collab Node client', { timeout: 120_000 }, () => {
  let hub;

  before(() => {
    assert.ok(TARGET, 'set COLLAB_GRPC_TARGET to a running collab-server (host:port)');
    assert.ok(TOKEN, 'set COLLAB_TOKEN to a read+write key of that server');
    hub = createClient({ target: TARGET, token: TOKEN, timeoutMs: 10_000 });
  });

  after(() => hub?.close());

  test('maps the guide names of the contract enums', () => {
    assert.equal(activityTypes.length, 12);
    assert.ok(activityTypes.includes('memory_write'));
    assert.ok(activityTypes.includes('collaboration_ended'));
    assert.deepEqual(eventKinds, [
      'activity_recorded',
      'activity_completed',
      'memory_updated',
      'collaboration_started',
      'collaboration_ended',
      'decision_recorded',
      'agent_retired',
      'activity_linked',
    ]);
  });

  test('records, completes and reads back an activity', { timeout: TEST_TIMEOUT }, async () => {
    const agentId = newAgent();
    const metadata = { item: 'notes.md', bytes: 42, ok: true, none: null, tags: ['a', 1], nested: { deep: [{}] } };
    const recorded = await hub.recordActivity({
      agentId,
      activityType: 'memory_write',
      department: 'engineering',
      metadata,
      relatedAgents: ['agent_2'],
    });
    assert.match(recorded.activity_id, /^act_/);
    assert.ok(recorded.activity_id.includes(agentId));
    const { activity } = recorded;
    assert.equal(activity.activity_id, recorded.activity_id);
    assert.equal(activity.agent_id, agentId);
    assert.equal(activity.department, 'engineering');
    assert.equal(activity.activity_type, 'ACTIVITY_TYPE_MEMORY_WRITE');
    assert.equal(activity.status, 'ACTIVITY_STATUS_ACTIVE');
    assert.deepEqual(activity.related_agents, ['agent_2']);
    assert.deepEqual(fromStruct(activity.metadata), metadata);
    assert.ok(Math.abs(timestampToDate(activity.timestamp).getTime() - Date.now()) < 60_000);
    assert.equal(activity.completed_at, null);

    const active = (await hub.getAgentStatus()).agent_status.agents.find((agent) => agent.agent_id === agentId);
    assert.equal(active.status, 'AGENT_STATE_ACTIVE');
    assert.equal(active.current_activity_id, recorded.activity_id);

    const completed = await hub.completeActivity({ activityId: recorded.activity_id, success: true });
    assert.equal(completed.activity_id, recorded.activity_id);
    assert.equal(completed.activity.status, 'ACTIVITY_STATUS_COMPLETED');
    assert.ok(timestampToDate(completed.activity.completed_at) instanceof Date);

    const status = (await hub.getAgentStatus()).agent_status;
    const agent = status.agents.find((a) => a.agent_id === agentId);
    assert.ok(agent, `${agentId} is in the agent status`);
    assert.equal(agent.status, 'AGENT_STATE_IDLE');
    assert.equal(agent.department, 'engineering');
    assert.equal(agent.last_activity_id, recorded.activity_id);
    assert.equal(agent.current_activity_id, '');
    assert.ok(status.total_agents >= 1);
  });

  test('a failed completion keeps its reason', { timeout: TEST_TIMEOUT }, async () => {
    const { activity_id } = await hub.recordActivity({ agentId: newAgent(), activityType: 'TASK_ASSIGNED' });
    const { activity } = await hub.completeActivity({ activityId: activity_id, success: false, failureReason: 'boom' });
    assert.equal(activity.activity_type, 'ACTIVITY_TYPE_TASK_ASSIGNED');
    assert.equal(activity.status, 'ACTIVITY_STATUS_FAILED');
    assert.equal(activity.failure_reason, 'boom');
  });

  test('a completion merges its metadata into the activity', { timeout: TEST_TIMEOUT }, async () => {
    const { activity_id } = await hub.recordActivity({
      agentId: newAgent(),
      activityType: 'message_sent',
      metadata: { model: 'requested', step: 1 },
    });
    const { activity } = await hub.completeActivity({
      activityId: activity_id,
      metadata: { model: 'answered', tokens: 1234 },
    });
    assert.equal(activity.status, 'ACTIVITY_STATUS_COMPLETED');
    assert.deepEqual(fromStruct(activity.metadata), { model: 'answered', step: 1, tokens: 1234 });
  });

  test('an idempotency key makes a retry return the first answer', { timeout: TEST_TIMEOUT }, async () => {
    const request = { agentId: newAgent(), activityType: 'message_sent', idempotencyKey: `key_${run}` };
    const first = await hub.recordActivity(request);
    const retried = await hub.recordActivity(request);
    assert.equal(retried.activity_id, first.activity_id);
    await rejectsWithCode(hub.recordActivity({ ...request, department: 'other' }), 9); // FAILED_PRECONDITION
    await hub.completeActivity({ activityId: first.activity_id, success: true });
  });

  describe('the event stream', () => {
    const agentId = newAgent();
    let snapshot;
    let recorded;
    let completed;
    let activityId;

    test('starts with a snapshot, then the events after it in seq order', { timeout: TEST_TIMEOUT }, async () => {
      const events = hub.events({ includeSnapshot: true, agentIds: [agentId] });
      try {
        const first = await nextMessage(events);
        assert.equal(first.message, 'snapshot');
        snapshot = first.snapshot;
        assert.ok(snapshot.epoch.length > 0);
        assert.match(snapshot.seq, /^\d+$/);
        assert.equal(typeof snapshot.agent_status.total_agents, 'number');

        ({ activity_id: activityId } = await hub.recordActivity({ agentId, activityType: 'memory_read' }));
        await hub.completeActivity({ activityId, success: true });

        recorded = await nextMessage(events);
        assert.equal(recorded.message, 'event');
        assert.equal(recorded.event.payload, 'activity_recorded');
        assert.equal(recorded.event.epoch, snapshot.epoch);
        assert.equal(recorded.event.activity_recorded.activity_id, activityId);
        assert.equal(recorded.event.activity_recorded.activity_type, 'ACTIVITY_TYPE_MEMORY_READ');
        // Unset oneof members are absent (undefined); unset plain message fields are null.
        assert.equal(recorded.event.activity_completed, undefined);
        assert.ok(seqOf(recorded) > BigInt(snapshot.seq), 'the first event follows the snapshot');

        completed = await nextMessage(events);
        assert.equal(completed.event.payload, 'activity_completed');
        assert.equal(completed.event.activity_completed.success, true);
        assert.equal(completed.event.activity_completed.activity.activity_id, activityId);
        assert.equal(completed.event.activity_completed.activity.status, 'ACTIVITY_STATUS_COMPLETED');
        assert.ok(seqOf(completed) > seqOf(recorded), 'seq increases');
      } finally {
        events.cancel();
      }
      assert.deepEqual(await events.next(), { done: true, value: undefined }, 'cancel ends the stream quietly');
    });

    test('resumes from an earlier seq with exactly the missed events', { timeout: TEST_TIMEOUT }, async () => {
      assert.ok(completed, 'needs the previous test');
      const events = hub.events({ since: snapshot.seq, epoch: snapshot.epoch, agentIds: [agentId] });
      try {
        const first = await nextMessage(events);
        assert.equal(first.message, 'resume');
        assert.equal(first.resume.recovered, true);
        assert.equal(first.resume.epoch, snapshot.epoch);
        assert.equal(first.resume.since_seq, snapshot.seq);
        assert.equal(first.resume.reason, '');
        assert.deepEqual((await nextMessage(events)).event, recorded.event);
        assert.deepEqual((await nextMessage(events)).event, completed.event);
        assert.equal(await messageWithin(events, QUIET_MS), undefined, 'nothing beyond the missed events');
      } finally {
        events.cancel();
      }
    });

    test('resume with a kinds filter replays only those kinds', { timeout: TEST_TIMEOUT }, async () => {
      assert.ok(completed, 'needs the previous tests');
      const events = hub.events({
        since: snapshot.seq,
        epoch: snapshot.epoch,
        agentIds: [agentId],
        kinds: ['activity_completed'],
      });
      try {
        assert.equal((await nextMessage(events)).resume.recovered, true);
        assert.deepEqual((await nextMessage(events)).event, completed.event);
        assert.equal(await messageWithin(events, QUIET_MS), undefined);
      } finally {
        events.cancel();
      }
    });

    test('resume from another epoch is refused, and a fresh snapshot follows', { timeout: TEST_TIMEOUT }, async () => {
      assert.ok(completed, 'needs the previous tests');
      const events = hub.events({ since: 0, epoch: `not-${snapshot.epoch}`, agentIds: [agentId] });
      try {
        const first = await nextMessage(events);
        assert.equal(first.message, 'resume');
        assert.equal(first.resume.recovered, false);
        assert.ok(first.resume.reason.length > 0);
        const second = await nextMessage(events);
        assert.equal(second.message, 'snapshot');
        assert.equal(second.snapshot.epoch, snapshot.epoch);
        assert.ok(BigInt(second.snapshot.seq) >= seqOf(completed));
      } finally {
        events.cancel();
      }
    });
  });

  test('an unknown activity is NOT_FOUND (5)', { timeout: TEST_TIMEOUT }, async () => {
    await rejectsWithCode(hub.completeActivity({ activityId: `act_0_${newAgent()}_missing`, success: true }), 5);
  });

  test('a bad token is UNAUTHENTICATED (16)', { timeout: TEST_TIMEOUT }, async () => {
    const intruder = createClient({ target: TARGET, token: `not-${TOKEN}`, timeoutMs: 10_000 });
    try {
      await rejectsWithCode(intruder.getAgentStatus(), 16);
      await rejectsWithCode(intruder.recordActivity({ agentId: newAgent(), activityType: 'memory_write' }), 16);
      const events = intruder.events({ includeSnapshot: true });
      await assert.rejects(nextMessage(events), (error) => error instanceof CollabError && error.code === 16);
    } finally {
      intruder.close();
    }
  });

  test('an unspecified activity type is INVALID_ARGUMENT (3)', { timeout: TEST_TIMEOUT }, async () => {
    await rejectsWithCode(hub.recordActivity({ agentId: newAgent(), department: 'engineering' }), 3);
    await rejectsWithCode(hub.recordActivity({ agentId: newAgent(), activityType: 'unspecified' }), 3);
  });

  test('an activity type outside the contract is refused before sending', { timeout: TEST_TIMEOUT }, async () => {
    await assert.rejects(hub.recordActivity({ agentId: newAgent(), activityType: 'memory_writ' }), TypeError);
    assert.throws(() => hub.events({ kinds: ['activity_recordd'] }), TypeError);
  });
});

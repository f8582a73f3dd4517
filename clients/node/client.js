// A small Node.js client of the collab hub, built at run time from the contract
// protos/collab/v1/collaboration.proto with @grpc/proto-loader: no generated code, and
// nothing from the Python side.
//
//   import { createClient } from './client.js';
//   const hub = createClient({ target: '127.0.0.1:50051', token });
//   const { activity_id } = await hub.recordActivity({ agentId: 'agent_1', activityType: 'memory_write' });
//
// Messages are returned as proto-loader decodes them: field names as in the proto
// (snake_case), enums as their names (`ACTIVITY_STATUS_ACTIVE`), 64-bit integers (`seq`,
// timestamp `seconds`) as decimal strings, unset message fields as null, and a `oneof`
// named by an extra property (`message.message === 'event'`, `event.payload ===
// 'activity_recorded'`). `fromStruct` and `timestampToDate` turn metadata and timestamps
// into plain JS values.

import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

export const PROTO_PATH = path.resolve(
  path.dirname(fileURLToPath(import.meta.url)),
  '../../protos/collab/v1/collaboration.proto',
);

// proto-loader bundles google/protobuf/{struct,timestamp,duration}.proto (through
// protobufjs), so the contract's imports resolve with no include directory of ours.
const packageDefinition = protoLoader.loadSync(PROTO_PATH, {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const collabV1 = grpc.loadPackageDefinition(packageDefinition).collab.v1;

/** Names of an enum of the contract, e.g. enumNames('ActivityType'). */
function enumNames(name) {
  return packageDefinition[`collab.v1.${name}`].type.value.map((value) => value.name);
}

const ACTIVITY_TYPES = enumNames('ActivityType');
const EVENT_KINDS = enumNames('EventKind');

/** gRPC status code number -> name (5 -> 'NOT_FOUND'). */
const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/** The guide's activity types, as accepted by `recordActivity` (`memory_write`, ...). */
export const activityTypes = ACTIVITY_TYPES.filter((name) => !name.endsWith('_UNSPECIFIED')).map((name) =>
  name.slice('ACTIVITY_TYPE_'.length).toLowerCase(),
);

/** The event kinds, as accepted by `events({kinds})` (`activity_recorded`, ...). */
export const eventKinds = EVENT_KINDS.filter((name) => !name.endsWith('_UNSPECIFIED')).map((name) =>
  name.slice('EVENT_KIND_'.length).toLowerCase(),
);

/** A failed call: `code` is the numeric gRPC status, `details` the server's message. */
export class CollabError extends Error {
  constructor(serviceError) {
    const codeName = STATUS_NAMES[serviceError.code] ?? String(serviceError.code);
    super(`${codeName}: ${serviceError.details}`, { cause: serviceError });
    this.name = 'CollabError';
    this.code = serviceError.code;
    this.codeName = codeName;
    this.details = serviceError.details;
    /** The call's trailing metadata (a grpc-js Metadata), e.g. `retry-after`. */
    this.metadata = serviceError.metadata;
  }

  /** Seconds to wait before retrying, from the `retry-after` trailer of RESOURCE_EXHAUSTED. */
  get retryAfter() {
    const [value] = this.metadata?.get('retry-after') ?? [];
    return value === undefined ? undefined : Number(value);
  }
}

function toCollabError(error) {
  return error instanceof CollabError || typeof error?.code !== 'number' ? error : new CollabError(error);
}

/**
 * A guide name (`memory_write`), or the enum name itself, to the enum name of `prefix`.
 * Missing or `unspecified` gives the UNSPECIFIED value, which the server rejects.
 */
function enumName(value, prefix, names, what) {
  if (value === undefined || value === null || value === '') return `${prefix}UNSPECIFIED`;
  if (typeof value !== 'string') throw new TypeError(`${what} must be a string, got ${typeof value}`);
  const name = value.startsWith(prefix) ? value : prefix + value.toUpperCase();
  if (!names.includes(name)) throw new TypeError(`unknown ${what} ${JSON.stringify(value)}`);
  return name;
}

// google.protobuf.Value's field names as loaded. protobufjs serves the well-known types
// from its own bundled (camelCase) definitions whatever `keepCase` says, so they are
// `stringValue`, not `string_value`; a snake_case name would be silently dropped (the
// value arriving as null). Read them from the descriptor rather than guess.
const VALUE_FIELDS = Object.fromEntries(
  packageDefinition['google.protobuf.Value'].type.field.map((field) => [
    field.name.replaceAll('_', '').toLowerCase(),
    field.name,
  ]),
);
const NULL_VALUE = VALUE_FIELDS.nullvalue;
const NUMBER_VALUE = VALUE_FIELDS.numbervalue;
const STRING_VALUE = VALUE_FIELDS.stringvalue;
const BOOL_VALUE = VALUE_FIELDS.boolvalue;
const STRUCT_VALUE = VALUE_FIELDS.structvalue;
const LIST_VALUE = VALUE_FIELDS.listvalue;

/** A JS value as a google.protobuf.Value (fields form, as proto-loader takes it). */
export function toValue(value) {
  if (value === null || value === undefined) return { [NULL_VALUE]: 'NULL_VALUE' };
  switch (typeof value) {
    case 'string':
      return { [STRING_VALUE]: value };
    case 'boolean':
      return { [BOOL_VALUE]: value };
    case 'number':
      if (!Number.isFinite(value)) throw new TypeError(`metadata numbers must be finite, got ${value}`);
      return { [NUMBER_VALUE]: value };
    case 'bigint':
      return { [NUMBER_VALUE]: Number(value) };
    case 'object':
      if (Array.isArray(value)) return { [LIST_VALUE]: { values: value.map(toValue) } };
      if (value instanceof Date) return { [STRING_VALUE]: value.toISOString() };
      return { [STRUCT_VALUE]: toStruct(value) };
    default:
      throw new TypeError(`metadata cannot hold a ${typeof value}`);
  }
}

/** A plain JS object as a google.protobuf.Struct: `{fields: {key: Value}}`. */
export function toStruct(object) {
  if (object === null || typeof object !== 'object' || Array.isArray(object)) {
    throw new TypeError('metadata must be a plain object');
  }
  return { fields: Object.fromEntries(Object.entries(object).map(([key, value]) => [key, toValue(value)])) };
}

/** A decoded google.protobuf.Value back to a JS value. */
export function fromValue(value) {
  switch (value?.kind) {
    case undefined:
    case null:
    case NULL_VALUE:
      return null;
    case NUMBER_VALUE:
    case STRING_VALUE:
    case BOOL_VALUE:
      return value[value.kind];
    case STRUCT_VALUE:
      return fromStruct(value[STRUCT_VALUE]);
    case LIST_VALUE:
      return (value[LIST_VALUE]?.values ?? []).map(fromValue);
    default:
      throw new TypeError(`unknown google.protobuf.Value kind ${value.kind}`);
  }
}

/** A decoded google.protobuf.Struct (or null) back to a plain JS object. */
export function fromStruct(struct) {
  return Object.fromEntries(Object.entries(struct?.fields ?? {}).map(([key, value]) => [key, fromValue(value)]));
}

/** A decoded google.protobuf.Timestamp (`{seconds: '…', nanos}`) as a Date; null if unset. */
export function timestampToDate(timestamp) {
  if (!timestamp) return null;
  return new Date(Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1e6));
}

/**
 * A server stream as an async iterator (`for await`, or `next()`), with `cancel()`.
 * Cancelling (or leaving a `for await` loop) ends it quietly; any other failure is
 * thrown from `next()` as a CollabError.
 */
class Subscription {
  constructor(call) {
    this.call = call;
    this.cancelled = false;
    this._iterator = call[Symbol.asyncIterator]();
  }

  async next() {
    try {
      return await this._iterator.next();
    } catch (error) {
      if (this.cancelled && error?.code === grpc.status.CANCELLED) return { done: true, value: undefined };
      throw toCollabError(error);
    }
  }

  async return() {
    this.cancel();
    return { done: true, value: undefined };
  }

  cancel() {
    if (this.cancelled) return;
    this.cancelled = true;
    this.call.cancel();
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}

/**
 * A client of the hub at `target` (`host:port`). `token` is sent on every call as
 * `authorization: Bearer <token>`; omit it for a server with auth off. `credentials`
 * defaults to plaintext (the hub's default); `timeoutMs` bounds each unary call.
 */
export function createClient({ target, token, credentials, timeoutMs = 30_000, channelOptions = {} } = {}) {
  if (!target) throw new TypeError('createClient needs a target, e.g. 127.0.0.1:50051');
  const stub = new collabV1.CollaborationService(
    target,
    credentials ?? grpc.credentials.createInsecure(),
    channelOptions,
  );

  function metadata() {
    const md = new grpc.Metadata();
    if (token) md.set('authorization', `Bearer ${token}`);
    return md;
  }

  function unary(method, request) {
    return new Promise((resolve, reject) => {
      const options = timeoutMs ? { deadline: new Date(Date.now() + timeoutMs) } : {};
      stub[method](request, metadata(), options, (error, response) => {
        if (error) reject(toCollabError(error));
        else resolve(response);
      });
    });
  }

  return {
    /** The underlying grpc-js stub, for the RPCs this wrapper does not cover. */
    stub,

    /** RecordActivity; resolves to `{activity_id, activity}`. */
    async recordActivity({
      agentId,
      activityType,
      department = '',
      metadata: meta,
      relatedAgents = [],
      sessionId = '',
      parentActivityId = '',
      idempotencyKey = '',
    } = {}) {
      return unary('RecordActivity', {
        agent_id: agentId ?? '',
        department,
        activity_type: enumName(activityType, 'ACTIVITY_TYPE_', ACTIVITY_TYPES, 'activity type'),
        metadata: meta === undefined || meta === null ? null : toStruct(meta),
        related_agents: relatedAgents,
        session_id: sessionId,
        parent_activity_id: parentActivityId,
        idempotency_key: idempotencyKey,
      });
    },

    /**
     * CompleteActivity; resolves to `{activity_id, activity}`. `metadata`: keys merged
     * into the activity's metadata (token usage, the response model...).
     */
    async completeActivity({
      activityId,
      success = true,
      failureReason = '',
      metadata: meta,
      idempotencyKey = '',
    } = {}) {
      return unary('CompleteActivity', {
        activity_id: activityId ?? '',
        success,
        failure_reason: failureReason,
        metadata: meta === undefined || meta === null ? null : toStruct(meta),
        idempotency_key: idempotencyKey,
      });
    },

    /** GetAgentStatus; resolves to `{agent_status: {total_agents, …, agents: [...]}}`. */
    async getAgentStatus() {
      return unary('GetAgentStatus', {});
    },

    /**
     * SubscribeEvents as an async iterator of SubscribeEventsResponse messages (each
     * `{message: 'event'|'snapshot'|'resume', event, snapshot, resume}`), with `cancel()`.
     * `since` (a seq, with its `epoch`) resumes; `includeSnapshot` starts with a snapshot;
     * `kinds` (`activity_recorded`, ...), `activityTypes` and `agentIds` filter.
     */
    events({ since, epoch = '', includeSnapshot = false, kinds = [], activityTypes = [], agentIds = [] } = {}) {
      const request = {
        kinds: kinds.map((kind) => enumName(kind, 'EVENT_KIND_', EVENT_KINDS, 'event kind')),
        activity_types: activityTypes.map((type) => enumName(type, 'ACTIVITY_TYPE_', ACTIVITY_TYPES, 'activity type')),
        agent_ids: agentIds,
        epoch,
        include_snapshot: includeSnapshot,
      };
      // `since_seq` is `optional`: set only when resuming, as a decimal string (uint64).
      if (since !== undefined && since !== null) request.since_seq = String(since);
      return new Subscription(stub.SubscribeEvents(request, metadata()));
    },

    /** Closes the channel; calls still running fail with CANCELLED. */
    close() {
      stub.close();
    },
  };
}

#!/usr/bin/env node
// A Node.js caller of the TaskRunner service, built from nothing but the public .proto.
//
//   node client.js TARGET CALLS_JSON
//
// TARGET is "host:port". CALLS_JSON is a JSON list of calls, made one after another:
//   [{"method": "Perform", "request": {"task": "echo", "timeout_ms": 1000, "options": {"a": 1}}},
//    {"method": "ListTasks", "request": {}}]
// `options` and `result` are written as plain JSON objects here; this file converts them to and
// from google.protobuf.Struct. For each call it prints one JSON line to stdout:
//   {"ok": true, "response": {...}}                         the RPC succeeded (fields in proto names)
//   {"ok": false, "code": 5, "details": "..."}              the RPC ended with a gRPC status
// A server-streaming method (PerformStream, Watch) answers {"ok": true, "events": [...]}: every
// PerformEvent in the order it came (its `event` names the one set; a response's result as JSON).
// Exit code: 0 once every call has been answered either way, 2 on bad usage.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const CALL_DEADLINE_MS = 30000;

// google/protobuf/struct.proto is not under PROTOS: proto-loader resolves it from the
// well-known types bundled with protobufjs.
const definition = protoLoader.loadSync('task_runner/v1/task_runner.proto', {
  includeDirs: [PROTOS],
  keepCase: true, // field names as in the .proto: timeout_ms, request_id, ...
  longs: Number, // uint64 fields (max_rss_kib, dropped_bytes) fit a double here
  enums: String, // TaskError.Kind by name: "EXCEPTION", "TIMEOUT", ...
  bytes: String, // Output.tail as base64, as in the proto3 JSON mapping
  defaults: true,
  oneofs: true,
});
const TaskRunner = grpc.loadPackageDefinition(definition).task_runner.v1.TaskRunner;

// protobufjs bundles google/protobuf/struct.proto as a JSON descriptor whose field names are
// camelCase already (`keepCase` applies only to the .proto files it parses), so a Value is
// {numberValue: 1}, {structValue: {fields: {...}}}, ... and its oneof `kind` names the one set.
const VALUE_FIELDS = definition['google.protobuf.Value'].type.field.map((f) => f.name);
if (!VALUE_FIELDS.includes('numberValue')) throw new Error(`unexpected Value fields: ${VALUE_FIELDS}`);

function toValue(value) {
  if (value === null) return { nullValue: 'NULL_VALUE' };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  switch (typeof value) {
    case 'number': return { numberValue: value };
    case 'string': return { stringValue: value };
    case 'boolean': return { boolValue: value };
    case 'object': return { structValue: toStruct(value) };
    default: throw new TypeError(`not JSON: ${typeof value}`);
  }
}

function toStruct(object) {
  const fields = {};
  for (const [key, value] of Object.entries(object)) fields[key] = toValue(value);
  return { fields };
}

function fromValue(value) {
  switch (value.kind) {
    case 'nullValue': return null;
    case 'numberValue': return value.numberValue;
    case 'stringValue': return value.stringValue;
    case 'boolValue': return value.boolValue;
    case 'structValue': return fromStruct(value.structValue);
    case 'listValue': return (value.listValue.values || []).map(fromValue);
    default: throw new TypeError(`unknown google.protobuf.Value kind: ${value.kind}`);
  }
}

function fromStruct(struct) {
  const object = {};
  for (const [key, value] of Object.entries((struct && struct.fields) || {})) object[key] = fromValue(value);
  return object;
}

function plainEvent(event) {
  if (event.event === 'response') return { ...event, response: { ...event.response, result: fromStruct(event.response.result) } };
  if (event.event === 'progress') return { ...event, progress: { ...event.progress, details: fromStruct(event.progress.details) } };
  return event;
}

function stream(client, method, request) {
  const deadline = new Date(Date.now() + CALL_DEADLINE_MS);
  return new Promise((resolve) => {
    const events = [];
    const call = client[method](request, { deadline });
    call.on('data', (event) => events.push(plainEvent(event)));
    call.on('error', (err) => resolve({ ok: false, code: err.code, details: err.details, events }));
    call.on('end', () => resolve({ ok: true, events }));
  });
}

function call(client, method, request) {
  if ((method === 'Perform' || method === 'PerformStream') && request.options !== undefined) {
    request = { ...request, options: toStruct(request.options) };
  }
  if (TaskRunner.service[method].responseStream) return stream(client, method, request);
  const deadline = new Date(Date.now() + CALL_DEADLINE_MS);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (err, response) => {
      try {
        if (err) {
          resolve({ ok: false, code: err.code, details: err.details });
        } else {
          resolve({ ok: true, response: method === 'Perform' ? { ...response, result: fromStruct(response.result) } : response });
        }
      } catch (e) {
        reject(e);
      }
    });
  });
}

async function main(argv) {
  if (argv.length !== 2) {
    process.stderr.write('usage: node client.js TARGET CALLS_JSON\n');
    return 2;
  }
  const [target, callsJson] = argv;
  const calls = JSON.parse(callsJson);
  const client = new TaskRunner(target, grpc.credentials.createInsecure());
  try {
    for (const { method, request } of calls) {
      if (!Object.hasOwn(TaskRunner.service, method)) throw new Error(`no such method: ${method}`);
      const answer = await call(client, method, request || {});
      process.stdout.write(`${JSON.stringify(answer)}\n`);
    }
  } finally {
    client.close();
  }
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err) => { process.stderr.write(`${err.stack || err}\n`); process.exitCode = 2; },
);

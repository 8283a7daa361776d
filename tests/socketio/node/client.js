// A real socket.io-client for the broker's Socket.IO tests (PROTOCOL.md §4).
//
//   node client.js URL '{"channels":["bill:1"],"token":"...","transports":["polling","websocket"],
//                        "count":10,"timeout":10000,"recover":true,"reconnection":true}'
//
// Connects to URL (path /socket.io/), subscribes to each channel with an ack
// on every connect (after a reconnect too; with "recover": true, from the
// last epoch and offset it saw), and prints ONE JSON LINE PER EVENT on stdout:
//
//   {"event":"connect","sid":..,"transport":"polling"|"websocket"}
//   {"event":"upgrade","transport":"websocket"}
//   {"event":"connect_error","message":..,"data":..}
//   {"event":"ack","for":"subscribe","request":{..},"data":{..}}   (or "ack_timeout")
//   {"event":"pub","data":{"channel":..,"offset":..,"data":..}}
//   {"event":"unsubscribed","data":{..}}   {"event":"reconnect","data":{..}}
//   {"event":"disconnect","reason":..}     {"event":"reconnect_attempt","attempt":N}
//   {"event":"done","pubs":N}  or  {"event":"timeout","pubs":N}
//
// It exits 0 after "count" pub events (0: never), 1 on "timeout" ms, and on
// a {"close":true} line on stdin. Each other stdin line is a command to emit
// with an ack: {"emit":"unsubscribe","data":{"channel":"bill:1"}}.
"use strict";

const readline = require("readline");
const { io } = require("socket.io-client");

const url = process.argv[2];
const options = JSON.parse(process.argv[3] || "{}");
if (!url) {
  process.stderr.write("usage: node client.js URL [OPTIONS_JSON]\n");
  process.exit(2);
}

const count = options.count || 0;
const ackTimeout = options.ack_timeout || 5000;
let pubs = 0;
let finished = false;
const positions = new Map(); // channel -> {epoch, offset}: for "recover"

function out(line) {
  process.stdout.write(JSON.stringify(line) + "\n");
}

function finish(code, line) {
  if (finished) return;
  finished = true;
  out(line);
  socket.close();
  // let stdout drain before leaving
  process.stdout.write("", () => process.exit(code));
}

const socket = io(url, {
  path: options.path || "/socket.io/",
  transports: options.transports || ["polling", "websocket"],
  auth: options.token ? { token: options.token } : {},
  reconnection: options.reconnection !== false,
  reconnectionDelay: options.reconnection_delay || 200,
  reconnectionDelayMax: options.reconnection_delay_max || 1000,
  timeout: options.connect_timeout || 5000,
});

function emitWithAck(event, data) {
  socket.timeout(ackTimeout).emit(event, data, (err, reply) => {
    if (err) {
      out({ event: "ack_timeout", for: event, request: data });
      return;
    }
    out({ event: "ack", for: event, request: data, data: reply });
    if (event === "subscribe" && reply && reply.ok) {
      const known = positions.get(data.channel);
      if (!known || known.epoch !== reply.epoch || known.offset < reply.offset) {
        positions.set(data.channel, { epoch: reply.epoch, offset: reply.offset });
      }
    }
  });
}

function subscribeAll() {
  for (const entry of options.channels || []) {
    const request = typeof entry === "string" ? { channel: entry } : { ...entry };
    const known = positions.get(request.channel);
    if (options.recover && known && !request.recover) {
      request.recover = { epoch: known.epoch, offset: known.offset };
    }
    emitWithAck("subscribe", request);
  }
}

// The transport an Engine.IO connection opened on, and its upgrade, are
// taken when the engine opens: under load the upgrade can finish before the
// namespace's connect arrives, and a listener added at connect would miss it.
let openedOn = null;
socket.io.on("open", () => {
  openedOn = socket.io.engine.transport.name;
  socket.io.engine.once("upgrade", (t) => out({ event: "upgrade", transport: t.name }));
});

socket.on("connect", () => {
  out({ event: "connect", sid: socket.id, transport: openedOn || socket.io.engine.transport.name });
  subscribeAll();
});

socket.on("connect_error", (err) => {
  out({ event: "connect_error", message: err.message, data: err.data === undefined ? null : err.data });
  if (options.exit_on_connect_error) finish(1, { event: "done", pubs });
});

socket.on("pub", (pub) => {
  pubs += 1;
  if (pub && typeof pub.channel === "string") {
    const known = positions.get(pub.channel);
    if (known) known.offset = pub.offset;
  }
  out({ event: "pub", data: pub });
  if (count && pubs >= count) finish(0, { event: "done", pubs });
});

socket.on("unsubscribed", (data) => out({ event: "unsubscribed", data }));
socket.on("reconnect", (data) => out({ event: "reconnect", data }));
socket.on("disconnect", (reason) => out({ event: "disconnect", reason }));
socket.io.on("reconnect_attempt", (attempt) => out({ event: "reconnect_attempt", attempt }));

if (options.timeout) {
  setTimeout(() => finish(1, { event: "timeout", pubs }), options.timeout).unref();
}

const input = readline.createInterface({ input: process.stdin });
input.on("line", (line) => {
  if (!line.trim()) return;
  let command;
  try {
    command = JSON.parse(line);
  } catch (e) {
    out({ event: "error", message: "bad command line: " + e.message });
    return;
  }
  if (command.close) finish(0, { event: "done", pubs });
  else if (command.emit) emitWithAck(command.emit, command.data);
});
input.on("close", () => {
  if (!options.timeout && !count) finish(0, { event: "done", pubs });
});

// Baseline: the reference Socket.IO server (Node, socket.io ^4), rooms as channels.
//
//   node benchmarks/baselines/socketio_server.js --host 127.0.0.1 --port 8803 --http-port 8804
//
// Speaks just enough of PROTOCOL.md §4 for `broker bench` to load it like the
// broker's Socket.IO endpoint:
//   * clients connect at http://HOST:PORT/socket.io/ (polling and websocket,
//     socket.io's defaults); any auth is accepted;
//   * emit("subscribe", {"channel": C}, ack) joins room C and acks
//     {"ok":true,"epoch":"baseline","offset":<the channel's last offset>};
//     emit("unsubscribe", {"channel": C}, ack) leaves it, ack {"ok":true};
//   * POST /api/publish {"channel":C,"data":D} on the HTTP side port gives
//     the next offset of C and broadcasts the event "pub"
//     {"channel":C,"offset":N,"data":D} to room C (socket.io encodes a
//     broadcast once: that is the library's fan-out under test), answering
//     200 {"channel":C,"epoch":"baseline","offset":N};
//   * GET /readyz and /healthz answer 200 on the side port.
// No auth, no history, no recovery. SIGTERM/SIGINT: close and exit 0.
"use strict";

const http = require("http");
const { Server } = require("socket.io");

function parseArgs(argv) {
  const args = { host: "127.0.0.1", port: 8803, "http-port": 8804 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "");
    if (!(key in args) || argv[i + 1] === undefined) {
      process.stderr.write(`usage: socketio_server.js [--host H] [--port P] [--http-port Q] (bad: ${argv[i]})\n`);
      process.exit(2);
    }
    args[key] = key === "host" ? argv[i + 1] : Number(argv[i + 1]);
  }
  return args;
}

const args = parseArgs(process.argv.slice(2));
const offsets = new Map();

const ioServer = http.createServer();
const io = new Server(ioServer, { serveClient: false, cors: { origin: "*" } });

io.on("connection", (socket) => {
  socket.on("subscribe", (msg, ack) => {
    if (typeof ack !== "function") return;
    const channel = msg && msg.channel;
    if (typeof channel !== "string" || !channel) {
      ack({ ok: false, code: 400, message: "channel must be a non-empty string" });
      return;
    }
    if (socket.rooms.has(channel)) {
      ack({ ok: false, code: 409, message: "already subscribed" });
      return;
    }
    socket.join(channel);
    ack({ ok: true, epoch: "baseline", offset: offsets.get(channel) || 0 });
  });
  socket.on("unsubscribe", (msg, ack) => {
    if (msg && typeof msg.channel === "string") socket.leave(msg.channel);
    if (typeof ack === "function") ack({ ok: true });
  });
});

function respond(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(data) });
  res.end(data);
}

const api = http.createServer((req, res) => {
  const path = req.url.split("?", 1)[0];
  if (req.method === "GET" && (path === "/readyz" || path === "/healthz")) {
    respond(res, 200, { ready: true });
    return;
  }
  if (req.method !== "POST" || path !== "/api/publish") {
    respond(res, 404, { error: "not found" });
    return;
  }
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    let msg;
    try {
      msg = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch (e) {
      respond(res, 400, { error: "invalid JSON" });
      return;
    }
    if (!msg || typeof msg.channel !== "string" || !msg.channel || !("data" in msg)) {
      respond(res, 400, { error: "bad publish body" });
      return;
    }
    const offset = (offsets.get(msg.channel) || 0) + 1;
    offsets.set(msg.channel, offset);
    io.to(msg.channel).emit("pub", { channel: msg.channel, offset, data: msg.data });
    respond(res, 200, { channel: msg.channel, epoch: "baseline", offset });
  });
});
api.keepAliveTimeout = 60000;

let listening = 0;
function ready() {
  listening += 1;
  if (listening === 2) {
    process.stdout.write(
      `socket.io baseline on http://${args.host}:${args.port}/socket.io/, http://${args.host}:${args["http-port"]}\n`);
  }
}
ioServer.listen({ host: args.host, port: args.port, backlog: 4096 }, ready);
api.listen({ host: args.host, port: args["http-port"], backlog: 4096 }, ready);

function stop() {
  io.close();
  api.close();
  setTimeout(() => process.exit(0), 200).unref();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

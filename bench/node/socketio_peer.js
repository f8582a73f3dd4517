// socket.io on Node.js broadcasting the same JSON message as the other peers (bench/peers.py)
// to every connected client: GET /go?count=N (back to back), GET /pace?rate=R&count=N
// (each message carrying the time it was sent). Prints "ready" once listening.
// Run: node socketio_peer.js PORT MESSAGE_FILE
"use strict";
const fs = require("fs");
const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.argv[2]);
const message = fs.readFileSync(process.argv[3], "utf8");
// The time it is due by the pacing schedule (as bench/peers.py): a sender that falls behind shows it.
const stamped = (due) => `{"sent":${due / 1000},${message.slice(1)}`;

const server = http.createServer((request, response) => {
  const url = new URL(request.url, "http://localhost");
  const count = Number(url.searchParams.get("count"));
  if (url.pathname === "/go") {
    let sent = 0;
    // In slices, so the writes go out between them (as bench/peers.py's raw peer does).
    const slice = () => {
      for (let n = 0; n < 50 && sent < count; n++, sent++) io.emit("message", message);
      if (sent < count) setImmediate(slice);
    };
    setImmediate(slice);
  } else if (url.pathname === "/pace") {
    const rate = Number(url.searchParams.get("rate"));
    const start = performance.now();
    const wall = Date.now();
    let sent = 0;
    const tick = () => {
      io.emit("message", stamped(wall + (sent * 1000) / rate));
      sent++;
      if (sent < count) setTimeout(tick, Math.max(0, start + (sent * 1000) / rate - performance.now()));
    };
    tick();
  } else {
    response.writeHead(404).end();
    return;
  }
  response.writeHead(200, { "Content-Length": "2" }).end("ok");
});
const io = new Server(server, { transports: ["websocket"], serveClient: false });
server.listen(port, "127.0.0.1", () => console.log("ready"));

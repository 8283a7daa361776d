// A WHATWG WebSocket client (Node's, the browsers' API and offer:
// "permessage-deflate; client_max_window_bits"): connects to argv[2],
// prints its negotiated extensions and then every message as one JSON line,
// and closes after argv[3] messages.
const [url, count] = [process.argv[2], Number(process.argv[3])];
const ws = new WebSocket(url);
let received = 0;
ws.onopen = () => console.log(JSON.stringify({ extensions: ws.extensions }));
ws.onmessage = (event) => {
  console.log(JSON.stringify({ message: event.data }));
  if (++received === count) ws.close(1000);
};
ws.onerror = (event) => console.log(JSON.stringify({ error: String(event.message || event) }));
ws.onclose = (event) => console.log(JSON.stringify({ close: event.code }));

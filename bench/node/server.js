// The Node `ws` peer of `cargo xtask bench`: the streambridge.v1.json envelope
// (docs/websocket-protocol.md) written the way a Node developer would, with the
// `ws` package's defaults (it sets TCP_NODELAY itself). One call per socket:
// {"request":{"data":...}} gets {"response":{"result":"processed: ..."}},
// {"closeSend":{}} gets {"status":{"code":0}} and a close with 1000.
'use strict';

const { WebSocketServer } = require('ws');

const listen = process.argv[2] || '127.0.0.1:8080';
const at = listen.lastIndexOf(':');
const host = listen.slice(0, at);
const port = Number(listen.slice(at + 1));

const server = new WebSocketServer({
  host,
  port,
  path: '/ws',
  handleProtocols: (protocols) => (protocols.has('streambridge.v1.json') ? 'streambridge.v1.json' : false),
});

server.on('connection', (socket) => {
  socket.on('message', (data, isBinary) => {
    let frame;
    try {
      frame = JSON.parse(isBinary ? data.toString() : data);
    } catch (e) {
      socket.send(JSON.stringify({ status: { code: 3, message: 'invalid JSON' } }));
      socket.close(1007);
      return;
    }
    if (frame.request) {
      socket.send(JSON.stringify({ response: { result: 'processed: ' + (frame.request.data || '') } }));
    } else if (frame.closeSend) {
      socket.send(JSON.stringify({ status: { code: 0 } }));
      socket.close(1000);
    }
  });
  socket.on('error', () => {});
});

server.on('listening', () => {
  const address = server.address();
  console.log(`node ws listening on ${address.address}:${address.port}`);
});

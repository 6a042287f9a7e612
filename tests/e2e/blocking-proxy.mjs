// A small HTTP proxy like the ones that make the HTTP fallback necessary:
// it forwards every request to `target` as it streams (request and response
// bodies both ways, so a long event stream passes), and answers every
// WebSocket upgrade with 403.
import http from 'node:http';
import { once } from 'node:events';

/** Starts the proxy on an ephemeral port; resolves to `{ address, close, refused }`. */
export async function startBlockingProxy(target) {
  const [targetHost, targetPort] = target.split(':');
  const agent = new http.Agent({ keepAlive: true });
  const stats = { refused: 0, forwarded: 0 };
  const server = http.createServer((request, response) => {
    stats.forwarded += 1;
    const upstream = http.request(
      {
        host: targetHost,
        port: Number(targetPort),
        method: request.method,
        path: request.url,
        headers: request.headers,
        agent,
      },
      (answer) => {
        response.writeHead(answer.statusCode, answer.headers);
        response.flushHeaders();
        answer.pipe(response);
        // The server went away mid-answer: so does the answer (as nginx does).
        answer.on('error', () => response.destroy());
        answer.on('aborted', () => response.destroy());
      },
    );
    upstream.on('error', () => {
      if (!response.headersSent) {
        response.writeHead(502, { 'content-type': 'text/plain' });
        response.end('the proxy could not reach the server\n');
      } else {
        response.destroy();
      }
    });
    // The client went away: so does the request to the server.
    response.on('close', () => upstream.destroy());
    request.pipe(upstream);
  });
  server.on('upgrade', (request, socket) => {
    stats.refused += 1;
    const body = 'WebSockets are blocked by this proxy\n';
    socket.end(
      `HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n${body}`,
    );
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    address: `127.0.0.1:${server.address().port}`,
    stats,
    close: () => {
      server.closeAllConnections();
      server.close();
      agent.destroy();
    },
  };
}

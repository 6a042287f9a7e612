// A certificate for WebTransport's `serverCertificateHashes`, made with
// openssl as browsers require it there: ECDSA P-256, valid under 14 days
// (10), with BasicConstraints, KeyUsage and ExtKeyUsage (Chrome refuses some
// certificates without them).
import { execFileSync } from 'node:child_process';
import { X509Certificate, createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';

/** Writes `cert.pem` and `key.pem` in `dir`; returns their paths and the certificate's SHA-256 (bytes). */
export function makeCertificate(dir) {
  const [cert, key] = [path.join(dir, 'cert.pem'), path.join(dir, 'key.pem')];
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '10', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    '-addext', 'basicConstraints=critical,CA:FALSE',
    '-addext', 'keyUsage=critical,digitalSignature',
    '-addext', 'extendedKeyUsage=serverAuth',
  ], { stdio: 'ignore' });
  const der = new X509Certificate(readFileSync(cert)).raw;
  return { cert, key, hash: [...createHash('sha256').update(der).digest()] };
}

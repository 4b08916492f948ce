// Test-only OpenID Connect provider (npm oidc-provider) on loopback. Never use outside tests.
//
//   node server.mjs --jwks FILE --clients JSON [--port N]
//   (or env IDP_JWKS, IDP_CLIENTS, IDP_PORT; port 0 = pick a free one)
//
// FILE holds {"keys": [private JWKs]}; the first key signs. JSON is an array of client metadata objects
// (client_id, client_secret, redirect_uris, token_endpoint_auth_method, ...), passed through as-is.
// stdout carries exactly one line, "ready <issuer>", once listening; logs go to stderr.
//
// Accounts: any login is accepted (password ignored); claims derive from the login, see claimsFor().
// Key rotation: POST /__test/rotate (or SIGHUP) re-reads FILE and swaps in a new Provider on the same
// listening socket. Sessions, grants and codes live in the module-level memory adapter and survive.
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

console.info = console.error; // oidc-provider prints notices with console.info; keep stdout for "ready"

const { values: args } = parseArgs({
  options: { port: { type: 'string' }, jwks: { type: 'string' }, clients: { type: 'string' } },
});
const port = Number(args.port ?? process.env.IDP_PORT ?? 0);
const jwksPath = args.jwks ?? process.env.IDP_JWKS;
const clients = JSON.parse(args.clients ?? process.env.IDP_CLIENTS ?? '[]');
if (!jwksPath || !clients.length) {
  console.error('usage: server.mjs --jwks FILE --clients JSON [--port N]');
  process.exit(2);
}
const cookieKeys = [randomBytes(32).toString('hex')]; // same for every Provider of this process

// Group rule, on the local part of the login (before any '@'):
//   "name+g1+g2" -> [g1, g2]; starts with "admin" -> ["admins"]; starts with "guest" -> []; else ["dev"].
function claimsFor(login) {
  const [local] = login.split('@');
  const [base, ...explicit] = local.split('+');
  let groups = ['dev'];
  if (explicit.length) groups = explicit;
  else if (base.startsWith('admin')) groups = ['admins'];
  else if (base.startsWith('guest')) groups = [];
  return {
    sub: login,
    email: login.includes('@') ? login : `${login}@example.com`,
    email_verified: true,
    name: base,
    preferred_username: base,
    groups,
  };
}

// oidc-provider 9 accepts client_secret_basic and client_secret_post interchangeably; tests want the
// registered token_endpoint_auth_method enforced at /token, so a relying party using the other is refused.
async function strictClientAuth(ctx, next) {
  if (ctx.method === 'POST' && ctx.path === '/token') {
    const chunks = [];
    for await (const chunk of ctx.req) chunks.push(chunk);
    const raw = Buffer.concat(chunks).toString('utf8');
    ctx.request.body = raw; // oidc-provider parses an already-read body from here
    const form = new URLSearchParams(raw);
    const basic = /^basic\s+(\S+)$/i.exec(ctx.get('authorization'));
    let clientId = form.get('client_id');
    let used;
    if (basic) {
      const decoded = Buffer.from(basic[1], 'base64').toString('utf8');
      clientId = decodeURIComponent(decoded.slice(0, decoded.indexOf(':')).replaceAll('+', ' '));
      used = 'client_secret_basic';
    } else if (form.has('client_secret')) {
      used = 'client_secret_post';
    }
    const client = clients.find((c) => c.client_id === clientId);
    const registered = client?.token_endpoint_auth_method ?? 'client_secret_basic';
    if (client && used && used !== registered) {
      ctx.status = 401;
      ctx.body = { error: 'invalid_client', error_description: `client must use ${registered}` };
      return;
    }
  }
  await next();
}

function makeProvider(issuer) {
  const jwks = JSON.parse(readFileSync(jwksPath, 'utf8'));
  const provider = new Provider(issuer, {
    clients,
    jwks,
    cookies: { keys: cookieKeys },
    features: { devInteractions: { enabled: true } },
    pkce: { required: () => true }, // S256 is the only method oidc-provider 9 supports
    scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
      groups: ['groups'],
    },
    ttl: {
      AccessToken: 3600, AuthorizationCode: 60, IdToken: 3600, RefreshToken: 86400,
      Interaction: 3600, Session: 86400, Grant: 86400,
    },
    conformIdTokenClaims: false, // put scope-granted claims (email, groups) into the id_token
    async findAccount(_ctx, sub) {
      return { accountId: sub, claims: async () => claimsFor(sub) };
    },
  });
  provider.use(strictClientAuth);
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  provider.on('end_session.error', (_ctx, err) => console.error('end_session.error', err, err.cause));
  return { provider, handler: provider.callback(), kids: jwks.keys.map((k) => k.kid) };
}

let current;
function rotate(why) {
  current = makeProvider(current.provider.issuer);
  console.error(`rotated (${why}), kids: ${current.kids.join(' ')}`);
  return current.kids;
}

const server = createServer((req, res) => {
  if (req.url === '/__test/rotate' && req.method === 'POST') {
    try {
      const kids = rotate('POST');
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ kids }));
    } catch (err) {
      console.error('rotate failed', err);
      res.writeHead(500, { 'content-type': 'text/plain' });
      res.end(String(err));
    }
    return;
  }
  current.handler(req, res);
});

server.listen(port, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  current = makeProvider(issuer);
  process.stdout.write(`ready ${issuer}\n`);
});

process.on('SIGHUP', () => {
  try {
    rotate('SIGHUP');
  } catch (err) {
    console.error('rotate failed', err);
  }
});
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}

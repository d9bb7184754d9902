// A real OpenID Connect provider (npm `oidc-provider`) for the federation tests.
//
// It issues client-credentials access tokens as RS256 JWTs whose `aud` is the requested resource
// indicator (or IDP_DEFAULT_RESOURCE), with a `roles` claim per client. Everything comes from the
// environment, so tests/support/oidc.py can restart it on the same port with a rotated key:
//   IDP_PORT              port to listen on (127.0.0.1 only)
//   IDP_JWKS              {"keys": [<private JWK>, ...]}: the signing keys; the first RS256 key signs
//   IDP_CLIENTS           [{"client_id", "client_secret", "roles"}, ...]: `roles` may be a list or a string
//   IDP_DEFAULT_RESOURCE  the audience of tokens requested without a `resource` parameter
import http from 'node:http';
import crypto from 'node:crypto';

import Provider from 'oidc-provider';

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`oidc test IdP: ${name} is not set`);
    process.exit(2);
  }
  return value;
}

const port = Number(required('IDP_PORT'));
const jwks = JSON.parse(required('IDP_JWKS'));
const clients = JSON.parse(required('IDP_CLIENTS'));
const defaultResourceIndicator = required('IDP_DEFAULT_RESOURCE');
const issuer = `http://127.0.0.1:${port}`;

const rolesByClient = new Map(clients.map((c) => [c.client_id, c.roles]));

const provider = new Provider(issuer, {
  jwks,
  clients: clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
  })),
  ttl: { ClientCredentials: 600 },
  // The cookies sign interaction sessions, which a client-credentials-only IdP never opens.
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => defaultResourceIndicator,
      // Any resource indicator names an audience here: a test asks for a foreign one to get a token
      // SomaAgent must refuse.
      getResourceServerInfo: async (_ctx, resourceIndicator) => ({
        scope: 'soma',
        audience: resourceIndicator,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  extraTokenClaims: async (_ctx, token) => {
    if (token.kind !== 'ClientCredentials') return undefined;
    const roles = rolesByClient.get(token.clientId);
    return roles === undefined ? undefined : { roles };
  },
});

const server = http.createServer(provider.callback());
server.listen(port, '127.0.0.1', () => {
  console.log(`oidc test IdP listening on ${issuer}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}

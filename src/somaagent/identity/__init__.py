"""Identity: tenants and API keys (users, JWT, MFA and OIDC come later).

Owns: tenants, api_keys, the key-lookup cache, authentication of a bearer key into a `Principal`.
May import: core, db, events. Never: api, models, agents.
"""

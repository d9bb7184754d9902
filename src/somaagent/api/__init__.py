"""The HTTP API: the OpenAI-compatible surface, admin routers, dependencies and the error table.

Owns: routes, request/response schemas at the edge, the app factory (composition root).
May import: everything above it in ARCHITECTURE §3. Never imported by a domain package.
"""

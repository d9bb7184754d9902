"""Models: one normalized message protocol, the `ChatModel`/`Embedder` ports, providers
(llama.cpp, OpenAI-compatible upstreams, the local MiniLM embedder), the catalog, per-tenant
profiles and the fallback router.

May import: core, db. Never: api, agents, identity.
"""

"""Memory: remember / recall / RAG over per-tenant namespaces, the vector index port and its adapters
(embedded usearch HNSW, exact numpy; Qdrant server later), document ingest.

May import: core, db, models. Never: api, cli, agents, identity, policy, tools.
Text and metadata live in the DB; a vector index holds only integer keys and vectors, so it can always
be rebuilt from the DB. Each (tenant, namespace) has its own index: another tenant's vectors are not in
the structure a query walks, so they cannot be returned.
"""

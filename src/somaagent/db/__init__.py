"""State: the async engine and sessions, the declarative `Base`, `TenantMixin`, Alembic migrations.

Owns: connections, transactions, the one migration history. May import: core.
Never: a domain package (domains import `db`, not the other way round).
"""

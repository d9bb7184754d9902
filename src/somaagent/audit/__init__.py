"""Audit: the append-only record of identity and admin actions, fed by `audit.events`.

Owns: audit_log and the query behind `GET /v1/audit`. May import: core, db, events. Never: api, identity.
"""

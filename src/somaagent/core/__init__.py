"""Core vocabulary shared by every package.

Owns: ids, clock, the `SomaError` hierarchy, `Principal`.
May import: stdlib, pydantic. Never: db, api or any domain package.
"""

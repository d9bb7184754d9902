"""Analytics: usage records built from `model.usage` events, and their rollups.

Owns: usage_records. May import: core, db, events. Never: models, agents, api (it learns about
model calls only through events).
"""

"""Events: the envelope, the transactional outbox, and the in-process bus that relays it.

Owns: `outbox` and `processed_events` tables, `Event`, the relay and the bus port.
May import: core, db. Never: a domain that produces or consumes events.
"""

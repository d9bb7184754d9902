"""Notifications: the queue, channels (WebSocket, email, webhook), preferences and live push.

Owns: notifications, deliveries, preferences and webhook endpoints. May import: core, db, events.
Never: agents, policy, identity, api (it learns what to tell people through `notifications.outbound`).
"""

"""Analytics: usage records, the hourly and per-minute rollups of model calls, runs, tool calls and
policy decisions (the `analytics` consumer group), the queries the dashboard and charts read, and
anomaly detection (EWMA baselines and z-scores) whose findings become notifications.

Owns: usage_records, analytics_rollups, analytics_baselines, analytics_anomalies. May import: core, db,
events. Never: models, agents, policy, billing, api (it learns about the world only through events;
prices come through the `analytics.pricing.Pricing` port).
"""

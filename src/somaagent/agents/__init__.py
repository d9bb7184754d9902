"""Agents: personas, sessions, runs and the agent loop that streams what it does.

Owns: personas, sessions and their append-only event log, runs (the loop as a state machine: recall →
model → tools → model … → final), live run streams. May import: core, db, models, memory, tools,
events. Never: api, cli, billing, analytics, notifications.
"""

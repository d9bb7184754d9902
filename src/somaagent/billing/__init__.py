"""Billing: the append-only ledger of billable events, its rollups, exports and invoices.

Owns: ledger_entries and billing_rollups. May import: core, db, events. Never: policy, models,
agents, api (it learns about usage only through `model.usage` and `tool.calls` events).
"""

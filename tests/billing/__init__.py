"""Billing: price book, ledger consumer, rollups, routes."""

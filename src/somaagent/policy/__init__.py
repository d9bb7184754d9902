"""Policy: the signed constitution, rule sets and the evaluator, moderation strikes, rate limits and budgets.

Owns: constitutions, policy versions, `Decision`, strikes, rate limits, budgets and the price book.
May import: core, db, events. Never: api, agents, models (callers pass text and token counts in).
"""

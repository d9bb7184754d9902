"""Policy: the signed per-tenant constitution, rule sets and the evaluator that turns them into decisions.

Owns: constitutions, policy_versions, `Decision`. May import: core, db, events. Never: api, agents.
"""

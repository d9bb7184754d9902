"""`soma`, the command line, grouped by noun: serve, migrate, tenants, keys, models, chat.

May import: api, config, domains. Never imported by them.
"""

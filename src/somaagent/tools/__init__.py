"""Tools: what an agent may call, and the walls around each call.

Owns: the tool registry (signed manifests, JSON-schema args), the code sandbox, built-ins, the MCP client.
May import: core, db, models. Never: api, cli, agents, or any package that consumes tool results.
"""

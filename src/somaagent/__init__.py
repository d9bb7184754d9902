"""SomaAgent: a self-hosted, multi-tenant AI agent platform with an OpenAI-compatible gateway."""

__version__ = "0.1.0"

"""Model providers: the only place that knows a vendor's API (llama.cpp, OpenAI-compatible, MiniLM)."""

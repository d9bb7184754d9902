"""Upper bounds on the tokens a prompt can take, known before any model sees it (budgets reserve them).

Byte-level BPE tokenizers (SmolLM2's, GPT's, Llama 3's) never make a token of less than one byte, and
SentencePiece models with byte fallback do not either, so the UTF-8 length of the rendered prompt
bounds its token count. The rendered prompt is the messages plus what the chat template and the tool
listing add; those additions are bounded by a per-message and a fixed allowance.
"""

from __future__ import annotations

import json

from somaagent.models.messages import ChatRequest

# Role markers and separators a chat template puts around each message (`<|im_start|>user\n`...).
PER_MESSAGE_TOKENS = 16
# A template's default system prompt, the tool-calling instructions and the JSON-reply instruction.
FIXED_TOKENS = 512


def prompt_token_bound(request: ChatRequest) -> int:
    """At most this many prompt tokens, whatever the model's tokenizer."""
    total = FIXED_TOKENS
    for message in request.messages:
        total += PER_MESSAGE_TOKENS + len((message.content or "").encode())
        for call in message.tool_calls:
            total += PER_MESSAGE_TOKENS + len(call.name.encode()) + len(call.arguments.encode())
    if request.tools:
        listing = [
            {"name": t.name, "description": t.description, "parameters": t.parameters} for t in request.tools
        ]
        total += len(json.dumps(listing).encode())
    schema = request.response_format.schema
    if schema is not None:
        total += len(json.dumps(schema).encode())
    return total


def texts_token_bound(texts: list[str]) -> int:
    """At most this many tokens in texts to embed (each also gets its start and end markers)."""
    return sum(len(text.encode()) + 2 for text in texts)

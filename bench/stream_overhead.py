"""Streaming overhead: local generation through `soma serve` vs calling llama.cpp in-process.

The same prompt, the same sampling (greedy: temperature 0, fixed seed, `max_tokens` 128) and the
same model file (SmolLM2-135M-Instruct Q4_1, n_ctx 4096, 1 thread, as the server configures it):
(a) in-process: render the server's own chat template (`chat_prompt.plan_prompt`), tokenize, then
    `llama_cpp.Llama.generate` with the KV cache reset first (the server resets it for seeded
    requests too), every token detokenized as it comes (all inside the timed region);
(b) API: `POST /v1/chat/completions` with `stream: true` and `stream_options.include_usage` to a
    running `soma serve` (fresh temp data dir, loopback), read with a raw keep-alive HTTP/1.1
    client that timestamps SSE events as they arrive.
Runs alternate (a, b, a, b, ...) after one warm-up of each, so machine noise hits both.

Per run: TTFT = send (or call) → first content delta (or first token); decode tok/s =
(tokens - 1) / (last token - first token); end-to-end tok/s = tokens / (last token - start).
Token counts are the usage chunk's `completion_tokens` for (b) and the tokens generated for (a);
the script checks that both produced the same text. Reported: p50 over the runs, the API/in-process
tok/s ratio, and the added TTFT: API p50 - in-process p50, and the median of the paired
per-round differences (less sensitive to noise from other processes on the machine).

Run: `.venv/bin/python bench/stream_overhead.py [--runs 5] [--max-tokens 128]`;
writes bench/results/stream_overhead.json.
"""

from __future__ import annotations

import argparse
import codecs
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Connection,
    ProcessGroup,
    build_request,
    machine,
    markdown_table,
    run,
    sse_events,
    write_results,
)
from somaagent.models.messages import ChatRequest, Message
from somaagent.models.providers.chat_prompt import plan_prompt
from somaagent.models.providers.llamacpp import _CHATML, default_gguf_path

MODEL = "smollm2-135m-instruct"
SEED = 42
PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a mysterious map. "
    "Describe every place the keeper visits, the people met on the way and what each of them says."
)
GOALS = {"tok_s_ratio": 0.90, "added_ttft_ms": 10.0}


class InProcess:
    """llama.cpp called directly, configured like the server's `LlamaCppChatModel`."""

    def __init__(self, n_ctx: int, n_threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(default_gguf_path()),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
        self.template = str(self.llm.metadata.get("tokenizer.chat_template") or _CHATML)

    def once(self, max_tokens: int) -> dict[str, Any]:
        import llama_cpp

        llm = self.llm
        started = time.perf_counter()
        # Rendering and tokenizing the prompt is part of what any caller has to do.
        request = ChatRequest(model=MODEL, messages=(Message(role="user", content=PROMPT),))
        plan = plan_prompt(self.template, request)
        tokens = llm.tokenize((plan.prompt + plan.primer).encode(), add_bos=False, special=True)
        llm.set_seed(SEED)
        llm.reset()
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        first = last = 0.0
        generated = 0
        text = []
        for token in llm.generate(tokens, temp=0.0, top_p=1.0, top_k=40, min_p=0.0, reset=True):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            generated += 1
            piece = decoder.decode(llm.detokenize([token]))
            last = time.perf_counter()
            if generated == 1:
                first = last
            text.append(piece)
            if generated >= max_tokens:
                break
        return _timings(started, first, last, generated, "".join(text))


async def api_once(port: int, raw: bytes) -> dict[str, Any]:
    """One streamed completion; timestamps taken as SSE events arrive."""
    conn = await Connection.open(port)
    try:
        started = time.perf_counter()
        status, pieces = await conn.stream(raw)
        if status != 200:
            body = b"".join([p async for p in pieces])
            raise RuntimeError(f"API answered {status}: {body[:500]!r}")
        buffer = bytearray()
        first = last = 0.0
        text: list[str] = []
        completion_tokens = 0
        async for piece in pieces:
            now = time.perf_counter()
            for payload in sse_events(buffer, piece):
                if payload == b"[DONE]":
                    continue
                data = orjson.loads(payload)
                if data.get("usage"):
                    completion_tokens = int(data["usage"]["completion_tokens"])
                for choice in data.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if not text:
                            first = now
                        last = now
                        text.append(content)
    finally:
        conn.close()
    return _timings(started, first, last, completion_tokens, "".join(text))


def _timings(started: float, first: float, last: float, tokens: int, text: str) -> dict[str, Any]:
    return {
        "ttft_ms": (first - started) * 1000,
        "decode_tok_s": (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan"),
        "e2e_tok_s": tokens / (last - started) if tokens else float("nan"),
        "tokens": tokens,
        "text": text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Streaming overhead: API vs in-process llama.cpp.")
    parser.add_argument("--runs", type=int, default=7, help="measured runs of each (default 7)")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    runs = max(1, min(args.runs, 50))
    started = time.time()
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "seed": SEED,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    results: dict[str, list[dict[str, Any]]] = {"in-process": [], "api": []}
    with ProcessGroup() as procs:
        server = procs.start_soma("stream")
        raw = build_request(
            "POST", "/v1/chat/completions", body, {"authorization": f"Bearer {server.info['admin_key']}"}
        )
        print("loading the model in-process and in the server (warm-up) …", flush=True)
        local = InProcess(n_ctx=4096, n_threads=1)
        warm_local = local.once(args.max_tokens)
        warm_api = run(api_once(server.port, raw))
        for i in range(runs):
            results["in-process"].append(local.once(args.max_tokens))
            results["api"].append(run(api_once(server.port, raw)))
            a, b = results["in-process"][-1], results["api"][-1]
            print(
                f"  run {i + 1}/{runs}: in-process {a['decode_tok_s']:.1f} tok/s "
                f"ttft {a['ttft_ms']:.1f} ms | api {b['decode_tok_s']:.1f} tok/s "
                f"ttft {b['ttft_ms']:.1f} ms ({b['tokens']} tokens)",
                flush=True,
            )

    same_text = all(r["text"] == warm_local["text"] for rs in results.values() for r in rs) and (
        warm_api["text"] == warm_local["text"]
    )
    summary: dict[str, dict[str, float]] = {}
    for name, rs in results.items():
        summary[name] = {
            key: round(statistics.median(r[key] for r in rs), 2)
            for key in ("ttft_ms", "decode_tok_s", "e2e_tok_s", "tokens")
        }
    ratio_decode = round(summary["api"]["decode_tok_s"] / summary["in-process"]["decode_tok_s"], 3)
    ratio_e2e = round(summary["api"]["e2e_tok_s"] / summary["in-process"]["e2e_tok_s"], 3)
    added_ttft = round(summary["api"]["ttft_ms"] - summary["in-process"]["ttft_ms"], 2)
    pairs = list(zip(results["in-process"], results["api"], strict=True))
    paired_ttft = round(statistics.median(b["ttft_ms"] - a["ttft_ms"] for a, b in pairs), 2)
    paired_ratio = round(statistics.median(b["decode_tok_s"] / a["decode_tok_s"] for a, b in pairs), 3)
    goals = {
        "tok_s_ratio>=0.90": ratio_decode >= GOALS["tok_s_ratio"],
        "added_ttft_ms<=10": added_ttft <= GOALS["added_ttft_ms"],
    }
    print()
    print(
        markdown_table(
            ["path", "runs", "tokens", "TTFT p50 ms", "decode tok/s p50", "end-to-end tok/s p50"],
            [
                [name, len(results[name]), s["tokens"], s["ttft_ms"], s["decode_tok_s"], s["e2e_tok_s"]]
                for name, s in summary.items()
            ],
        )
    )
    print(
        f"\nAPI / in-process: decode tok/s x{ratio_decode}, end-to-end tok/s x{ratio_e2e}; "
        f"added TTFT p50 {added_ttft} ms; paired medians: added TTFT {paired_ttft} ms, "
        f"decode ratio x{paired_ratio}; identical text: {same_text}"
    )
    print(f"Goals: {goals}")
    for rs in results.values():
        for r in rs:
            r.pop("text")
    path = write_results(
        "stream_overhead",
        {
            "machine": machine(),
            "started": started,
            "duration_s": round(time.time() - started, 1),
            "args": {"runs": runs, "max_tokens": args.max_tokens},
            "prompt": PROMPT,
            "seed": SEED,
            "summary": summary,
            "ratio_decode_tok_s": ratio_decode,
            "ratio_e2e_tok_s": ratio_e2e,
            "added_ttft_ms": added_ttft,
            "paired_added_ttft_ms": paired_ttft,
            "paired_ratio_decode_tok_s": paired_ratio,
            "identical_text": same_text,
            "goals": GOALS,
            "goals_met": goals,
            "runs": results,
            "sample_text": warm_local["text"][:400],
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

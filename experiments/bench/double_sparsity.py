"""Double Sparsity decode attention (arXiv 2408.07092) beside dense decode attention, on CPU.

Two measurements, baseline and method side by side in the same run:

1. `attention_speedup`: one decode step of attention (one query per row) over the same f32 KV
   cache: dense (`models.core.attention.single_query_attention`, the model's own decode path)
   vs Double Sparsity (`pallas_kernels.double_sparse.double_sparse_attention` with
   impl="xla", the model's CPU path: label scores over r = D/16 channels, top-k selection,
   exact softmax over the k chosen tokens; beside it the previous jnp-reference path), for batch
   1 and 8, contexts 8k/32k/128k, k = S/16 and S/8. Shapes: one layer of a GQA model with 16
   query heads, 4 KV heads, head_dim 128 (paper: Llama-2-7B's 32 heads of 128; halved to fit
   batch 8 x 128k in this machine's memory); f32 cache and labels, since XLA:CPU's bf16
   arithmetic is several times slower than f32 (docs/benchmarks.md). Each line carries
   `bandwidth_ideal`, the speedup if both sides were bound by the bytes they read (dense
   2*D*S, sparse r*S + 2*D*k values per KV head; kernels.md §3b: 10.7x at 1/16), and the time
   of label scoring + selection alone. At batch 1, 1/16 and 32k (the goal's case) the line also
   carries `pieces_ms`: each step of the path beside the forms it replaced (einsum scores,
   lax.top_k / approx_max_k / nonzero-compaction selection, advanced-index gather, int8
   labels), and `query_head_ms` (per-query-head selection).
2. `decode_speedup`: end-to-end greedy decode steps of SmolLM2-135M (f32) at a long context,
   dense vs double-sparse (1/16 of the tokens, r = 4 of 64 channels), with the KV cache filled
   with random keys and values up to that context (speed does not depend on their values;
   prefilling 32k tokens on 2 CPU cores would take longer than the whole bench).

    python -m experiments.bench.double_sparsity [--batches 1,8] [--contexts 8192,32768,131072]
        [--e2e_contexts 32768] [--repeats 3] [--quick]

--quick runs tiny sizes in seconds. Run timed numbers under the exclusive CPU lock.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.core.attention import single_query_attention
from pallas_kernels import double_sparse as ds
from pallas_kernels import double_sparse_xla as dsx

BENCH = "double_sparsity"
HQ, HKV, D = 16, 4, 128
GOAL_CONTEXT, GOAL_FRACTION, GOAL = 32768, 16, 5.0


def _machine() -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "load_avg": os.getloadavg()[0], "jax_backend": jax.default_backend()}


def _best_time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _inputs(batch: int, context: int, r: int, seed: int = 0):
    """Random f32 q, k, v (generated on device, jitted), labels and channels."""
    def make(key):
        kq, kk, kv = jax.random.split(key, 3)
        q = jax.random.normal(kq, (batch, 1, HQ, D), jnp.float32)
        k = jax.random.normal(kk, (batch, context, HKV, D), jnp.float32)
        v = jax.random.normal(kv, (batch, context, HKV, D), jnp.float32)
        return q, k, v
    q, k, v = jax.jit(make)(jax.random.key(seed))
    channels = jnp.asarray(np.stack([np.random.default_rng(h).permutation(D)[:r]
                                     for h in range(HKV)]), jnp.int32)
    labels = jax.jit(ds.make_labels)(k, channels)
    return q, k, v, labels, channels


def attention_case(batch: int, context: int, fraction: int, repeats: int,
                   pieces: bool = False) -> dict:
    r, top_k = D // 16, context // fraction
    q, k, v, labels, channels = _inputs(batch, context, r)
    kv_len = jnp.full((batch,), context, jnp.int32)
    mask = jnp.ones((batch, 1, 1, context), bool)

    dense = jax.jit(lambda q, k, v: single_query_attention(q, k, v, mask))

    def sparse_fn(impl, select_per="kv_group"):  # the model's path on CPU is impl="xla"
        return jax.jit(lambda q, k, v, lab: ds.double_sparse_attention(
            q, k, v, lab, channels, kv_len, top_k=top_k, impl=impl, selection="threshold",
            select_per=select_per))

    def select_only(q, lab):
        scores = dsx.label_scores(q, lab, channels, kv_len[:, None])
        return dsx.select(scores, top_k, jnp.full(scores.shape[:3], top_k, jnp.int32))

    t_dense = _best_time(dense, (q, k, v), repeats)
    t_sparse = _best_time(sparse_fn("xla"), (q, k, v, labels), repeats)
    t_select = _best_time(jax.jit(select_only), (q, labels), repeats)
    # The previous CPU path (jnp reference: einsum scores, threshold selection with nonzero
    # compaction, advanced-index gather), for the page's "what was tried" table.
    t_before = _best_time(sparse_fn("reference"), (q, k, v, labels), repeats)
    dense_bytes = 2 * D * context * 2
    sparse_bytes = r * context * 2 + 2 * D * top_k * 2
    goal = GOAL if (context, fraction) == (GOAL_CONTEXT, GOAL_FRACTION) else None
    line = {"bench": BENCH, "case": f"attention_b{batch}_s{context}_k1/{fraction}",
            "metric": "attention_speedup", "value": t_dense / t_sparse, "goal": goal,
            "bandwidth_ideal": dense_bytes / sparse_bytes, "dense_ms": 1e3 * t_dense,
            "double_sparse_ms": 1e3 * t_sparse, "labels_and_selection_ms": 1e3 * t_select,
            "reference_path_ms": 1e3 * t_before, "speedup_before": t_dense / t_before,
            "batch": batch, "context": context, "top_k": top_k, "r": r, "heads": HQ,
            "kv_heads": HKV, "head_dim": D, "dtype": "float32", "repeats": repeats,
            **_machine()}
    if pieces:
        line["pieces_ms"] = _pieces(q, k, v, labels, channels, kv_len, top_k, repeats)
        line["query_head_ms"] = 1e3 * _best_time(sparse_fn("xla", "query_head"),
                                                 (q, k, v, labels), repeats)
    return line


def _pieces(q, k, v, labels, channels, kv_len, top_k, repeats) -> dict:
    """Each step of the xla path beside the forms it replaced (the profile behind the page's
    "what was tried" table), in ms."""
    kv_len = kv_len[:, None]
    scores = jax.jit(lambda q, lab: dsx.label_scores(q, lab, channels, kv_len))(q, labels)
    count = jnp.full(scores.shape[:3], top_k, jnp.int32)
    idx = jax.jit(lambda s: dsx.select(s, top_k, count))(scores)
    lab8, scale8 = ds.quantize_labels(labels, 8)
    steps = {
        "scores_block_diagonal_matmul": (lambda q, lab: dsx.label_scores(
            q, lab, channels, kv_len), (q, labels)),
        "scores_einsum": (lambda q, lab: ds.label_scores(q, lab, channels, kv_len),
                          (q, labels)),
        "select_bisection_bitpacked": (lambda s: dsx.select(s, top_k, count), (scores,)),
        "select_bisection_nonzero": (lambda s: ds.select_by_threshold(s, top_k, count),
                                     (scores,)),
        "select_lax_top_k": (lambda s: ds.select_tokens(s, top_k), (scores,)),
        "select_lax_approx_max_k": (lambda s: jax.lax.approx_max_k(s, top_k)[1], (scores,)),
        "gather_attend_row_take": (lambda q, k, v, i: dsx.sparse_attention(q, k, v, i, count),
                                   (q, k, v, idx)),
        "gather_attend_advanced_index": (lambda q, k, v, i: ds.sparse_attention_reference(
            q, k, v, i, count), (q, k, v, idx)),
        "whole_int8_labels": (lambda q, k, v, lab, sc: dsx.double_sparse(
            q, k, v, lab, channels, kv_len, count[..., 0], top_k=top_k, label_scale=sc),
            (q, k, v, lab8, scale8)),
    }
    return {name: 1e3 * _best_time(jax.jit(fn), args, repeats)
            for name, (fn, args) in steps.items()}


def decode_case(context: int, steps: int, fraction: int = 16) -> list[dict]:
    """End-to-end decode steps of SmolLM2-135M at `context`: dense vs double-sparse."""
    from experiments.pretrained import load_pretrained
    from models import double_sparse_calibration as dsc
    pre = load_pretrained(name="smollm2", dtype="float32")
    dense = pre.model
    c = dense.config
    r = max(1, c.resolved_head_dim // 16)
    try:  # the calibrated channels if calibrate_double_sparsity has run; speed is the same
        from experiments.calibrate_double_sparsity import default_path
        ranking = dsc.load_ranking(default_path("smollm2", c), c)
    except ValueError:
        ranking = np.tile(np.arange(c.resolved_head_dim, dtype=np.int32),
                          (c.n_layers, c.n_kv_heads, 1))
    # Every layer sparse, as DoubleSparse's speed path (models/model.py) decodes; its quality
    # evaluation keeps layers 0-1 dense (the model's default ds_dense_layers=2).
    sparse = dsc.with_double_sparse(dense, ranking, ds_token_sparsity=1.0 / fraction,
                                    ds_label_channels=r, ds_dense_layers=0)
    max_length = context + steps + 64
    times = {}
    for name, model in (("dense", dense), ("double_sparse", sparse)):
        cache = _filled_cache(model, context, max_length)
        step = nnx.jit(lambda m, tok, cache: _greedy_step(m, tok, cache), donate_argnums=2)
        tok = jnp.ones((1, 1), jnp.int32)
        tok, cache = step(model, tok, cache)  # compile
        jax.block_until_ready(tok)
        t = time.perf_counter()
        for _ in range(steps):
            tok, cache = step(model, tok, cache)
        jax.block_until_ready(tok)
        times[name] = (time.perf_counter() - t) / steps
        del cache
    return [{"bench": BENCH, "case": f"decode_smollm2_b1_s{context}_k1/{fraction}",
             "metric": "decode_speedup", "value": times["dense"] / times["double_sparse"],
             "goal": None, "dense_tokens_per_s": 1 / times["dense"],
             "double_sparse_tokens_per_s": 1 / times["double_sparse"], "context": context,
             "steps": steps, "r": r, "model": "SmolLM2-135M-Instruct f32", **_machine()}]


def _greedy_step(model, tok, cache):
    logits, cache = model.extend(tok, cache)
    return jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32), cache


def _filled_cache(model, context: int, max_length: int):
    """A batch-1 cache holding `context` random keys/values (and their labels)."""
    cache = model.init_cache(1, max_length)

    @jax.jit
    def fill(cache, key):
        layers = []
        for i, kv in enumerate(cache.layers):
            kk, kv_key = jax.random.split(jax.random.fold_in(key, i))
            k = jax.random.normal(kk, kv.k.shape, kv.k.dtype)
            v = jax.random.normal(kv_key, kv.v.shape, kv.v.dtype)
            layers.append(kv.replace(k=k, v=v))
        return cache.replace(layers=tuple(layers),
                             lengths=jnp.full_like(cache.lengths, context))

    cache = fill(cache, jax.random.key(0))
    layers = []
    for block, kv in zip(model.blocks, cache.layers):
        if hasattr(kv, "label"):  # a double-sparse layer (dense layers keep no labels)
            ch = jnp.asarray(block.attn.ds_channels, jnp.int32)
            kv = kv.replace(label=jax.jit(ds.make_labels)(kv.k, ch).astype(kv.label.dtype))
        layers.append(kv)
    cache = cache.replace(layers=tuple(layers))
    return cache


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--fractions", default="16,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--e2e_contexts", default="32768")
    p.add_argument("--e2e_steps", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    args = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    batches, contexts, fractions = ints(args.batches), ints(args.contexts), ints(args.fractions)
    e2e = ints(args.e2e_contexts)
    if args.quick:
        batches, contexts, e2e, args.repeats, args.e2e_steps = [1], [2048], [], 2, 4
    for context in contexts:
        for batch in batches:
            for fraction in fractions:
                pieces = (batch, fraction) == (1, GOAL_FRACTION) and context in (
                    GOAL_CONTEXT, contexts[0])  # the profile: at the goal's case (or --quick)
                print(json.dumps(attention_case(batch, context, fraction, args.repeats,
                                                pieces)), flush=True)
    for context in e2e:
        for line in decode_case(context, args.e2e_steps):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

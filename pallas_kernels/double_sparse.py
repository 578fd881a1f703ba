"""Double Sparsity decode attention (Yang et al. 2024, arXiv 2408.07092): API and jnp reference.

Double Sparsity makes a decode step read a small part of the KV cache twice over:

1. *Channel sparsity*: offline calibration picks, per layer and KV head, the r "outlier"
   channels that carry most of q.k (mean |q * k| after RoPE). Their keys are kept beside the KV
   cache as a label cache ``k_label[B, N, Hkv, r]`` (optionally int8 or 4-bit with one scale per
   token and head). Label scores ``q[channels] . k_label`` approximate the logits while reading r/D
   of the key bytes.
2. *Token sparsity*: the top-k tokens by label score get an exact softmax over all D channels;
   every other token is skipped.

GQA semantics (stated because DoubleSparse assumes Hq == Hkv), ``select_per``: the channels
belong to the KV head and each of its G query heads scores every token with its own
q[channels]. "kv_group" (default): a token's group score is the maximum over the G heads and
the top-k tokens of that score are shared by the G heads, so each gathered K/V row serves G
queries (the GQA-aware GPU kernel relies on this). "query_head": each query head keeps its own
top-k, as the official code does (it repeats K/V per head, ``repeat_kv``): G times the
gathers; the jnp paths only. With G = 1 the two are the same.

Step 1 (label scores + ``lax.top_k``) is XLA everywhere: it is memory-bound on the label bytes
and an einsum is adequate (kernels.md §3b). Step 2, the gather-attention over the selected
tokens, has four implementations behind :func:`double_sparse_attention`:

- ``reference``: a jnp gather + masked softmax in f32 (:func:`sparse_attention_reference`).
- ``xla``: the whole step in XLA forms that are fast on CPU (``double_sparse_xla.py``: scores
  as one matrix product, selection by bisection and bit-packed compaction, a row gather); the
  same result as the reference (the same token set, f32 1e-5).
- ``pallas`` with backend "gpu": Triton style, token granularity, split over the selected
  tokens (``double_sparse_gpu.py``); exact Double Sparsity.
- ``pallas`` with backend "tpu": Mosaic style, block granularity with scalar-prefetched block
  ids (``double_sparse_tpu.py``); an *approximation* (Quest-like): it attends the top blocks of
  ``block_k`` tokens, not the top tokens. See that module for its measured error.

Shapes: q [B, S, Hq, D] (S = 1 for plain decode, more for speculative verification); k, v
[B, N, Hkv, D]; ``kv_len`` [B, S] (or [B]): how many cache slots query s of row b sees (its
keys are slots [0, kv_len)); ``num_selected`` [B, S] (optional, <= top_k): how many of the
top_k selected tokens are used (a per-row k under a static top_k). Output [B, S, Hq, D].
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _compat
from pallas_kernels import double_sparse_xla as xla
from pallas_kernels.double_sparse_xla import SELECT_PER, check_select_per  # noqa: F401 (API)

IMPLS = ("auto", "reference", "xla", "pallas")
LABEL_BITS = (4, 8, 16)  # 16: the cache's dtype; 8 / 4: int8-stored, per-token scale


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------
def check_label_config(head_dim: int, r: int, context: int | None = None,
                       top_k: int | None = None) -> None:
    """One-line ValueErrors for a label width r or token budget top_k that cannot work."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= head_dim:
        raise ValueError(f"double sparsity: r={r!r} label channels must be an int in "
                         f"[1, head_dim={head_dim}].")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ValueError(f"double sparsity: top_k={top_k!r} must be a positive int.")
        if context is not None and top_k > context:
            raise ValueError(f"double sparsity: top_k={top_k} tokens is larger than the "
                             f"context of {context} cache slots; use top_k <= {context}.")


def make_labels(k: jax.Array, channels: jax.Array) -> jax.Array:
    """Each key's label: k [B, S, Hkv, D] at its KV head's channels [Hkv, r] -> [B, S, Hkv, r]."""
    idx = jnp.broadcast_to(channels[None, None], k.shape[:2] + channels.shape)
    return jnp.take_along_axis(k, idx, axis=-1)


def quantize_labels(labels: jax.Array, bits: int = 8) -> tuple[jax.Array, jax.Array]:
    """Symmetric integer labels with one f32 scale per (token, head): labels ~= q * scale[...,
    None]. bits=8: int8 in [-127, 127]; bits=4: [-7, 7] (the 4-bit labels of the paper, kept
    unpacked in an int8 array: the bytes a kernel would stream are r/2, the values the same).
    Symmetric rather than DoubleSparse's min/max (zero-point) scheme so the scale stays a
    positive per-token factor that commutes with the max over a GQA group."""
    if bits not in (4, 8):
        raise ValueError(f"quantize_labels: bits={bits!r}; valid: 4, 8")
    top = 2 ** (bits - 1) - 1
    x = labels.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / top
    q = jnp.round(x / jnp.where(scale > 0, scale, 1.0)[..., None])
    return jnp.clip(q, -top, top).astype(jnp.int8), scale


def label_scores(q: jax.Array, k_label: jax.Array, channels: jax.Array, kv_len: jax.Array,
                 label_scale: jax.Array | None = None, select_per: str = "kv_group") -> jax.Array:
    """Label scores [B, S, Hsel, N] in f32, -inf at slots a query does not see.

    q [B, S, Hq, D]; k_label [B, N, Hkv, r] (int8 when label_scale [B, N, Hkv] is given);
    channels [Hkv, r]; kv_len [B, S]. select_per "kv_group" (Hsel = Hkv): the max over the G
    heads of q_h[channels] . label; "query_head" (Hsel = Hq): each head's own score.
    """
    check_select_per(select_per)
    b, s, hq, _ = q.shape
    n, hkv, r = k_label.shape[1:]
    g = hq // hkv
    ch = jnp.repeat(channels, g, axis=0)  # [Hq, r]: q head h uses its kv head's channels
    q_lab = jnp.take_along_axis(q, jnp.broadcast_to(ch[None, None], (b, s, hq, r)), axis=-1)
    q_lab = q_lab.reshape(b, s, hkv, g, r).astype(jnp.float32)
    scores = jnp.einsum("bskgr,bnkr->bskgn", q_lab, k_label.astype(jnp.float32))
    if label_scale is not None:
        # The scale is positive and shared by the G heads, so it commutes with the max.
        scores = scores * label_scale.astype(jnp.float32).transpose(0, 2, 1)[:, None, :, None]
    scores = scores.max(axis=3) if select_per == "kv_group" else scores.reshape(b, s, hq, n)
    visible = jnp.arange(n)[None, None, None, :] < kv_len[:, :, None, None]
    return jnp.where(visible, scores, -jnp.inf)


SELECTIONS = ("auto", "top_k", "threshold")


def select_tokens(scores: jax.Array, top_k: int) -> jax.Array:
    """Indices [..., top_k] int32 of the top_k scores, best first (invisible slots last)."""
    return lax.top_k(scores, top_k)[1].astype(jnp.int32)


def _order_key(x: jax.Array) -> jax.Array:
    """uint32 keys ordered like the f32 values (-0.0 < +0.0 aside): bisection works on them."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def select_by_threshold(scores: jax.Array, top_k: int, count: jax.Array) -> jax.Array:
    """The same token set as top_k (ties to the lower index), without sorting.

    Per query the count[...]-th largest score is found by a 32-step bisection over the scores'
    order-preserving uint32 keys (32 passes over data that stays in cache), then every token
    above it, plus the first tied ones, is compacted to the front in *position* order; ranks
    >= count are filler (token 0) and must be masked, as every caller does. On CPU, XLA's TopK
    sorts each row on one thread and costs more than dense attention reads; this does not.
    scores [..., N]; count [...] <= top_k. Returns [..., top_k] int32.
    """
    keys = _order_key(scores)
    count = jnp.asarray(count, jnp.int32)
    lo = jnp.zeros(keys.shape[:-1], jnp.uint32)  # count(keys >= lo) >= count: always true
    hi = jnp.full(keys.shape[:-1], 0xFFFFFFFF, jnp.uint32)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)  # ceil of the midpoint, no overflow
        ok = jnp.sum(keys >= mid[..., None], axis=-1, dtype=jnp.int32) >= count
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    kth = lax.fori_loop(0, 32, step, (lo, hi))[0][..., None]
    above = keys > kth
    tied = keys == kth
    room = count[..., None] - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
    chosen = above | (tied & (jnp.cumsum(tied, axis=-1, dtype=jnp.int32) <= room))
    flat = chosen.reshape(-1, chosen.shape[-1])
    idx = jax.vmap(lambda row: jnp.nonzero(row, size=top_k, fill_value=0)[0])(flat)
    return idx.reshape(chosen.shape[:-1] + (top_k,)).astype(jnp.int32)


def _select(scores, top_k, count, selection):
    if selection not in SELECTIONS:
        raise ValueError(f"Unknown selection {selection!r}; valid: {SELECTIONS}.")
    if selection == "auto":  # XLA:CPU's TopK is a single-threaded sort per row
        selection = "threshold" if jax.default_backend() == "cpu" else "top_k"
    if selection == "top_k":
        return select_tokens(scores, top_k)
    return select_by_threshold(scores, top_k, count)


def _num_valid(kv_len, num_selected, top_k):
    """How many of the top_k ranks are real, per query: min(num_selected, kv_len, top_k)."""
    count = jnp.minimum(kv_len, top_k)
    if num_selected is not None:
        count = jnp.minimum(count, num_selected)
    return count.astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Reference (jnp) for step 2 and for the whole pipeline
# --------------------------------------------------------------------------------------------
def sparse_attention_reference(q, k, v, idx, count, *, scale=None):
    """Exact softmax over the selected tokens, in f32.

    q [B, S, Hq, D]; k, v [B, N, Hkv, D]; idx [B, S, Hsel, K] token ids, Hsel = Hkv (shared
    by each group) or Hq (per query head); count [B, S, Hsel] (or broadcastable): ranks >=
    count are ignored. Returns [B, S, Hq, D].
    """
    b, s, hq, d = q.shape
    hkv, hsel = k.shape[2], idx.shape[2]
    g = hq // hsel
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = jnp.arange(b)[:, None, None, None]
    heads = (jnp.arange(hsel) // (hsel // hkv))[None, None, :, None]  # each one's KV head
    ks = k[rows, idx, heads].astype(jnp.float32)  # [B, S, Hsel, K, D]
    vs = v[rows, idx, heads].astype(jnp.float32)
    qg = q.reshape(b, s, hsel, g, d).astype(jnp.float32)
    logits = jnp.einsum("bskgd,bskjd->bskgj", qg, ks) * scale
    valid = jnp.arange(idx.shape[-1]) < jnp.broadcast_to(count, (b, s, hsel))[..., None]
    logits = jnp.where(valid[:, :, :, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bskgj,bskjd->bskgd", probs, vs)
    return out.reshape(b, s, hq, d).astype(q.dtype)


def block_reference(q, k, v, blk, n_valid, kv_len, *, scale: float, block_k: int):
    """Exact softmax over the tokens of the chosen blocks blk [B, S, Hkv, nb] (the first
    n_valid of them): the oracle for the TPU-style kernel (double_sparse_tpu.py)."""
    b, s, hkv, nb = blk.shape
    tok = (blk[..., None] * block_k + jnp.arange(block_k)).reshape(b, s, hkv, nb * block_k)
    # Order the candidate tokens so the real ones come first: real = in a real block and seen.
    real = (jnp.arange(nb)[:, None] < n_valid[..., None, None]).reshape(b, s, hkv, nb, 1)
    real = jnp.broadcast_to(real, (b, s, hkv, nb, block_k)).reshape(tok.shape)
    real &= tok < kv_len[:, :, None, None]
    order = jnp.argsort(~real, axis=-1, stable=True)
    tok = jnp.take_along_axis(tok, order, axis=-1)
    return sparse_attention_reference(q, k, v, tok, real.sum(-1), scale=scale)


def _check(q, k, v, k_label, channels, top_k):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"double sparsity expects q [B, S, Hq, D] and k, v [B, N, Hkv, D]; "
                         f"got q{q.shape}, k{k.shape}, v{v.shape}.")
    b, _, hq, d = q.shape
    n, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or hq % hkv:
        raise ValueError(f"k{k.shape} does not match q{q.shape}: need the same batch and head_dim "
                         "and Hkv dividing Hq.")
    r = k_label.shape[-1]
    check_label_config(d, r, n, top_k)
    if k_label.shape[:3] != (b, n, hkv) or channels.shape != (hkv, r):
        raise ValueError(f"k_label{k_label.shape} must be [{b}, {n}, {hkv}, r] and channels"
                         f"{channels.shape} must be [{hkv}, r].")


def _kv_len(kv_len, b, s):
    kv_len = jnp.asarray(kv_len, jnp.int32)
    return jnp.broadcast_to(kv_len[:, None] if kv_len.ndim == 1 else kv_len, (b, s))


def double_sparse_reference(q, k, v, k_label, channels, kv_len, *, top_k, num_selected=None,
                            label_scale=None, scale=None, selection="top_k",
                            select_per="kv_group"):
    """The whole Double Sparsity step in jnp: label scores, top-k, exact softmax over them."""
    _check(q, k, v, k_label, channels, top_k)
    b, s = q.shape[:2]
    kv_len = _kv_len(kv_len, b, s)
    scores = label_scores(q, k_label, channels, kv_len, label_scale, select_per)
    count = jnp.broadcast_to(_num_valid(kv_len, num_selected, top_k)[:, :, None],
                             scores.shape[:3])
    idx = _select(scores, top_k, count, selection)
    return sparse_attention_reference(q, k, v, idx, count, scale=scale)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def double_sparse_attention(q, k, v, k_label, channels, kv_len, *, top_k: int,
                            num_selected=None, label_scale=None, scale=None, impl="auto",
                            selection="auto", select_per="kv_group", interpret=None,
                            backend=None, n_split=None, block_k=None):
    """Double Sparsity attention of S queries per row over a KV cache and its label cache.

    Args:
      q [B, S, Hq, D]; k, v [B, N, Hkv, D]; k_label [B, N, Hkv, r]; channels int [Hkv, r].
      kv_len: int [B, S] or [B], the cache slots [0, kv_len) each query sees.
      top_k: static number of tokens selected per (row, query, KV-head group).
      num_selected: optional int [B, S] <= top_k, a per-query token budget.
      label_scale: [B, N, Hkv] when k_label is int8 (see :func:`quantize_labels`).
      impl: "auto" (the Pallas kernel on GPU/TPU, "xla" on CPU unless ``interpret`` is set,
        and "xla" for select_per="query_head"), "reference", "xla", "pallas".
      selection: reference only: how the top tokens are found, "top_k" (lax.top_k),
        "threshold" (:func:`select_by_threshold`, the same set without a sort) or "auto"
        (threshold on CPU, top_k elsewhere). "xla" always selects as double_sparse_xla.select.
      select_per: "kv_group" (one token set per KV-head group) or "query_head" (per query
        head; not in the Pallas kernels, which share each gathered row within a group).
      backend: Pallas style, "gpu" (token gather, exact) or "tpu" (block gather, approximate);
        default ``jax.default_backend()`` ("gpu" on CPU).
      n_split: GPU style: splits of the selected tokens (parallel programs per head).
      block_k: TPU style: tokens per selected block.
    """
    if impl not in IMPLS:
        raise ValueError(f"Unknown impl {impl!r}; valid: {IMPLS}.")
    check_select_per(select_per)
    _check(q, k, v, k_label, channels, top_k)
    platform = jax.default_backend()
    if impl == "auto":
        pallas = (platform in _compat.BACKENDS or interpret) and select_per == "kv_group"
        impl = "pallas" if pallas else "xla"
    if impl == "pallas" and select_per != "kv_group":
        raise ValueError(f"select_per={select_per!r} has no Pallas kernel (they share each "
                         "gathered row within a KV-head group); use impl='xla' or 'reference'")
    if impl == "reference":
        return double_sparse_reference(q, k, v, k_label, channels, kv_len, top_k=top_k,
                                       num_selected=num_selected, label_scale=label_scale,
                                       scale=scale, selection=selection,
                                       select_per=select_per)
    if impl == "xla":
        b, s = q.shape[:2]
        kv_len = _kv_len(kv_len, b, s)
        return xla.double_sparse(q, k, v, k_label, channels, kv_len,
                                 _num_valid(kv_len, num_selected, top_k), top_k=top_k,
                                 label_scale=label_scale, scale=scale, select_per=select_per)
    interpret, backend = _compat.resolve_style(interpret, backend, "impl='reference'")
    b, s, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kv_len = _kv_len(kv_len, b, s)
    scores = label_scores(q, k_label, channels, kv_len, label_scale)
    count = _num_valid(kv_len, num_selected, top_k)
    # Imported here: each style is only needed when asked for.
    if backend == "gpu":
        from pallas_kernels import double_sparse_gpu
        count = jnp.broadcast_to(count[..., None], scores.shape[:3])
        idx = _select(scores, top_k, count, selection)
        return double_sparse_gpu.sparse_attention(q, k, v, idx, count, scale=scale,
                                                  n_split=n_split, interpret=interpret)
    from pallas_kernels import double_sparse_tpu
    return double_sparse_tpu.block_sparse_attention(
        q, k, v, scores, kv_len, count, top_k=top_k, scale=scale, block_k=block_k,
        interpret=interpret)

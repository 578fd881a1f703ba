"""Double Sparsity decode attention (arXiv 2408.07092) as plain XLA, tuned for CPU.

The same computation as ``double_sparse_reference`` (pallas_kernels/double_sparse.py): label
scores, the exact top-k token set (ties to the lower position), an exact softmax over those
tokens with all channels. Only *how* each step runs differs, because on XLA:CPU the obvious jnp
forms of three steps cost more than dense attention saves (profiled under the exclusive CPU lock at
batch 1, 32k keys, k = S/16, 16 query / 4 KV heads of D = 128: the whole step 5.3-6.6 ms
against 6.4-12.1 ms for the reference path and ~30 ms dense; docs/results/double_sparsity.md,
"what was tried", where step timings vary 2-3x between runs):

1. **Label scores** as one matrix product over the token-major label cache: labels
   ``[B, N, Hkv * r]`` times a block-diagonal ``[Hkv * r, S * Hkv * G]`` matrix of the queries'
   label channels, instead of the einsum ``bskgr,bnkr->bskgn`` (Hkv small batched dots over
   strided label rows: 1.7 ms vs 0.6-0.8 ms in profile runs); the zeros of the block-diagonal
   matrix cost little because the step is bound by reading the labels.
2. **Selection** without a sort or a scatter. XLA:CPU's TopK sorts each row on one thread, and
   ``jnp.nonzero`` (a cumsum and a scatter over all N slots) cost more than the scores. Here the
   k-th largest score is found by bisection over order-preserving uint32 keys (as
   ``select_by_threshold``), the chosen tokens are packed 32 to a uint32 word, and the r-th
   chosen token is found by a binary search over the words' running popcounts followed by a
   5-step search inside its word: work on N / 32 words and k outputs instead of N slots.
3. **Gather** of the chosen K/V rows by one ``take`` of whole D-wide rows of the cache viewed as
   ``[B * N * Hkv, D]``, then the softmax over the k gathered rows.

``select_per``: "kv_group" shares the tokens of each KV-head group (the max of its G heads'
label scores; each gathered row serves G queries), "query_head" selects per query head (the
official code's semantics: it repeats K/V per head, ``repeat_kv``), G times the gathers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

SELECT_PER = ("kv_group", "query_head")
_WORD = 32  # tokens per packed selection word


def check_select_per(select_per: str) -> str:
    if select_per not in SELECT_PER:
        raise ValueError(f"unknown select_per {select_per!r}; valid: {SELECT_PER}")
    return select_per


def label_scores(q, k_label, channels, kv_len, label_scale=None, select_per="kv_group"):
    """Label scores [B, S, Hsel, N] f32 (Hsel = Hkv or Hq), -inf at slots a query does not see.

    Equal to pallas_kernels.double_sparse.label_scores; computed as labels [B, N, Hkv*r] @ a
    block-diagonal matrix of the queries' label channels (module docstring, step 1).
    """
    b, s, hq, _ = q.shape
    n, hkv, r = k_label.shape[1:]
    g = hq // hkv
    ch = jnp.repeat(channels, g, axis=0)  # [Hq, r]
    q_lab = jnp.take_along_axis(q, jnp.broadcast_to(ch[None, None], (b, s, hq, r)), axis=-1)
    q_lab = q_lab.reshape(b, s, hkv, g, r).astype(jnp.float32)
    eye = jnp.eye(hkv, dtype=jnp.float32)
    # w[b, (k, r), (s, k', g)] = q_lab[b, s, k, g, r] * [k == k']
    w = jnp.einsum("bskgr,kj->bkrsjg", q_lab, eye).reshape(b, hkv * r, s * hkv * g)
    labels = k_label.reshape(b, n, hkv * r).astype(jnp.float32)
    scores = jnp.einsum("bnc,bcm->bnm", labels, w).reshape(b, n, s, hkv, g)
    if label_scale is not None:  # positive and shared by the G heads: commutes with the max
        scores = scores * label_scale.astype(jnp.float32)[:, :, None, :, None]
    if select_per == "kv_group":
        scores = scores.max(axis=-1)
    scores = scores.reshape(b, n, -1).transpose(0, 2, 1).reshape(b, s, -1, n)
    visible = jnp.arange(n)[None, None, None, :] < kv_len[:, :, None, None]
    return jnp.where(visible, scores, -jnp.inf)


def _order_key(x):
    """uint32 keys ordered like the f32 values (-0.0 < +0.0 aside)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _kth_key(keys, count):
    """Per row of keys [M, N]: the largest t with count(keys >= t) >= count[M] (32 steps)."""
    def step(_, bounds):
        lo, hi = bounds
        mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)  # ceil of the midpoint, no overflow
        ok = jnp.sum(keys >= mid[:, None], axis=-1, dtype=jnp.int32) >= count
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo = jnp.zeros(keys.shape[:-1], jnp.uint32)
    hi = jnp.full(keys.shape[:-1], 0xFFFFFFFF, jnp.uint32)
    return lax.fori_loop(0, 32, step, (lo, hi))[0]


def _pack(mask):
    """[M, N] bool -> [M, ceil(N / 32)] uint32, token 32 w + i at bit i of word w."""
    m, n = mask.shape
    pad = -n % _WORD
    mask = jnp.pad(mask, ((0, 0), (0, pad))).reshape(m, -1, _WORD).astype(jnp.uint32)
    return jnp.sum(mask << jnp.arange(_WORD, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _select_bits(words, rank):
    """Position of the rank[M, K]-th (0-based) set bit of each row of words [M, W], in token
    units; ranks past the last set bit give some position < 32 W (filler)."""
    pop = lax.population_count(words).astype(jnp.int32)
    cum = jnp.cumsum(pop, axis=-1)  # inclusive running count, over N / 32 words only
    w = jax.vmap(lambda c, t: jnp.searchsorted(c, t, side="right", method="scan"))(cum, rank)
    w = jnp.minimum(w, words.shape[-1] - 1)
    word = jnp.take_along_axis(words, w, axis=-1)
    t = rank - (jnp.take_along_axis(cum, w, axis=-1) - jnp.take_along_axis(pop, w, axis=-1))
    bit = jnp.zeros_like(rank)
    for step in (16, 8, 4, 2, 1):  # the largest bit with at most t set bits below it
        cand = bit + step
        below = word & ((jnp.uint32(1) << cand.astype(jnp.uint32)) - jnp.uint32(1))
        bit = jnp.where(lax.population_count(below).astype(jnp.int32) <= t, cand, bit)
    return w * _WORD + bit


def select(scores, top_k: int, count):
    """The top count[...] tokens of scores [..., N] (ties to the lower position), as top_k
    indices [..., top_k] int32; ranks >= count are filler (a valid index) to be masked. The
    same set as lax.top_k and double_sparse.select_by_threshold (module docstring, step 2)."""
    lead, n = scores.shape[:-1], scores.shape[-1]
    # Materialized once: otherwise XLA fuses the scores' transpose and mask into each of the
    # 32 bisection passes and recomputes them every pass (8.7 ms instead of 3.9 ms at 32k).
    keys = lax.optimization_barrier(_order_key(scores).reshape(-1, n))
    count = jnp.broadcast_to(jnp.asarray(count, jnp.int32), lead).reshape(-1)
    kth = _kth_key(keys, count)[:, None]
    above, tied = _pack(keys > kth), _pack(keys == kth)
    n_above = jnp.sum(lax.population_count(above), axis=-1, dtype=jnp.int32)[:, None]
    rank = jnp.broadcast_to(jnp.arange(top_k, dtype=jnp.int32), (keys.shape[0], top_k))
    # Every token above the k-th score, then the first tied ones (all tied are >= n_above).
    idx = jnp.where(rank < n_above, _select_bits(above, rank),
                    _select_bits(tied, jnp.maximum(rank - n_above, 0)))
    return jnp.minimum(idx, n - 1).reshape(lead + (top_k,))


def sparse_attention(q, k, v, idx, count, *, scale=None):
    """Exact softmax over the selected tokens (f32 accumulation), by a row gather.

    q [B, S, Hq, D]; k, v [B, N, Hkv, D]; idx [B, S, Hsel, K] with Hsel = Hkv (shared by each
    group) or Hq (per query head); count [B, S, Hsel]: ranks >= count are ignored.
    """
    b, s, hq, d = q.shape
    n, hkv = k.shape[1], k.shape[2]
    hsel, top_k = idx.shape[2], idx.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kv_head = jnp.arange(hsel) // (hsel // hkv)
    rows = ((jnp.arange(b)[:, None, None, None] * n + idx) * hkv
            + kv_head[None, None, :, None]).reshape(-1)
    # idx is in bounds by construction (select clips it): no clamping pass over the indices.
    get = lambda x: x.reshape(b * n * hkv, d).at[rows].get(  # noqa: E731
        mode="promise_in_bounds").reshape(b, s, hsel, top_k, d)
    ks, vs = get(k), get(v)
    qg = q.reshape(b, s, hsel, hq // hsel, d).astype(jnp.float32) * scale
    logits = jnp.einsum("bshgd,bshkd->bshgk", qg, ks.astype(jnp.float32))
    valid = jnp.arange(top_k) < count[..., None]
    logits = jnp.where(valid[:, :, :, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bshgk,bshkd->bshgd", probs, vs.astype(jnp.float32))
    return out.reshape(b, s, hq, d).astype(q.dtype)


def double_sparse(q, k, v, k_label, channels, kv_len, count, *, top_k: int, label_scale=None,
                  scale=None, select_per="kv_group"):
    """The whole step; kv_len [B, S], count [B, S] (ranks used per query, <= top_k)."""
    scores = label_scores(q, k_label, channels, kv_len, label_scale, select_per)
    count = jnp.broadcast_to(count[:, :, None], scores.shape[:3])
    idx = select(scores, top_k, count)
    return sparse_attention(q, k, v, idx, count, scale=scale)

"""Sliding-window attention in plain jnp/lax whose cost grows with T * w, not T^2.

The "xla_blocked" implementation of ``window_attention`` (MSWA, arXiv 2501.01039: one causal
window per head): a middle ground between the dense reference and the Pallas kernels that runs
anywhere XLA does (CPU training and tests, or a backend without Pallas). Autodiff gives the
backward pass.

Scheme (the "current + previous n blocks" local attention of many codebases). Queries are cut
into blocks of c; with window w a query block needs its own key block and the
n = ceil((w - 1) / c) blocks before it. Keys are padded on the left by n blocks and the n + 1
shifted views are stacked, so each query block gets a key context of (n + 1) c instead of T.
Heads whose windows give the same (c, n) form one group (their windows may still differ: the
mask takes each head's own window), so a multi-scale layer costs a few groups, not one per head.

Within a group every (batch, head, query block) row is independent: c x (n + 1) c scores, a
position mask built from iotas (plus the segment mask for packed documents), softmax, and the
weighted sum, written for one row and vmapped into batched matmuls. A group whose context would
span the whole sequence uses dense causal attention instead, which is then no more expensive.
On CPU the pads and context stacking cost about as much as the matmuls, so fewer, larger groups
and blocks pay (see :func:`default_block`).
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.window_inputs import check_inputs, resolve_scale

# Finite "minus infinity": the row max subtracted in softmax makes exp() of it exactly 0, and
# no row is empty (every query sees itself), so no NaN can appear.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def default_block(window: int) -> int:
    """Query block for a window: half of it as a power of two, clamped to [32, 256].

    The key context per query is (ceil((w - 1) / c) + 1) c, about w + c, so smaller blocks waste
    fewer pairs, while small ones make many small matmuls; on CPU, fwd+bwd at T = 4096 was
    fastest near c = w / 2 and never below 32 (16 was 1.3-2x slower than 32 for w <= 64).
    """
    c = 32
    while c * 2 <= min(window // 2, 256):
        c *= 2
    return c


def _attend(s, mask, v, out_dtype):
    """Masked softmax over the last axis of f32 scores, then the weighted sum of v."""
    p = jax.nn.softmax(jnp.where(mask, s, _MASK_VALUE), axis=-1)
    return jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(out_dtype)


def _dense_group(q, k, v, windows, seg, scale):
    """Causal attention within each head's window over the whole sequence (windows ~ T).

    q, k, v: [b, h, t, d] heads-major (k, v already matched to q's heads); windows: per head.
    """
    t = q.shape[2]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    i = lax.broadcasted_iota(jnp.int32, (t, t), 0)
    j = lax.broadcasted_iota(jnp.int32, (t, t), 1)
    w = jnp.asarray(windows, jnp.int32)[:, None, None]
    mask = ((j <= i) & (j > i - w))[None]
    if seg is not None:
        mask = mask & (seg[:, :, None] == seg[:, None, :])[:, None]
    p = jax.nn.softmax(jnp.where(mask, s, _MASK_VALUE), axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(q.dtype)


def _blocked_group(q, k, v, windows, seg, scale, c, nb):
    """Window attention for heads sharing query block c and nb previous key blocks.

    q, k, v: [b, h, t, d] heads-major with t % c == 0 (k, v matched to q's heads); windows: one
    per head, each <= nb * c + 1; seg: [b, t] or None.
    """
    b, h, t, d = q.shape
    n = t // c
    span = (nb + 1) * c

    def context(x, fill):
        # Along axis 2 (time): block i of the result holds positions [(i - nb) c, (i + 1) c).
        pad = [(0, 0)] * x.ndim
        pad[2] = (nb * c, 0)
        xp = jnp.pad(x, pad, constant_values=fill)
        views = [lax.slice_in_dim(xp, s_ * c, s_ * c + t, axis=2) for s_ in range(nb + 1)]
        views = [x_.reshape(x.shape[:2] + (n, c) + x.shape[3:]) for x_ in views]
        return jnp.concatenate(views, axis=3)  # [..., n, span, ...]

    rows = b * h * n  # one row = one (batch, head, query block)
    xs = {"q": q.reshape(rows, c, d),
          "k": context(k, 0).reshape(rows, span, d),
          "v": context(v, 0).reshape(rows, span, d),
          # Static per-row data: the query block's index and the head's window.
          "blk": jnp.asarray(np.tile(np.arange(n, dtype=np.int32), b * h)),
          "w": jnp.asarray(np.repeat(np.tile(np.asarray(windows, np.int32), b), n))}
    if seg is not None:
        seg_h = jnp.broadcast_to(seg[:, None, :], (b, h, t))
        xs["seg_q"] = seg_h.reshape(rows, c)
        xs["seg_k"] = context(seg_h[..., None], -1).reshape(rows, span)

    # Key u of a row sits at position (blk - nb) c + u; query a at blk c + a.
    u = lax.broadcasted_iota(jnp.int32, (c, span), 1)
    rel = u - nb * c - lax.broadcasted_iota(jnp.int32, (c, span), 0)  # key pos - query pos

    def row(x):
        s = jnp.dot(x["q"], x["k"].T, preferred_element_type=jnp.float32) * scale
        mask = (rel <= 0) & (rel > -x["w"]) & (x["blk"] * c + u >= nb * c)
        if seg is not None:  # left padding (-1) is position-masked anyway
            mask &= x["seg_q"][:, None] == x["seg_k"][None, :]
        return _attend(s, mask, x["v"], q.dtype)

    return jax.vmap(row)(xs).reshape(b, h, t, d)


def _group_heads(windows, t: int, block):
    """[(kind, c, nb, heads)]: heads sharing a query block c and nb previous key blocks.

    "dense" when the context would cover the whole (padded) sequence anyway. Merging groups
    further (one span for all heads) measured no faster on CPU, so groups are exact.
    """
    groups: dict[tuple, list[int]] = {}
    for h, w in enumerate(windows):
        c = int(block) if block is not None else default_block(w)
        nb = -(-(w - 1) // c)  # previous key blocks a query block of c needs for window w
        dense = (nb + 1) * c >= -(-t // c) * c
        groups.setdefault(("dense", 0, 0) if dense else ("blocked", c, nb), []).append(h)
    return [key + (heads,) for key, heads in groups.items()]


def _take_heads(x, heads):
    """x[:, heads] for static heads (axis 1): a slice when they are contiguous, else a gather."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return lax.slice_in_dim(x, heads[0], heads[0] + len(heads), axis=1)
    return jnp.take(x, np.asarray(heads), axis=1)


def blocked_window_attention(q, k, v, windows, *, segment_ids=None, scale=None, block=None):
    """Window attention computed block by block; same contract as ``window_attention``.

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with Hkv dividing Hq.
      windows: static tuple of ints >= 1, one per q head (w >= T: plain causal).
      segment_ids: optional int [B, T] for packed documents.
      scale: softmax scale, default 1/sqrt(D).
      block: query block size for every head; default per window (:func:`default_block`).
        T is right-padded to a multiple of it (exact, by causality).

    Returns:
      [B, T, Hq, D] in q's dtype; softmax in f32.
    """
    windows = check_inputs(q, k, v, windows, segment_ids)
    if block is not None and (isinstance(block, bool) or not isinstance(block, numbers.Integral)
                              or block < 1):
        raise ValueError(f"block={block!r} must be a positive int.")
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    scale = resolve_scale(scale, d)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    windows = tuple(min(w, t) for w in windows)

    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # heads-major: [B, H, T, D]
    outs, order = [], []
    for kind, c, nb, heads in _group_heads(windows, t, block):
        # GQA: q head h uses kv head h // g (duplicated here when a kv head serves several).
        qg = _take_heads(qh, heads)
        kg, vg = (_take_heads(x, [h // g for h in heads]) for x in (kh, vh))
        group_windows = [windows[h] for h in heads]
        if kind == "dense":
            out = _dense_group(qg, kg, vg, group_windows, segment_ids, scale)
        else:
            t_pad = -(-t // c) * c
            seg = segment_ids
            if t_pad != t:  # right padding is exact: no real query sees a later key
                qg, kg, vg = (jnp.pad(x, [(0, 0), (0, 0), (0, t_pad - t), (0, 0)])
                              for x in (qg, kg, vg))
                seg = None if seg is None else jnp.pad(seg, [(0, 0), (0, t_pad - t)])
            out = _blocked_group(qg, kg, vg, group_windows, seg, scale, c, nb)[:, :, :t]
        outs.append(out)
        order += heads
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    if order != list(range(hq)):
        out = jnp.take(out, np.argsort(order), axis=1)
    return jnp.swapaxes(out, 1, 2)

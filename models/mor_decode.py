"""Causal decoding for Mixture-of-Recursions (arXiv 2507.10524): the body of MoR.extend
(models/mor.py), with per-depth caches (models/mor_cache.py) and depth-wise batching.

The official repository released no inference code; this is built from the paper (App. A and
D). A token continues into recursion r iff its router says sigmoid(s_r) >= 0.5 and it took
recursion r-1 (expert-choice), iff its chosen depth is >= r (token-choice), or always (the
Recursive Transformer). Under recursion-wise caching the token appends its K/V to recursion
r's caches and attends to the entries there (tokens of its row that reached recursion r at
earlier positions, and itself); under KV sharing every token runs recursion 1 and deeper
recursions' queries read recursion 1's positional caches.

Depth-wise batching (one-token steps): recursion r gathers the active rows into a static
capacity (config.decode_rows), runs the K shared blocks on them, and scatters back; active
rows beyond the capacity exit early and are counted in cache.overflow (models/mor.py).
"""
import jax
import jax.numpy as jnp

from models.core.attention import attention_prefixes, masked_attention, single_query_attention
from models.mor_cache import append_slots


def apply_block(block, x, positions, attend):
    """A pre-norm Transformer block whose attention is `attend(q, k, v) -> [B, S, H, D]`
    (the caller decides which keys the queries see)."""
    q, k, v = block.attn.project(block.attn_norm(x), positions)
    x = x + block.attn.output(attend(q, k, v))
    return x + block.mlp(block.mlp_norm(x))


def extend(model, tokens, cache, num_tokens):
    """MoR.extend: tokens [B, S] at each row's length -> (logits [B, S, V], cache)."""
    c = model.config
    b, s = tokens.shape
    lengths = cache.lengths
    n = (jnp.full((b,), s, jnp.int32) if num_tokens is None
         else jnp.asarray(num_tokens, jnp.int32))
    # Padding past num_tokens[b] is routed nowhere, so it never enters a per-depth cache.
    real = jnp.arange(s)[None, :] < n[:, None]
    positions = lengths[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
    x = model.embed(tokens)
    ends = list(cache.ends)
    if c.has_ends:
        x, ends[0] = model.first.extend(x, ends[0], lengths)
    x, cache = _recursions(model, x, positions, real, cache)
    if c.has_ends:
        x, ends[1] = model.last.extend(x, ends[1], lengths)
    return model.logits(x), cache.replace(ends=tuple(ends), lengths=lengths + n)


def _recursions(model, x, positions, real, cache):
    c = model.config
    b, s, _ = x.shape
    share = cache.shared_kv
    caps = c.decode_rows(b)
    depth_kv = [list(layers) for layers in cache.depth_kv]
    pos, count = list(cache.depth_pos), list(cache.depth_count)
    routed, overflow = cache.routed, cache.overflow
    if c.router == "token":
        _, choice, gate = model.router(x, c.resolved_alpha)
    h, active = x, real
    for r in range(c.num_recursions):
        if c.router == "expert":
            score = model.router(r, x)
            active = active & (score >= 0)          # sigmoid(s) >= 0.5
            gate = c.resolved_alpha * jax.nn.sigmoid(score)
        elif c.router == "token":
            active = real & (choice >= r + 1)
        rows = None
        if s == 1 and caps[r] < b and not (share and r == 0):
            # Depth-wise batching: the first caps[r] active rows, `b` marking empty slots.
            rows = jnp.nonzero(active[:, 0], size=caps[r], fill_value=b)[0].astype(jnp.int32)
            kept = jnp.zeros((b,), bool).at[rows].set(True, mode="drop")
            overflow = overflow.at[r].add(jnp.sum(active[:, 0] & ~kept, dtype=jnp.int32))
            active = active & kept[:, None]
        routed = routed.at[r].add(jnp.sum(active, dtype=jnp.int32))
        if share and r == 0:
            y = h   # every token computes recursion 1: deeper recursions read its K/V
            for j, u in enumerate(c.schedule[0]):
                y, depth_kv[0][j] = model.shared[u].extend(y, depth_kv[0][j], cache.lengths)
        else:
            y, kv_r, pos_r, count_r = _depth(
                model, r, h, positions, active, rows, depth_kv[0 if share else r],
                None if share else pos[r], None if share else count[r], cache.lengths)
            if not share:
                depth_kv[r], pos[r], count[r] = kv_r, pos_r, count_r
        if c.router == "expert":
            h = x = jnp.where(active[..., None], x + gate[..., None].astype(x.dtype) * y, x)
        else:
            h = jnp.where(active[..., None], y, h)
    if c.router == "token":
        x = x + gate[..., None].astype(x.dtype) * h
    elif c.router == "none":
        x = h
    return x, cache.replace(depth_kv=tuple(tuple(layers) for layers in depth_kv),
                            depth_pos=tuple(pos), depth_count=tuple(count), routed=routed,
                            overflow=overflow)


def _depth(model, r, x, positions, active, rows, kvs, pos_r, count_r, lengths):
    """Recursion r's K blocks on the rows `rows` (int32 [C], `B` = empty slot; None = all
    rows) of x [B, S, d]. Recursion-wise caching (pos_r given): the active tokens append to
    recursion r's caches. KV sharing (pos_r None): queries read recursion 1's caches kvs.
    Returns (x with the rows' outputs scattered in, kvs, pos_r, count_r)."""
    b, s, _ = x.shape
    max_length = kvs[0].max_length
    if rows is None:
        xs, ps, act, wr = x, positions, active, jnp.arange(b, dtype=jnp.int32)

        def gather(a, n):
            return a[:, :n]
    else:
        rc = jnp.minimum(rows, b - 1)
        xs, ps, act, wr = x[rc], positions[rc], active[rc] & (rows < b)[:, None], rows

        def gather(a, n):
            return a[rc, :n]

    if pos_r is not None:
        slots, new_count = append_slots(count_r if rows is None else count_r[rc], act,
                                        max_length)
        pos_r = pos_r.at[wr[:, None], slots].set(ps, mode="drop")
        count_r = count_r.at[wr].set(new_count, mode="drop")
        needed = jnp.max(new_count)
    else:
        needed = jnp.max(lengths) + s
    attention = single_query_attention if s == 1 else masked_attention
    kvs = list(kvs)
    for j, u in enumerate(model.config.schedule[r]):
        def attend(q, k, v, j=j):
            if pos_r is not None:
                layer = kvs[j]
                kvs[j] = layer.replace(
                    k=layer.k.at[wr[:, None], slots].set(k.astype(layer.k.dtype), mode="drop"),
                    v=layer.v.at[wr[:, None], slots].set(v.astype(layer.v.dtype), mode="drop"))

            def over(n):
                if pos_r is not None:   # valid slots holding earlier-or-equal positions
                    key_pos = gather(pos_r, n)
                    mask = ((jnp.arange(n)[None, None, :] < new_count[:, None, None])
                            & (key_pos[:, None, :] <= ps[:, :, None]))
                else:                   # a positional cache: slot = position
                    mask = jnp.arange(n)[None, None, :] <= ps[:, :, None]
                return attention(q, gather(kvs[j].k, n).astype(q.dtype),
                                 gather(kvs[j].v, n).astype(q.dtype), mask[:, None])
            return _over_prefix(over, max_length, needed)
        xs = apply_block(model.shared[u], xs, ps, attend)
    y = xs if rows is None else x.at[rows].set(xs, mode="drop")
    return y, tuple(kvs), pos_r, count_r


def _over_prefix(fn, max_length, needed):
    """fn(n) over the smallest cache prefix n that holds `needed` entries: a few static
    branches, one chosen at run time (as models/core/attention.py does for the Transformer),
    so a step's attention cost follows the rows' history, not max_length."""
    sizes = attention_prefixes(max_length)
    branch = jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < needed)
    return jax.lax.switch(branch, [lambda n=n: fn(n) for n in sizes])

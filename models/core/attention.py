"""Multi-head attention with grouped-query heads, optional per-head causal windows, and a ragged
KV cache. The single door through which models reach the attention kernels.

Grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245): `n_heads` query heads share
`n_kv_heads` key/value heads. A window w (per query head) means query i sees keys j with
i - w < j <= i, i.e. w keys including itself; None means full causal attention. This is the
kernel convention of pallas_kernels/window_attention.py (an MSWA window w_h is w_h + 1 here).

Training (`__call__`) picks one of three interchangeable implementations:
  xla_dense    masked dense attention in jnp (the reference; O(T^2))
  xla_blocked  chunked local attention that only computes in-window key blocks (O(T*w))
  pallas       the Pallas flash kernel with per-head windows (GPU/TPU; interpret mode on CPU)
Decoding (`extend`) attends S new queries over the cache with dense masking (the mask is what
makes ragged rows correct), restricted to the smallest power-of-two cache prefix that holds the
longest row.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.core import double_sparse
from models.core.kv_cache import LayerKV
from models.core.params import param
from models.core.rope import apply_rope

ATTENTION_IMPLS = ("xla_dense", "xla_blocked", "pallas")
_NEG_INF = -1e30  # finite, so a fully masked row yields a harmless uniform average, not NaN


def attention_prefixes(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Cache prefix lengths decoding attention chooses from: powers of two from `smallest`
    below max_length, then max_length itself."""
    sizes, n = [], smallest
    while n < max_length:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (max_length,)


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; valid: {ATTENTION_IMPLS}")
    return impl


def window_mask(q_pos: jax.Array, k_pos: jax.Array, windows: Sequence[int | None]) -> jax.Array:
    """Causal (and windowed) visibility [B, H, S, K] from query and key positions [B, S], [B, K]."""
    delta = q_pos[:, None, :, None] - k_pos[:, None, None, :]  # [B, 1, S, K]
    causal = delta >= 0
    big = jnp.iinfo(jnp.int32).max
    w = jnp.asarray([big if x is None else x for x in windows], jnp.int32)[None, :, None, None]
    return causal & (delta < w)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     *, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale + mask) v with grouped heads, softmax in f32.

    q [B, S, Hq, D]; k, v [B, K, Hkv, D]; mask bool, broadcastable to [B, Hq, S, K].
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, s, hkv, groups, d)
    logits = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * scale
    mask = jnp.broadcast_to(mask, (b, hq, s, k.shape[1])).reshape(b, hkv, groups, s, -1)
    logits = jnp.where(mask, logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, s, hq, d).astype(q.dtype)


def single_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                           *, scale: float | None = None) -> jax.Array:
    """masked_attention for one query per row (q [B, 1, Hq, D]), the shape of a decode step.

    The same softmax(q k^T * scale + mask) v, written as broadcast products reduced over D
    and over the keys instead of batched dots: for a single query XLA:CPU runs those dots as
    many tiny matrix products, and this form was 1.5x faster at batch 8 over 512 keys.
    """
    b, s, hq, d = q.shape
    if s != 1:
        raise ValueError(f"single_query_attention takes one query per row, got S={s}")
    hkv, t = k.shape[2], k.shape[1]
    groups = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, 1, hkv, groups, d).astype(jnp.float32) * scale
    logits = jnp.sum(qg * k.astype(jnp.float32)[:, :, :, None, :], axis=-1)  # [B, T, Hkv, G]
    mask = jnp.broadcast_to(mask, (b, hq, 1, t)).reshape(b, hkv, groups, t)
    logits = jnp.where(mask.transpose(0, 3, 1, 2), logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=1)
    out = jnp.sum(probs[..., None] * v.astype(jnp.float32)[:, :, :, None, :], axis=1)
    return out.reshape(b, 1, hq, d).astype(q.dtype)


class Attention(nnx.Module):
    """GQA self-attention with RoPE and optional per-query-head windows."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
                 windows: Sequence[int | None] | None = None, rope_theta: float = 10000.0,
                 impl: str = "xla_dense", out_stddev: float = 0.02, dtype=jnp.float32,
                 double_sparse: "double_sparse.DoubleSparseSettings | None" = None,
                 rngs: nnx.Rngs):
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        windows = tuple(windows) if windows is not None else (None,) * n_heads
        if len(windows) != n_heads:
            raise ValueError(f"got {len(windows)} windows {windows} for n_heads={n_heads}")
        for w in windows:
            if w is not None and w < 1:
                raise ValueError(f"attention window {w} is below 1 (windows={windows})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.windows = windows
        self.rope_theta = rope_theta
        self.impl = check_impl(impl)
        self.dtype = dtype
        # Decode attention: None = dense; else Double Sparsity (models/core/double_sparse.py),
        # whose calibrated channels set_channels attaches.
        if double_sparse is not None and any(w is not None for w in windows):
            raise ValueError(f"double-sparse decode attention needs full attention; got "
                             f"windows={windows}")
        self.double_sparse = double_sparse
        self.ds_channels = None
        self.q_proj = param(rngs, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"))
        self.k_proj = param(rngs, (d_model, n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.v_proj = param(rngs, (d_model, n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.o_proj = param(rngs, (n_heads, head_dim, d_model), ("heads", "head_dim", "embed"),
                            stddev=out_stddev)

    def project(self, x: jax.Array, positions: jax.Array):
        """q, k, v [B, S, heads, head_dim] for x [B, S, d], rotated to `positions` [B, S]."""
        x = x.astype(self.dtype)
        q = jnp.einsum("bsd,dhk->bshk", x, self.q_proj[...].astype(self.dtype))
        k = jnp.einsum("bsd,dhk->bshk", x, self.k_proj[...].astype(self.dtype))
        v = jnp.einsum("bsd,dhk->bshk", x, self.v_proj[...].astype(self.dtype))
        return (apply_rope(q, positions, theta=self.rope_theta),
                apply_rope(k, positions, theta=self.rope_theta), v)

    def output(self, attn: jax.Array) -> jax.Array:
        """Merges heads [B, S, H, D] back to the model width."""
        return jnp.einsum("bshk,hkd->bsd", attn, self.o_proj[...].astype(self.dtype))

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Full-sequence causal attention over x [B, T, d] (training and scoring)."""
        q, k, v = self.project(x, positions)
        if self.impl == "xla_dense":
            idx = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            mask = window_mask(idx, idx, self.windows)
            if segment_ids is not None:
                mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
            out = masked_attention(q, k, v, mask)
        else:
            # Imported here so models that never use the kernels do not pay for Pallas imports.
            from pallas_kernels.blocked_attention import blocked_window_attention
            from pallas_kernels.window_attention import window_attention
            t = x.shape[1]
            windows = tuple(t if w is None else min(w, t) for w in self.windows)
            if self.impl == "xla_blocked":
                out = blocked_window_attention(q, k, v, windows, segment_ids=segment_ids)
            else:
                out = window_attention(
                    q, k, v, windows, segment_ids=segment_ids, impl="pallas",
                    interpret=jax.default_backend() == "cpu")
        return self.output(out)

    def extend(self, x: jax.Array, kv: LayerKV, lengths: jax.Array) -> tuple[jax.Array, LayerKV]:
        """Appends S tokens x [B, S, d] to each row at its own offset lengths[b]; attends to the
        row's cached history plus the new tokens."""
        s = x.shape[1]
        positions = lengths[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
        q, k, v = self.project(x, positions)
        kv = kv.write(k, v, positions)

        def attend(n: int) -> jax.Array:
            """Attention over the first n cache slots (n covers every row's visible keys)."""
            key_pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (x.shape[0], n))
            # key_pos <= query position excludes both future keys and stale entries past the
            # row's length (which can only sit at positions >= lengths[b]).
            mask = window_mask(positions, key_pos, self.windows)
            attention = single_query_attention if s == 1 else masked_attention
            return attention(q, kv.k[:, :n].astype(self.dtype), kv.v[:, :n].astype(self.dtype),
                             mask)

        # Decoding fills the cache gradually, so scoring all max_length slots every step wastes
        # most of the work (at batch 8 it dominated the tiny model's step). Attend over the
        # smallest power-of-two prefix that holds the longest row instead: a few static
        # branches, one chosen at run time, with no recompilation as rows grow.
        sizes = attention_prefixes(kv.max_length)
        if self.double_sparse is not None:
            out, kv = double_sparse.extend_attention(self, q, k, kv, positions, attend, sizes)
            if out is not None:  # None: a prompt, attended densely below
                return self.output(out), kv
        needed = jnp.max(lengths) + s
        branch = jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < needed)
        out = jax.lax.switch(branch, [lambda n=n: attend(n) for n in sizes])
        return self.output(out), kv

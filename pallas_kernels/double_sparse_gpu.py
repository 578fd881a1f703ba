"""GPU-style (Triton lowering) Pallas kernel for Double Sparsity's sparse step (arXiv 2408.07092).

The step after label scoring: given the top-k token ids of each (query, KV-head group), attend
with an exact softmax over only those tokens, all D channels. Equivalent to DoubleSparse's
``fwd_sparse_no_mask`` Triton kernel (kernels.md §3b), with two changes:

- **GQA-aware**: one program per *KV head* handles its G query heads, which share the selected
  tokens (see double_sparse.py for the group semantics), so each gathered K/V row is loaded
  once and used G times. The G heads are padded to a power of two >= 16 so the scores are one
  (G, D) x (D, kb) ``dot`` (Triton's tl.dot needs dims >= 16; DoubleSparse's per-head kernel,
  with M = 1, used a broadcast-multiply instead).
- **Split over the selected tokens** (flash-decoding): grid (B * S, Hkv, n_split); program j
  gathers ranks [j * kb, (j + 1) * kb) with the integer-array indexer ``k_ref[idx, :]`` (Pallas
  Triton lowers it to pointer offsets), keeps a partial (acc, max, sum), and the partials are
  merged in XLA. With few rows and heads this is what fills the GPU's SMs.

K/V stay in the cache's [B, N, Hkv, D] layout; the block is one row's whole sequence for one
KV head (a pointer on GPU), gathered in-kernel. Query rows of a multi-token call (speculative
verification, S > 1) map to their batch row in the index_map, so the cache is never copied.
Verified only in interpret mode on CPU; Triton lowering and speed are not verified on a GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: no inf - inf = NaN
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
MAX_TOKENS_PER_SPLIT = 128


def _pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def split_sizes(top_k: int, n_split: int | None = None) -> tuple[int, int]:
    """(tokens per split kb, n_split): kb a power of two >= 16 and n_split * kb >= top_k."""
    if n_split is None:
        kb = min(MAX_TOKENS_PER_SPLIT, max(_compat.TRITON_MIN_DOT_DIM, _pow2(top_k)))
    else:
        if n_split < 1:
            raise ValueError(f"n_split={n_split} must be a positive int.")
        kb = max(_compat.TRITON_MIN_DOT_DIM, _pow2(-(-top_k // n_split)))
    _compat.check_triton_block_size("tokens per split", kb)
    return kb, -(-top_k // kb)


def _kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, scale, kb,
            precision):
    j = pl.program_id(2)
    idx = idx_ref[...]                                      # [kb] token ids
    valid = j * kb + jnp.arange(kb) < cnt_ref[...]          # ranks past the budget are off
    k = k_ref[idx, :]                                       # gather [kb, Dp]
    v = v_ref[idx, :]
    s = lax.dot_general(q_ref[...], k, _NT, precision=precision,
                        preferred_element_type=jnp.float32) * scale  # [Gp, kb]
    s = jnp.where(valid[None, :], s, MASK_VALUE)
    m = s.max(axis=-1)
    p = jnp.where(valid[None, :], jnp.exp(s - m[:, None]), 0.0)
    o_ref[...] = lax.dot_general(p.astype(v.dtype), v, _NN, precision=precision,
                                 preferred_element_type=jnp.float32)
    m_ref[...] = m
    l_ref[...] = p.sum(axis=-1)


def _pad_last(x, size):
    return x if x.shape[-1] == size else jnp.pad(
        x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def sparse_attention(q, k, v, idx, count, *, scale: float, n_split: int | None = None,
                     interpret=False, num_warps: int = 4, num_stages: int = 2):
    """Exact softmax over selected tokens: q [B, S, Hq, D], k/v [B, N, Hkv, D], idx
    [B, S, Hkv, K] int32, count [B, S, Hkv] (ranks >= count ignored) -> [B, S, Hq, D]."""
    b, s, hq, d = q.shape
    n, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    top_k = idx.shape[-1]
    kb, splits = split_sizes(top_k, n_split)
    gp = max(_compat.TRITON_MIN_DOT_DIM, _pow2(g))
    dp = max(_compat.TRITON_MIN_DOT_DIM, _pow2(d))
    _compat.check_triton_array_shape("scores tile", (gp, kb))
    _compat.check_triton_array_shape("gathered K tile", (kb, dp))
    # Padding: extra ranks point at token 0 and are masked by count; extra heads are zero
    # queries whose outputs are dropped; extra channels are zeros (add nothing to q.k).
    idx = _pad_last(idx.reshape(b * s, hkv, top_k), kb * splits)
    qg = q.reshape(b * s, hkv, g, d)
    qg = jnp.pad(qg, [(0, 0), (0, 0), (0, gp - g), (0, dp - d)])
    kp, vp = _pad_last(k, dp), _pad_last(v, dp)
    precision = lax.Precision.HIGHEST if jnp.dtype(q.dtype) == jnp.float32 else None
    kv_spec = pl.BlockSpec((None, n, None, dp), lambda r, h, j: (r // s, 0, h, 0))
    part = (b * s, hkv, splits, gp)
    acc, m, l = pl.pallas_call(
        functools.partial(_kernel, scale=scale, kb=kb, precision=precision),
        grid=(b * s, hkv, splits),
        in_specs=[
            pl.BlockSpec((None, None, kb), lambda r, h, j: (r, h, j)),
            pl.BlockSpec((None, None), lambda r, h, j: (r, h)),
            pl.BlockSpec((None, None, gp, dp), lambda r, h, j: (r, h, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, dp), lambda r, h, j: (r, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda r, h, j: (r, h, j, 0)),
            pl.BlockSpec((None, None, None, gp), lambda r, h, j: (r, h, j, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(part + (dp,), jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32)],
        compiler_params=_compat.compiler_params(
            "gpu", interpret, triton=dict(num_warps=num_warps, num_stages=num_stages)),
        interpret=interpret,
        name="double_sparse_gather",
    )(idx, count.reshape(b * s, hkv).astype(jnp.int32), qg, kp, vp)
    # Flash-decoding merge of the splits. The barrier keeps XLA from re-deriving the max
    # inside the fused exp, which produced NaNs in jax's decode_attention (kernels.md §4.3, 9).
    m_all = lax.optimization_barrier(m.max(axis=2, keepdims=True))
    c = jnp.exp(m - m_all)
    denom = jnp.maximum((l * c).sum(axis=2), jnp.finfo(jnp.float32).tiny)
    out = (acc * c[..., None]).sum(axis=2) / denom[..., None]  # [B*S, Hkv, Gp, Dp]
    return out[:, :, :g, :d].reshape(b, s, hq, d).astype(q.dtype)

"""GPU-style (Triton lowering) Pallas kernels for per-head sliding-window attention.

Forward and backward of flash attention (FlashAttention-2, arXiv 2307.08691; the tiling of
FlashAttention, arXiv 2205.14135) restricted to a causal window per head, as multi-scale window
attention needs (MSWA, arXiv 2501.01039): query i of head h sees key j iff i - w_h < j <= i.

Same structure as jax's ``jax/experimental/pallas/ops/gpu/attention.py``: the grid runs over
(q block, batch, head), the whole K/V sequence of one (batch, kv head) is the block (a pointer
into GMEM on GPU), and the kernel walks kv tiles with ``lax.fori_loop`` whose *dynamic* bounds
come from the head's window, so tiles outside the window are never loaded. The walk is split in
three loops: a masked left-edge tile, unmasked interior tiles, masked diagonal tiles, so the
interior pays no mask arithmetic (as the causal loop of ``attention_mgpu`` does). The backward
has a dK/dV kernel (grid over kv blocks, loop over the q blocks whose window reaches them) and a
dQ kernel (loop as in the forward); both visit only in-window tiles.

Layout [batch, time, heads, head_dim]. Called through ``window_attention.window_attention``,
which pads T to a multiple of the blocks; this module pads head_dim to a power of two >= 16
because Triton requires power-of-two arrays and tl.dot dims >= 16.

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

# Finite "minus infinity": a fully masked row keeps max = MASK_VALUE and exp(0) is then zeroed
# explicitly, so no inf - inf = NaN appears (the value jax's flash kernels use).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a, b, dims, precision):
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def kv_block_range(i, w, bq: int, bk: int):
    """kv tiles that q block ``i`` needs under window ``w``: (lo, full_lo, full_hi, hi).

    [lo, hi) holds every tile with a visible pair; [full_lo, full_hi) the tiles every row of the
    block sees completely (no mask needed). Works on traced int32 scalars (in-kernel) and on
    Python ints (tests). Numerators are clamped to >= 0 so lax.div (truncating) is a floor.
    """
    lo = lax.div(jnp.maximum(i * bq - w + 1, 0), bk)
    hi = lax.div((i + 1) * bq + bk - 1, bk)
    # Tile kb is fully visible iff its last key <= the block's first query and its first key
    # > the block's last query - w.
    full_lo = lax.div(jnp.maximum((i + 1) * bq - w, 0) + bk - 1, bk)
    full_hi = lax.div(i * bq + 1, bk)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def q_block_range(j, w, bq: int, bk: int, num_q_blocks: int):
    """q blocks whose window reaches kv tile ``j``: (lo, full_lo, full_hi, hi), as above."""
    lo = lax.div(j * bk, bq)
    # The last query that sees key (j+1)*bk - 1 is that key + w - 1.
    hi = jnp.minimum(lax.div((j + 1) * bk + w - 2, bq) + 1, num_q_blocks)
    full_lo = lax.div((j + 1) * bk - 1 + bq - 1, bq)
    full_hi = lax.div(j * bk + w, bq)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def _mask(q_pos, k_pos, w, q_seg, k_seg):
    mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - w)
    if q_seg is not None:
        mask &= q_seg[:, None] == k_seg[None, :]
    return mask


def _split_loop(bounds, body, carry, has_segments):
    """Runs ``body(idx, carry, masked)`` over [lo, hi): masked edges, unmasked interior.

    With segment ids any tile can straddle a document boundary, so everything is masked.
    """
    lo, full_lo, full_hi, hi = bounds
    masked = functools.partial(body, masked=True)
    if has_segments:
        return lax.fori_loop(lo, hi, masked, carry)
    carry = lax.fori_loop(lo, full_lo, masked, carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, masked, carry)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
def _fwd_kernel(win_ref, q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, scale, bq, bk,
                precision):
    i = pl.program_id(0)
    w = win_ref[0]
    q = q_ref[...]
    q_pos = i * bq + jnp.arange(bq)
    q_seg = None if seg_ref is None else seg_ref[pl.ds(i * bq, bq)]

    def body(kb, carry, masked):
        acc, m_prev, l_prev = carry
        k = k_ref[pl.ds(kb * bk, bk), :]
        s = _dot(q, k, _NT, precision) * scale
        if masked:
            k_seg = None if seg_ref is None else seg_ref[pl.ds(kb * bk, bk)]
            mask = _mask(q_pos, kb * bk + jnp.arange(bk), w, q_seg, k_seg)
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        if masked:  # a row with no visible key in this tile has s == m_new == MASK_VALUE
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        v = v_ref[pl.ds(kb * bk, bk), :]
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, _NN, precision)
        return acc, m_new, alpha * l_prev + p.sum(axis=-1)

    carry = (jnp.zeros((bq, q.shape[-1]), jnp.float32),
             jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = _split_loop(kv_block_range(i, w, bq, bk), body, carry, seg_ref is not None)
    # Every row sees at least itself, so l > 0 (FlashAttention-2 §3.1.1: rescale once at the end).
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


# --------------------------------------------------------------------------------------------
# Backward: dq (loop over kv tiles) and dk/dv (loop over q tiles); delta = rowsum(dO * O).
# --------------------------------------------------------------------------------------------
def _dq_kernel(win_ref, q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, bq, bk, precision):
    i = pl.program_id(0)
    w = win_ref[0]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = i * bq + jnp.arange(bq)
    q_seg = None if seg_ref is None else seg_ref[pl.ds(i * bq, bq)]

    def body(kb, dq, masked):
        k = k_ref[pl.ds(kb * bk, bk), :]
        v = v_ref[pl.ds(kb * bk, bk), :]
        s = _dot(q, k, _NT, precision) * scale
        if masked:
            k_seg = None if seg_ref is None else seg_ref[pl.ds(kb * bk, bk)]
            mask = _mask(q_pos, kb * bk + jnp.arange(bk), w, q_seg, k_seg)
            s = jnp.where(mask, s, MASK_VALUE)  # exp(MASK - lse) underflows to exactly 0
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot(do, v, _NT, precision) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, _NN, precision)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = _split_loop(kv_block_range(i, w, bq, bk), body, dq, seg_ref is not None)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(win_ref, q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, scale, bq, bk, num_q_blocks, precision):
    j = pl.program_id(0)
    w = win_ref[0]
    k, v = k_ref[...], v_ref[...]
    k_pos = j * bk + jnp.arange(bk)
    k_seg = None if seg_ref is None else seg_ref[pl.ds(j * bk, bk)]

    def body(qb, carry, masked):
        dk, dv = carry
        rows = pl.ds(qb * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = _dot(q, k, _NT, precision) * scale
        if masked:
            q_seg = None if seg_ref is None else seg_ref[rows]
            mask = _mask(qb * bq + jnp.arange(bq), k_pos, w, q_seg, k_seg)
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp(s - lse_ref[rows][:, None])
        dv = dv + _dot(p.astype(do.dtype), do, _TN, precision)
        ds = p * (_dot(do, v, _NT, precision) - delta_ref[rows][:, None])
        return dk + _dot(ds.astype(q.dtype), q, _TN, precision), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    bounds = q_block_range(j, w, bq, bk, num_q_blocks)
    dk, dv = _split_loop(bounds, body, (zeros, zeros), seg_ref is not None)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------
def _padded_head_dim(d: int) -> int:
    return max(_compat.TRITON_MIN_DOT_DIM, pl.next_power_of_2(d))


def _pad_head_dim(x, dp):
    d = x.shape[-1]
    return x if d == dp else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])


def _check(t, block_q, block_k, dp):
    _compat.check_triton_block_size("block_q", block_q)
    _compat.check_triton_block_size("block_k", block_k)
    _compat.check_triton_block_size("head_dim (padded)", dp)
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if t % b:
            raise ValueError(f"sequence length {t} is not a multiple of {name}={b}.")
    _compat.check_triton_array_shape("scores tile", (block_q, block_k))


def _precision(dtype):
    # f32 dots in Triton default to TF32 (kernels.md §4.1, pitfall 6); ask for IEEE f32 so the
    # f32 path matches the reference. bf16 inputs are unaffected.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _win_spec():
    # One window per q head, read in-kernel as a scalar (the pattern paged_attention uses for
    # lengths). Kernels may not close over array constants, so it is an input.
    return pl.BlockSpec((1,), lambda x, b, h: (h,))


def forward(q, k, v, segment_ids, *, windows, scale, block_q, block_k, interpret,
            num_warps=None, num_stages=2):
    """Returns (out [B, T, Hq, D], lse [B, Hq, T] f32). T must be a multiple of the blocks."""
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    dp = _padded_head_dim(d)
    _check(t, block_q, block_k, dp)
    qp, kp, vp = (_pad_head_dim(x, dp) for x in (q, k, v))
    if num_warps is None:
        num_warps = 4 if dp <= 64 else 8
    kernel = functools.partial(_fwd_kernel, scale=scale, bq=block_q, bk=block_k,
                               precision=_precision(q.dtype))
    kv_spec = pl.BlockSpec((None, t, None, dp), lambda i, b_, h: (b_, 0, h // g, 0))
    out, lse = pl.pallas_call(
        kernel,
        grid=(t // block_q, b, hq),
        in_specs=[
            _win_spec(),
            pl.BlockSpec((None, block_q, None, dp), lambda i, b_, h: (b_, i, h, 0)),
            kv_spec,
            kv_spec,
            None if segment_ids is None else pl.BlockSpec((None, t), lambda i, b_, h: (b_, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_q, None, dp), lambda i, b_, h: (b_, i, h, 0)),
            pl.BlockSpec((None, None, block_q), lambda i, b_, h: (b_, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, t), jnp.float32)],
        compiler_params=_compat.compiler_params(
            "gpu", interpret, triton=dict(num_warps=num_warps, num_stages=num_stages)),
        interpret=interpret,
        name="window_attention_fwd",
    )(jnp.asarray(windows, jnp.int32), qp, kp, vp, segment_ids)
    return out[..., :d], lse


def backward(q, k, v, segment_ids, out, lse, do, *, windows, scale, block_q, block_k,
             interpret, num_warps=None, num_stages=2):
    """Returns (dq, dk, dv) for the forward above; ``lse`` is its second output."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    dp = _padded_head_dim(d)
    _check(t, block_q, block_k, dp)
    qp, kp, vp, dop = (_pad_head_dim(x, dp) for x in (q, k, v, do))
    if num_warps is None:
        num_warps = 4 if block_q * block_k < 128 * 128 else 8
    # delta_i = sum_d dO_id O_id (FlashAttention-2 Alg. 2 line 4), cheap in XLA.
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    win = jnp.asarray(windows, jnp.int32)
    params = _compat.compiler_params(
        "gpu", interpret, triton=dict(num_warps=num_warps, num_stages=num_stages))
    precision = _precision(q.dtype)
    seq = lambda x, b_, h: (b_, 0, h, 0)  # noqa: E731  (whole sequence of q head h)
    kv_seq = lambda x, b_, h: (b_, 0, h // g, 0)  # noqa: E731
    seg_spec = None if segment_ids is None else pl.BlockSpec((None, t), lambda x, b_, h: (b_, 0))
    args = (win, qp, kp, vp, segment_ids, dop, lse, delta)

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bq=block_q, bk=block_k, precision=precision),
        grid=(t // block_q, b, hq),
        in_specs=[
            _win_spec(),
            pl.BlockSpec((None, block_q, None, dp), lambda i, b_, h: (b_, i, h, 0)),
            pl.BlockSpec((None, t, None, dp), kv_seq),
            pl.BlockSpec((None, t, None, dp), kv_seq),
            seg_spec,
            pl.BlockSpec((None, block_q, None, dp), lambda i, b_, h: (b_, i, h, 0)),
            pl.BlockSpec((None, None, block_q), lambda i, b_, h: (b_, h, i)),
            pl.BlockSpec((None, None, block_q), lambda i, b_, h: (b_, h, i)),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, dp), lambda i, b_, h: (b_, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="window_attention_bwd_dq",
    )(*args)

    # dK/dV per *q* head (one program per (kv tile, q head)), then summed over each GQA group
    # in XLA: programs never write the same tile, so no atomics are needed.
    dkv_dtype = k.dtype if g == 1 else jnp.float32
    kv_tile = lambda j, b_, h: (b_, j, h // g, 0)  # noqa: E731
    out_tile = pl.BlockSpec((None, block_k, None, dp), lambda j, b_, h: (b_, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=block_q, bk=block_k,
                          num_q_blocks=t // block_q, precision=precision),
        grid=(t // block_k, b, hq),
        in_specs=[
            _win_spec(),
            pl.BlockSpec((None, t, None, dp), seq),
            pl.BlockSpec((None, block_k, None, dp), kv_tile),
            pl.BlockSpec((None, block_k, None, dp), kv_tile),
            seg_spec,
            pl.BlockSpec((None, t, None, dp), seq),
            pl.BlockSpec((None, None, t), lambda j, b_, h: (b_, h, 0)),
            pl.BlockSpec((None, None, t), lambda j, b_, h: (b_, h, 0)),
        ],
        out_specs=[out_tile, out_tile],
        out_shape=[jax.ShapeDtypeStruct((b, t, hq, dp), dkv_dtype)] * 2,
        compiler_params=params,
        interpret=interpret,
        name="window_attention_bwd_dkv",
    )(*args)
    dq = dq[..., :d]
    dk, dv = dk[..., :d], dv[..., :d]
    if g > 1:
        dk = dk.reshape(b, t, hkv, g, d).sum(3).astype(k.dtype)
        dv = dv.reshape(b, t, hkv, g, d).sum(3).astype(v.dtype)
    return dq, dk, dv

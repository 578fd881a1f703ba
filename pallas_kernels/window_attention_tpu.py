"""TPU-style (Mosaic) Pallas kernels for per-head sliding-window attention.

Forward and backward of flash attention (FlashAttention-2, arXiv 2307.08691; FlashAttention,
arXiv 2205.14135) restricted to a causal window per head for multi-scale window attention
(MSWA, arXiv 2501.01039): query i of head h sees key j iff i - w_h < j <= i.

TPU kernels cannot loop over a GMEM pointer; BlockSpec pipelining DMAs one block per grid step.
So the block structure is precomputed: at trace time (windows are static) numpy builds, per
(head, q block), the first kv block and the number of kv blocks in its window, and these tables
are scalar-prefetched (``PrefetchScalarGridSpec``) into SMEM where the kv ``index_map`` reads
them. The kv grid axis is shrunk to the largest count over all heads, not T / block_k; steps
past a row's count repeat the last block index (no new DMA) and skip compute under ``pl.when``
(the "prefetch map" idea of jax's splash attention, with one table per head so distinct
windows still shrink the grid; kernels.md §2.1, §3a). Interior blocks that every row sees
whole skip the mask arithmetic.

The backward has a dQ kernel (same tables) and a dK/dV kernel over transposed tables (per kv
block, the q blocks its keys are visible from). Online-softmax statistics, lse and delta are
lane-broadcast to 128 like jax's TPU flash kernels; segment ids are laid out as in splash
attention: q ids [B, T, 128], kv ids [B, T/bk, 8, bk], both tile-legal for any block size.

Layout: the public API is [B, T, H, D]; the wrappers transpose to [B, H, T, D] so the tiled
dims are (T, D). Verified only in interpret mode on CPU (``interpret=True`` and the TPU
simulator ``pltpu.InterpretParams``); Mosaic lowering and speed are not verified on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _compat

LANES = _compat.TPU_LANES
SUBLANES = _compat.TPU_SUBLANES
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite, so no inf - inf = NaN
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


# --------------------------------------------------------------------------------------------
# Static block tables (numpy, at trace time).
# --------------------------------------------------------------------------------------------
def fwd_tables(t: int, bq: int, bk: int, windows):
    """Per (head, q block): first kv block, number of kv blocks; and the max count (grid)."""
    i = np.arange(t // bq)
    start = np.stack([np.maximum(i * bq - w + 1, 0) // bk for w in windows]).astype(np.int32)
    count = ((i + 1) * bq - 1) // bk - start + 1
    return start, count.astype(np.int32), int(count.max())


def dkv_tables(t: int, bq: int, bk: int, windows):
    """Per (head, kv block): first q block, number of q blocks that see it; and the max."""
    j = np.arange(t // bk)
    start = np.broadcast_to((j * bk) // bq, (len(windows), j.size)).astype(np.int32)
    last = np.stack([np.minimum(((j + 1) * bk + w - 2) // bq, t // bq - 1) for w in windows])
    count = last - start + 1
    return start, count.astype(np.int32), int(count.max())


def _fully_visible(q0, k0, w, bq, bk):
    """Every query of [q0, q0 + bq) sees every key of [k0, k0 + bk): no mask needed."""
    return jnp.logical_and(k0 + bk - 1 <= q0, k0 > q0 + bq - 1 - w)


def _mask(q0, k0, w, bq, bk, qseg_ref, kseg_ref):
    q_pos = q0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = k0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask = (k_pos <= q_pos) & (k_pos > q_pos - w)
    if qseg_ref is not None:
        mask &= qseg_ref[...][:, :1] == kseg_ref[...][:1, :]
    return mask


def _run_step(active, full, step, has_seg):
    """Calls ``step(masked)`` when the step is in the table, unmasked for interior blocks."""
    if has_seg:  # any block may straddle a document boundary
        pl.when(active)(lambda: step(True))
        return
    pl.when(jnp.logical_and(active, full))(lambda: step(False))
    pl.when(jnp.logical_and(active, jnp.logical_not(full)))(lambda: step(True))


def _split_seg(rest, has_seg):
    return (rest[:2], rest[2:]) if has_seg else ((None, None), rest)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
def _fwd_kernel(start_ref, count_ref, win_ref, q_ref, k_ref, v_ref, *rest, scale, bq, bk,
                n_steps, has_seg, precision):
    (qseg_ref, kseg_ref), (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split_seg(rest, has_seg)
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    kv_blk = start_ref[h, i] + j
    w = win_ref[h]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full_like(m_sc, MASK_VALUE)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    def step(masked):
        v = v_ref[...]
        s = lax.dot_general(q_ref[...], k_ref[...], _NT, precision=precision,
                            preferred_element_type=jnp.float32) * scale
        if masked:
            mask = _mask(i * bq, kv_blk * bk, w, bq, bk, qseg_ref, kseg_ref)
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...][:, :1]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        p = jnp.exp(s - m_new)
        if masked:  # a row with nothing visible yet has s == m_new == MASK_VALUE
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_new = alpha * l_sc[...][:, :1] + p.sum(axis=-1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + lax.dot_general(
            p.astype(v.dtype), v, _NN, precision=precision, preferred_element_type=jnp.float32)
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(l_new, l_sc.shape)

    _run_step(j < count_ref[h, i], _fully_visible(i * bq, kv_blk * bk, w, bq, bk), step,
              has_seg)

    @pl.when(j == n_steps - 1)
    def _finalize():
        l = l_sc[...][:, :1]  # > 0: every row sees itself
        o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(m_sc[...][:, :1] + jnp.log(l), lse_ref.shape)


def _dq_kernel(start_ref, count_ref, win_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *rest, scale, bq, bk, n_steps, has_seg, precision):
    (qseg_ref, kseg_ref), (dq_ref, dq_sc) = _split_seg(rest, has_seg)
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    kv_blk = start_ref[h, i] + j
    w = win_ref[h]

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    def step(masked):
        k = k_ref[...]
        s = lax.dot_general(q_ref[...], k, _NT, precision=precision,
                            preferred_element_type=jnp.float32) * scale
        if masked:
            s = jnp.where(_mask(i * bq, kv_blk * bk, w, bq, bk, qseg_ref, kseg_ref), s,
                          MASK_VALUE)
        p = jnp.exp(s - lse_ref[...][:, :1])
        dp = lax.dot_general(do_ref[...], v_ref[...], _NT, precision=precision,
                             preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...][:, :1])
        dq_sc[...] += lax.dot_general(ds.astype(k.dtype), k, _NN, precision=precision,
                                      preferred_element_type=jnp.float32)

    _run_step(j < count_ref[h, i], _fully_visible(i * bq, kv_blk * bk, w, bq, bk), step,
              has_seg)

    @pl.when(j == n_steps - 1)
    def _finalize():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(start_ref, count_ref, win_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *rest, scale, bq, bk, n_steps, has_seg, precision):
    (qseg_ref, kseg_ref), (dk_ref, dv_ref, dk_sc, dv_sc) = _split_seg(rest, has_seg)
    h, jk, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    q_blk = start_ref[h, jk] + i
    w = win_ref[h]

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros_like(dk_sc)
        dv_sc[...] = jnp.zeros_like(dv_sc)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        s = lax.dot_general(q, k_ref[...], _NT, precision=precision,
                            preferred_element_type=jnp.float32) * scale
        if masked:
            s = jnp.where(_mask(q_blk * bq, jk * bk, w, bq, bk, qseg_ref, kseg_ref), s,
                          MASK_VALUE)
        p = jnp.exp(s - lse_ref[...][:, :1])  # (bq, bk)
        dv_sc[...] += lax.dot_general(p.astype(do.dtype), do, _TN, precision=precision,
                                      preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v_ref[...], _NT, precision=precision,
                             preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...][:, :1])
        dk_sc[...] += lax.dot_general(ds.astype(q.dtype), q, _TN, precision=precision,
                                      preferred_element_type=jnp.float32)

    _run_step(i < count_ref[h, jk], _fully_visible(q_blk * bq, jk * bk, w, bq, bk), step,
              has_seg)

    @pl.when(i == n_steps - 1)
    def _finalize():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------
def _spec(name, block_shape, array_shape, index_map):
    """A BlockSpec whose shape has passed the Mosaic tiling check (interpret mode skips it)."""
    _compat.check_tpu_block_shape(name, block_shape, array_shape)
    return pl.BlockSpec(block_shape, index_map)


def _check(t, block_q, block_k):
    _compat.check_tpu_block_size("block_q", block_q)
    _compat.check_tpu_block_size("block_k", block_k)
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if t % b:
            raise ValueError(f"sequence length {t} is not a multiple of {name}={b}.")


def _segment_layouts(segment_ids, block_k):
    """q ids lane-broadcast [B, T, 128]; kv ids [B, T/bk, 8, bk] (sublane-broadcast blocks)."""
    b, t = segment_ids.shape
    seg = segment_ids.astype(jnp.int32)
    q_seg = jnp.broadcast_to(seg[:, :, None], (b, t, LANES))
    kv_seg = jnp.broadcast_to(seg.reshape(b, t // block_k, 1, block_k),
                              (b, t // block_k, SUBLANES, block_k))
    return q_seg, kv_seg


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _heads_major(*xs):
    return tuple(jnp.swapaxes(x, 1, 2) for x in xs)  # [B, T, H, D] <-> [B, H, T, D]


def forward(q, k, v, segment_ids, *, windows, scale, block_q, block_k, interpret):
    """Returns (out [B, T, Hq, D], lse [B, Hq, T, 128] f32). T must be a multiple of blocks."""
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    _check(t, block_q, block_k)
    qt, kt, vt = _heads_major(q, k, v)
    start, count, n_steps = fwd_tables(t, block_q, block_k, windows)
    has_seg = segment_ids is not None

    def q_map(b_, h, i, j, start_ref, count_ref, win_ref):
        return b_, h, i, 0

    def kv_map(b_, h, i, j, start_ref, count_ref, win_ref):
        # Steps past the list repeat the last block: same index, so no new DMA.
        return b_, h // g, start_ref[h, i] + jnp.minimum(j, count_ref[h, i] - 1), 0

    in_specs = [_spec("q", (None, None, block_q, d), qt.shape, q_map),
                _spec("k", (None, None, block_k, d), kt.shape, kv_map),
                _spec("v", (None, None, block_k, d), vt.shape, kv_map)]
    inputs = [qt, kt, vt]
    if has_seg:
        q_seg, kv_seg = _segment_layouts(segment_ids, block_k)
        in_specs += [
            _spec("q segment ids", (None, block_q, LANES), q_seg.shape,
                  lambda b_, h, i, j, *_: (b_, i, 0)),
            _spec("kv segment ids", (None, None, SUBLANES, block_k), kv_seg.shape,
                  lambda b_, h, i, j, *refs: (b_, kv_map(b_, h, i, j, *refs)[2], 0, 0))]
        inputs += [q_seg, kv_seg]
    lse_shape = (b, hq, t, LANES)
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, bq=block_q, bk=block_k, n_steps=n_steps,
                          has_seg=has_seg, precision=_precision(q.dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, hq, t // block_q, n_steps),
            in_specs=in_specs,
            out_specs=[_spec("out", (None, None, block_q, d), qt.shape, q_map),
                       _spec("lse", (None, None, block_q, LANES), lse_shape, q_map)],
            scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                            pltpu.VMEM((block_q, LANES), jnp.float32),
                            pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype),
                   jax.ShapeDtypeStruct(lse_shape, jnp.float32)],
        compiler_params=_compat.compiler_params(
            "tpu", interpret, tpu=dict(dimension_semantics=_SEMANTICS)),
        interpret=interpret,
        name="window_attention_fwd",
    )(jnp.asarray(start), jnp.asarray(count), jnp.asarray(windows, jnp.int32), *inputs)
    return jnp.swapaxes(out, 1, 2), lse


def backward(q, k, v, segment_ids, out, lse, do, *, windows, scale, block_q, block_k,
             interpret):
    """Returns (dq, dk, dv) for the forward above; ``lse`` is its second output."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    _check(t, block_q, block_k)
    qt, kt, vt, dot_ = _heads_major(q, k, v, do)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    delta = jnp.broadcast_to(delta[..., None], lse.shape)
    has_seg = segment_ids is not None
    win = jnp.asarray(windows, jnp.int32)
    params = _compat.compiler_params("tpu", interpret, tpu=dict(dimension_semantics=_SEMANTICS))
    precision = _precision(q.dtype)
    seg = _segment_layouts(segment_ids, block_k) if has_seg else ()

    # dq: grid and tables as in the forward.
    start, count, n_steps = fwd_tables(t, block_q, block_k, windows)
    q_map = lambda b_, h, i, j, s_ref, c_ref, w_ref: (b_, h, i, 0)  # noqa: E731

    def kv_map(b_, h, i, j, s_ref, c_ref, w_ref):
        return b_, h // g, s_ref[h, i] + jnp.minimum(j, c_ref[h, i] - 1), 0

    def q_rows(name, shape):
        return _spec(name, (None, None, block_q, shape[-1]), shape, q_map)

    in_specs = [q_rows("q", qt.shape),
                _spec("k", (None, None, block_k, d), kt.shape, kv_map),
                _spec("v", (None, None, block_k, d), vt.shape, kv_map),
                q_rows("do", dot_.shape), q_rows("lse", lse.shape), q_rows("delta", lse.shape)]
    if has_seg:
        in_specs += [
            _spec("q segment ids", (None, block_q, LANES), seg[0].shape,
                  lambda b_, h, i, j, *_: (b_, i, 0)),
            _spec("kv segment ids", (None, None, SUBLANES, block_k), seg[1].shape,
                  lambda b_, h, i, j, *refs: (b_, kv_map(b_, h, i, j, *refs)[2], 0, 0))]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bq=block_q, bk=block_k, n_steps=n_steps,
                          has_seg=has_seg, precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hq, t // block_q, n_steps), in_specs=in_specs,
            out_specs=q_rows("dq", qt.shape),
            scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="window_attention_bwd_dq",
    )(jnp.asarray(start), jnp.asarray(count), win, qt, kt, vt, dot_, lse, delta, *seg)

    # dk, dv: per kv block, the q blocks that see it (transposed tables). Produced per q head
    # and summed over each GQA group in XLA, so no two grid steps write the same block.
    start, count, n_steps = dkv_tables(t, block_q, block_k, windows)

    def qo_map(b_, h, jk, i, s_ref, c_ref, w_ref):
        return b_, h, s_ref[h, jk] + jnp.minimum(i, c_ref[h, jk] - 1), 0

    kv_own = lambda b_, h, jk, i, *_: (b_, h // g, jk, 0)  # noqa: E731
    out_own = lambda b_, h, jk, i, *_: (b_, h, jk, 0)  # noqa: E731
    def q_tiles(name, shape):
        return _spec(name, (None, None, block_q, shape[-1]), shape, qo_map)

    in_specs = [q_tiles("q", qt.shape),
                _spec("k", (None, None, block_k, d), kt.shape, kv_own),
                _spec("v", (None, None, block_k, d), vt.shape, kv_own),
                q_tiles("do", dot_.shape), q_tiles("lse", lse.shape),
                q_tiles("delta", lse.shape)]
    if has_seg:
        in_specs += [
            _spec("q segment ids", (None, block_q, LANES), seg[0].shape,
                  lambda b_, h, jk, i, *refs: (b_, qo_map(b_, h, jk, i, *refs)[2], 0)),
            _spec("kv segment ids", (None, None, SUBLANES, block_k), seg[1].shape,
                  lambda b_, h, jk, i, *_: (b_, jk, 0, 0))]
    dkv_shape = (b, hq, t, d)
    dkv_dtype = k.dtype if g == 1 else jnp.float32
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=block_q, bk=block_k, n_steps=n_steps,
                          has_seg=has_seg, precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hq, t // block_k, n_steps), in_specs=in_specs,
            out_specs=[_spec("dk", (None, None, block_k, d), dkv_shape, out_own),
                       _spec("dv", (None, None, block_k, d), dkv_shape, out_own)],
            scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32),
                            pltpu.VMEM((block_k, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(dkv_shape, dkv_dtype)] * 2,
        compiler_params=params, interpret=interpret, name="window_attention_bwd_dkv",
    )(jnp.asarray(start), jnp.asarray(count), win, qt, kt, vt, dot_, lse, delta, *seg)
    if g > 1:
        dk = dk.reshape(b, hkv, g, t, d).sum(2).astype(k.dtype)
        dv = dv.reshape(b, hkv, g, t, d).sum(2).astype(v.dtype)
    dq, dk, dv = _heads_major(dq, dk, dv)
    return dq, dk, dv

"""Tests for pallas_kernels.window_attention: the reference, both Pallas kernel styles, errors.

The Pallas kernels (GPU/Triton style and TPU/Mosaic style) run in interpret mode on CPU and are
compared, forward and backward (dq, dk, dv through jax.vjp with a random cotangent), with the
dense f32 reference, which is itself anchored to a numpy loop and to jax.nn.dot_product_attention.
Shapes are tiny so the whole file stays fast; each case packs several edge cases together
(window 1, windows not multiples of the block, a window >= T, GQA, batch > 1, block_q != block_k).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import window_attention, window_attention_reference
from pallas_kernels import window_attention_gpu, window_attention_tpu
from tests import tolerances


@functools.cache
def _inputs(b, t, hq, hkv, d, dtype, segments, seed=0):
    # numpy's generator: jax.random would compile a sampler for every new shape.
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)  # noqa: E731
    q, k, v = normal(b, t, hq, d), normal(b, t, hkv, d), normal(b, t, hkv, d)
    do = normal(b, t, hq, d)
    seg = None
    if segments:  # packed documents: a new document starts with probability 1/16 per token
        seg = jnp.asarray(np.cumsum(rng.random((b, t)) < 1 / 16, axis=1), jnp.int32)
    return q, k, v, do, seg


# Jitted once per config: eager op-by-op dispatch would compile every primitive separately.
_reference = jax.jit(window_attention_reference, static_argnames=("windows", "scale"))


def _assert_close(actual, expected, tol, what):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               rtol=tol, atol=tol, err_msg=what)


def _check_against_reference(fn, q, k, v, do, seg, windows):
    """Compares fn's output and (dq, dk, dv) with the f32 reference's, same cotangent."""
    tol = tolerances.for_dtype(q.dtype)
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    grads = vjp(do)
    assert out.dtype == q.dtype and out.shape == q.shape
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    ref = functools.partial(window_attention_reference, windows=windows, segment_ids=seg)
    ref_out, ref_grads = jax.jit(lambda *x: (ref(*x[:3]), jax.vjp(ref, *x[:3])[1](x[3])))(*f32)
    _assert_close(out, ref_out, tol, "out")
    for name, g, r, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        _assert_close(g, r, tol, name)


# --------------------------------------------------------------------------------------------
# The reference, anchored.
# --------------------------------------------------------------------------------------------
def _numpy_loop_attention(q, k, v, windows, seg, scale):
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    out = np.zeros(q.shape, np.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                keys = [j for j in range(t) if i - windows[h] < j <= i
                        and (seg is None or seg[bi, i] == seg[bi, j])]
                logits = np.array([q[bi, i, h] @ k[bi, j, h // g] * scale for j in keys])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[bi, i, h] = sum(pj * v[bi, j, h // g] for pj, j in zip(p, keys))
    return out


@pytest.mark.parametrize("segments", [False, True])
def test_reference_matches_numpy_loop(segments):
    q, k, v, _, seg = _inputs(2, 12, 4, 2, 8, jnp.float32, segments, seed=1)
    windows = (1, 3, 5, 20)
    expected = _numpy_loop_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), windows,
                                     None if seg is None else np.asarray(seg), 8 ** -0.5)
    actual = _reference(q, k, v, windows, segment_ids=seg)
    _assert_close(actual, expected, tolerances.F32, "reference vs numpy loop")


@pytest.mark.parametrize("w", [1, 7, 64, 1000])
def test_reference_matches_jax_local_window(w):
    # An independent oracle for a single window: splash-style inclusive (w - 1, 0) window.
    q, k, v, _, _ = _inputs(1, 64, 2, 2, 16, jnp.float32, False)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                            local_window_size=(min(w, 64) - 1, 0),
                                            implementation="xla")
    _assert_close(_reference(q, k, v, (w, w)), expected, tolerances.F32, "ref")


def test_auto_on_cpu_is_the_reference():
    q, k, v, _, seg = _inputs(1, 32, 2, 1, 16, jnp.float32, True)
    out = jax.jit(functools.partial(window_attention, windows=(4, 9), segment_ids=seg))(q, k, v)
    np.testing.assert_array_equal(out, _reference(q, k, v, (4, 9), segment_ids=seg))


# --------------------------------------------------------------------------------------------
# Pallas kernels in interpret mode, both styles.
# --------------------------------------------------------------------------------------------
# name: (B, T, Hq, Hkv, D, dtype, segments, windows, block_q, block_k)
_CASES = {
    # window 1, 20 (not a block multiple), 64 (a multiple), 200 >= T; GQA; B > 1; bq > bk.
    "multiscale_gqa": (2, 128, 4, 2, 32, jnp.float32, False, (1, 20, 64, 200), 32, 16),
    # packed documents; one kv head per q head; bq < bk.
    "segments": (2, 128, 4, 4, 16, jnp.float32, True, (5, 33, 128, 16), 16, 32),
    # bf16 inputs; multi-query (every q head shares one kv head); no blocks given, so the
    # default tiles, with T = 72 padded to a tile multiple and head_dim 24 padded for Triton.
    "bf16_mqa_defaults": (1, 72, 4, 1, 24, jnp.bfloat16, False, (3, 50, 8, 100), None, None),
}


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", list(_CASES))
def test_pallas_matches_reference(case, backend):
    b, t, hq, hkv, d, dtype, segments, windows, bq, bk = _CASES[case]
    q, k, v, do, seg = _inputs(b, t, hq, hkv, d, dtype, segments)
    fn = functools.partial(window_attention, windows=windows, segment_ids=seg, impl="pallas",
                           interpret=True, backend=backend, block_q=bq, block_k=bk)
    _check_against_reference(fn, q, k, v, do, seg, windows)


def test_auto_with_interpret_runs_the_kernel():
    q, k, v, _, _ = _inputs(1, 32, 2, 1, 16, jnp.float32, False)
    out = jax.jit(functools.partial(window_attention, windows=(4, 9), interpret=True,
                                    block_q=16, block_k=16))(q, k, v)
    _assert_close(out, _reference(q, k, v, (4, 9)), tolerances.F32, "auto")


def test_tpu_kernel_under_tpu_simulator():
    # pltpu.InterpretParams simulates VMEM/DMA and checks output-block revisiting, which the
    # plain interpreter does not (kernels.md §4.3).
    q, k, v, do, seg = _inputs(1, 64, 2, 1, 16, jnp.float32, False)
    windows = (8, 40)
    fn = functools.partial(window_attention, windows=windows, impl="pallas", backend="tpu",
                           interpret=pltpu.InterpretParams(), block_q=16, block_k=32)
    _check_against_reference(fn, q, k, v, do, seg, windows)


# --------------------------------------------------------------------------------------------
# Block skipping: the kernels visit exactly the blocks that intersect the window.
# --------------------------------------------------------------------------------------------
def _visible(t, w):
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    return (j <= i) & (j > i - w)


@pytest.mark.parametrize("t,bq,bk", [(64, 16, 16), (64, 32, 8), (48, 8, 16)])
@pytest.mark.parametrize("w", [1, 5, 16, 23, 40, 1000])
def test_block_ranges_are_exact(t, bq, bk, w):
    vis = _visible(t, w)
    tiles = vis.reshape(t // bq, bq, t // bk, bk)
    any_pair, all_pairs = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))  # [q block, kv block]
    nq, nk = t // bq, t // bk

    def as_sets(bounds):
        lo, full_lo, full_hi, hi = (np.asarray(x) for x in bounds)
        return set(range(lo, hi)), set(range(full_lo, full_hi))

    for i in range(nq):  # forward / dq: kv blocks per q block (Triton loop bounds)
        visit, full = as_sets(window_attention_gpu.kv_block_range(i, w, bq, bk))
        assert visit == set(np.flatnonzero(any_pair[i])), (i, visit)
        assert full == set(np.flatnonzero(all_pairs[i])), (i, full)
    for j in range(nk):  # dk/dv: q blocks per kv block
        visit, full = as_sets(window_attention_gpu.q_block_range(j, w, bq, bk, nq))
        assert visit == set(np.flatnonzero(any_pair[:, j])), (j, visit)
        assert full == set(np.flatnonzero(all_pairs[:, j])), (j, full)
    start, count, n_steps = window_attention_tpu.fwd_tables(t, bq, bk, (w,))
    for i in range(nq):  # TPU scalar-prefetch tables
        assert set(range(start[0, i], start[0, i] + count[0, i])) == set(
            np.flatnonzero(any_pair[i]))
    assert n_steps == any_pair.sum(axis=1).max()
    start, count, n_steps = window_attention_tpu.dkv_tables(t, bq, bk, (w,))
    for j in range(nk):
        assert set(range(start[0, j], start[0, j] + count[0, j])) == set(
            np.flatnonzero(any_pair[:, j]))


def test_tpu_grid_shrinks_to_the_widest_window():
    # T=512, 64-blocks: windows up to 100 need at most 3 kv blocks per q block, not 8.
    _, _, n_steps = window_attention_tpu.fwd_tables(512, 64, 64, (1, 30, 100))
    assert n_steps == 3


# --------------------------------------------------------------------------------------------
# Errors name the bad value.
# --------------------------------------------------------------------------------------------
def _small():
    q, k, v, _, _ = _inputs(1, 32, 2, 1, 16, jnp.float32, False)
    return q, k, v


@pytest.mark.parametrize("kwargs,match", [
    (dict(impl="flash"), r"Unknown impl 'flash'.*'reference'.*'xla_blocked'.*'pallas'"),
    (dict(windows=(4,)), r"windows has 1 entries .* q has 2 heads"),
    (dict(windows=(4, 0)), r"windows\[1\]=0"),
    (dict(windows=(4, -3)), r"windows\[1\]=-3"),
    (dict(windows=(4, 2.5)), r"windows\[1\]=2.5"),
    (dict(windows=jnp.array([4, 4])), r"static tuple"),
    (dict(segment_ids=jnp.zeros((1, 31), jnp.int32)), r"segment_ids has shape \(1, 31\)"),
    (dict(segment_ids=jnp.zeros((1, 32), jnp.float32)), r"segment_ids has dtype float32"),
    (dict(impl="pallas", interpret=True, backend="gpu", block_q=48), r"block_q=48"),
    (dict(impl="pallas", interpret=True, backend="gpu", block_k=8), r"block_k=8"),
    (dict(impl="pallas", interpret=True, backend="tpu", block_q=12), r"block_q=12"),
    (dict(impl="pallas", interpret=True, backend="cuda"), r"backend 'cuda'"),
    (dict(impl="pallas", interpret=False), r"interpret=True"),
    (dict(impl="xla_blocked", block_q=0), r"block=0"),
])
def test_bad_arguments_raise(kwargs, match):
    q, k, v = _small()
    kwargs = dict(dict(windows=(4, 8)), **kwargs)
    with pytest.raises(ValueError, match=match):
        window_attention(q, k, v, kwargs.pop("windows"), **kwargs)


def test_dtypes_must_match():
    q, k, v = _small()
    with pytest.raises(ValueError, match="float32, bfloat16, float32"):
        window_attention(q, k.astype(jnp.bfloat16), v, (4, 8))


def test_heads_must_divide():
    q = jnp.zeros((1, 16, 3, 16))
    k = jnp.zeros((1, 16, 2, 16))
    with pytest.raises(ValueError, match="3 heads, which is not a multiple of the 2 kv heads"):
        window_attention(q, k, k, (4, 4, 4))

"""Tests for pallas_kernels.double_sparse: the reference, both Pallas kernel styles, errors.

The reference is anchored to a numpy loop (label scores, per-group or per-head top-k, softmax
over the chosen tokens) and to dense attention when every token is chosen; the CPU path
(impl="xla") to both, with integer labels and ties. The GPU-style kernel (exact
Double Sparsity) and the TPU-style kernel (block granularity, compared with the reference over
the *same blocks*) run in interpret mode on fresh random inputs, f32 at 1e-5 and bf16 at 2e-2.
Shapes are tiny: each case packs GQA, B > 1, several queries per row (verification), ragged
kv lengths and per-query budgets together.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import double_sparse as ds
from pallas_kernels import double_sparse_gpu, double_sparse_tpu, double_sparse_xla
from tests import tolerances


@functools.cache
def _inputs(b, s, hq, hkv, n, d, r, dtype, seed=0):
    # Fresh random inputs per case (numpy: jax.random would compile per shape). A few outlier
    # channels dominate q.k, as in real models, so labels carry the ranking.
    rng = np.random.default_rng(seed)
    boost = np.ones(d, np.float32)
    boost[rng.choice(d, r, replace=False)] = 4.0
    q = jnp.asarray(rng.standard_normal((b, s, hq, d), np.float32) * boost, dtype)
    k = jnp.asarray(rng.standard_normal((b, n, hkv, d), np.float32) * boost, dtype)
    v = jnp.asarray(rng.standard_normal((b, n, hkv, d), np.float32), dtype)
    channels = jnp.asarray(np.stack([rng.permutation(d)[:r] for _ in range(hkv)]), jnp.int32)
    kv_len = jnp.asarray(rng.integers(n // 4, n + 1, (b, s)), jnp.int32)
    return q, k, v, channels, kv_len


def _close(actual, expected, tol, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               rtol=tol, atol=tol, err_msg=what)


def _numpy_double_sparse(q, k, v, channels, kv_len, top_k, num_selected, per_head=False,
                         labels=None):
    """per_head: each query head selects its own tokens (select_per="query_head"); labels
    [B, N, Hkv, r] (dequantized) replace k[..., channels] in the scores when given."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    lab = None if labels is None else np.asarray(labels, np.float64)
    out = np.zeros(q.shape)
    for bi in range(b):
        for si in range(s):
            n = int(kv_len[bi, si])
            for kh in range(hkv):
                ch = np.asarray(channels[kh])
                heads = range(kh * g, (kh + 1) * g)
                keys = k[bi, :n, kh][:, ch] if lab is None else lab[bi, :n, kh]
                scores = [[q[bi, si, h, ch] @ keys[j] for j in range(n)] for h in heads]
                budget = min(top_k, int(num_selected[bi, si]))
                group = np.argsort(-np.max(scores, axis=0), kind="stable")[:budget]
                for i, h in enumerate(heads):
                    chosen = (np.argsort(-np.asarray(scores[i]), kind="stable")[:budget]
                              if per_head else group)
                    logits = np.array([q[bi, si, h] @ k[bi, j, kh] for j in chosen]) / np.sqrt(d)
                    p = np.exp(logits - logits.max())
                    out[bi, si, h] = (p / p.sum()) @ v[bi, chosen, kh]
    return out


# Jitted once: eager op-by-op dispatch would compile every primitive separately.
_ref = jax.jit(ds.double_sparse_reference, static_argnames=("top_k", "selection", "select_per"))
_xla = jax.jit(ds.double_sparse_attention, static_argnames=("top_k", "impl", "select_per"))


def test_reference_matches_numpy_loop():
    q, k, v, channels, kv_len = _inputs(2, 2, 4, 2, 32, 8, 3, jnp.float32, seed=1)
    num = jnp.asarray([[5, 12], [32, 1]], jnp.int32)
    out = _ref(q, k, v, ds.make_labels(k, channels), channels, kv_len, top_k=12,
               num_selected=num)
    expected = _numpy_double_sparse(q, k, v, channels, np.asarray(kv_len), 12, np.asarray(num))
    _close(out, expected, tolerances.F32)


@pytest.mark.parametrize("select_per,bits", [("kv_group", 4), ("query_head", 8)])
def test_xla_path_matches_numpy_loop_and_reference(select_per, bits):
    # The CPU path (impl="xla": matmul scores, bisection + bit-packed selection, row gather)
    # against the numpy loop and the jnp reference: GQA, ragged kv lengths, 3 queries per row,
    # per-query budgets, integer labels (4-bit labels give tied scores).
    q, k, v, channels, kv_len = _inputs(2, 3, 4, 2, 80, 8, 3, jnp.float32, seed=11)
    num = jnp.asarray([[5, 40, 17], [80, 1, 33]], jnp.int32)
    labels, scale = ds.make_labels(k, channels), None
    if bits < 16:
        labels, scale = ds.quantize_labels(labels, bits)
    args = (q, k, v, labels, channels, kv_len)
    kw = dict(top_k=40, num_selected=num, label_scale=scale, select_per=select_per)
    out = _xla(*args, impl="xla", **kw)
    _close(out, _ref(*args, **kw), tolerances.F32)
    dequantized = labels if scale is None else np.asarray(labels) * np.asarray(scale)[..., None]
    expected = _numpy_double_sparse(q, k, v, channels, np.asarray(kv_len), 40, np.asarray(num),
                                    per_head=select_per == "query_head", labels=dequantized)
    _close(out, expected, tolerances.F32)


def test_query_head_selection_has_no_kernel_and_other_values_are_refused():
    q, k, v, channels, kv_len = _inputs(1, 1, 4, 2, 64, 16, 2, jnp.float32, seed=12)
    args = (q, k, v, ds.make_labels(k, channels), channels, kv_len)
    with pytest.raises(ValueError, match="select_per='query_head' has no Pallas kernel"):
        ds.double_sparse_attention(*args, top_k=8, impl="pallas", interpret=True,
                                   select_per="query_head")
    with pytest.raises(ValueError, match=r"unknown select_per 'token'; valid: \('kv_group'"):
        ds.double_sparse_attention(*args, top_k=8, select_per="token")


def test_all_tokens_selected_is_dense_attention():
    q, k, v, channels, kv_len = _inputs(2, 3, 4, 2, 64, 16, 2, jnp.float32, seed=2)
    out = _ref(q, k, v, ds.make_labels(k, channels), channels, kv_len, top_k=64)
    g = 2
    kf, vf = (np.repeat(np.asarray(x, np.float64), g, axis=2) for x in (k, v))
    logits = np.einsum("bshd,bnhd->bshn", np.asarray(q, np.float64), kf) / 4.0
    visible = np.arange(64)[None, None, None] < np.asarray(kv_len)[:, :, None, None]
    logits = np.where(visible, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    dense = np.einsum("bshn,bnhd->bshd", p / p.sum(-1, keepdims=True), vf)
    _close(out, dense, tolerances.F32)


@pytest.mark.parametrize("bits,overlap", [(8, 7), (4, 6)])
def test_integer_labels_quantize_per_token_and_keep_the_ranking(bits, overlap):
    q, k, _, channels, kv_len = _inputs(1, 1, 4, 2, 64, 16, 4, jnp.float32, seed=3)
    labels = ds.make_labels(k, channels)
    qi, scale = ds.quantize_labels(labels, bits)
    top_level = 2 ** (bits - 1) - 1
    assert qi.dtype == jnp.int8 and scale.shape == labels.shape[:3]
    assert np.abs(np.asarray(qi)).max() == top_level  # each token's largest label hits it
    # Symmetric rounding: every label is within half a step of its own token's scale.
    err = np.abs(np.asarray(qi, np.float32) * np.asarray(scale)[..., None] - np.asarray(labels))
    assert np.all(err <= np.asarray(scale)[..., None] / 2 + 1e-7)
    scores = jax.jit(ds.label_scores)
    dequantized = qi.astype(jnp.float32) * scale[..., None]
    quantized = scores(q, qi, channels, kv_len, scale)
    _close(quantized, scores(q, dequantized, channels, kv_len, None), tolerances.F32)
    top = lambda x: set(np.asarray(lax.top_k(x, 8)[1]).ravel().tolist())  # noqa: E731
    exact, approx = top(scores(q, labels, channels, kv_len, None)), top(quantized)
    assert len(exact & approx) >= overlap  # of 8: integer labels barely move the top tokens


def test_quantize_labels_refuses_other_widths():
    with pytest.raises(ValueError, match=r"bits=2; valid: 4, 8"):
        ds.quantize_labels(jnp.ones((1, 2, 1, 4)), 2)


# --------------------------------------------------------------------------------------------
# Pallas kernels in interpret mode.
# --------------------------------------------------------------------------------------------
# name: (B, S, Hq, Hkv, N, D, r, dtype, top_k, n_split, int8 labels)
_GPU_CASES = {
    # GQA, 2 queries per row, top_k 24 padded to 2 splits of 16, per-query budgets.
    "gqa_verify": (2, 2, 4, 2, 128, 32, 4, jnp.float32, 24, 2, False),
    # bf16, MQA (all 4 heads share one kv head), head_dim 24 padded to 32, int8 labels.
    "bf16_mqa_int8": (1, 1, 4, 1, 64, 24, 2, jnp.bfloat16, 16, None, True),
}


@pytest.mark.parametrize("case", list(_GPU_CASES))
def test_gpu_kernel_matches_reference(case):
    b, s, hq, hkv, n, d, r, dtype, top_k, n_split, int8 = _GPU_CASES[case]
    q, k, v, channels, kv_len = _inputs(b, s, hq, hkv, n, d, r, dtype)
    labels, scale = ds.make_labels(k, channels), None
    if int8:
        labels, scale = ds.quantize_labels(labels)
    num = jnp.minimum(kv_len, jnp.asarray(np.arange(b * s).reshape(b, s) * 5 + 7, jnp.int32))
    kw = dict(top_k=top_k, num_selected=num, label_scale=scale)
    out = jax.jit(functools.partial(ds.double_sparse_attention, impl="pallas", interpret=True,
                                    backend="gpu", n_split=n_split, **kw))(
        q, k, v, labels, channels, kv_len)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = _ref(*f32, labels, channels, kv_len, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    _close(out, ref, tolerances.for_dtype(dtype))


def test_tpu_kernel_matches_reference_over_the_same_blocks():
    b, s, hq, hkv, n, d, r = 1, 2, 4, 2, 128, 32, 4
    q, k, v, channels, kv_len = _inputs(b, s, hq, hkv, n, d, r, jnp.float32, seed=4)
    labels = ds.make_labels(k, channels)
    num = jnp.asarray([[40, 17]], jnp.int32)
    kw = dict(top_k=40, num_selected=num)
    out = jax.jit(functools.partial(ds.double_sparse_attention, impl="pallas", interpret=True,
                                    backend="tpu", block_k=16, **kw))(
        q, k, v, labels, channels, kv_len)
    # The blocks the kernel attends: sorted ids, unused entries repeat the last real one (no
    # new DMA), and the token budget pays for ceil(budget / 16) blocks.
    scores = ds.label_scores(q, labels, channels, kv_len)
    count = jnp.minimum(kv_len, num)
    blk, n_valid = double_sparse_tpu.select_blocks(scores, count, 16, 3)
    assert np.all(np.diff(np.asarray(blk), axis=-1) >= 0)
    np.testing.assert_array_equal(np.asarray(n_valid)[..., 0],
                                  np.minimum(3, -(-np.asarray(count) // 16)))
    block_kw = dict(scale=d ** -0.5, block_k=16)
    same_blocks = ds.block_reference(q, k, v, blk, n_valid, kv_len, **block_kw)
    _close(out, same_blocks, tolerances.F32)
    # Block granularity is an approximation of token-level Double Sparsity (documented).
    exact = _ref(q, k, v, labels, channels, kv_len, **kw)
    assert float(jnp.abs(out - exact).max()) > 10 * tolerances.F32
    # Under the TPU simulator (scalar prefetch, DMA, output revisiting checked), one query.
    one = lambda x: x[:, :1]  # noqa: E731
    sim = double_sparse_tpu.block_attention(one(q), k, v, one(blk), one(n_valid), one(kv_len),
                                            interpret=pltpu.InterpretParams(), **block_kw)
    _close(sim, one(out), tolerances.F32)


def test_auto_on_cpu_is_the_xla_path():
    q, k, v, channels, kv_len = _inputs(1, 1, 4, 2, 64, 16, 2, jnp.float32, seed=6)
    labels = ds.make_labels(k, channels)
    auto = jax.jit(functools.partial(ds.double_sparse_attention, top_k=8))
    np.testing.assert_array_equal(auto(q, k, v, labels, channels, kv_len),
                                  _xla(q, k, v, labels, channels, kv_len, top_k=8, impl="xla"))


@pytest.mark.parametrize("select", [ds.select_by_threshold, double_sparse_xla.select])
def test_threshold_selection_finds_the_top_k_set(select):
    # Ties (rounded scores), -inf (invisible slots), negative values, budgets per row; 200
    # slots are not a multiple of the xla path's 32-token words.
    rng = np.random.default_rng(7)
    scores = np.round(rng.standard_normal((3, 2, 200)) * 4) / 4
    scores[0, :, 150:] = -np.inf
    count = np.asarray([[10, 150], [1, 37], [64, 0]], np.int32)
    got = np.asarray(jax.jit(select, static_argnums=1)(
        jnp.asarray(scores, jnp.float32), 150, jnp.asarray(count)))
    order = np.argsort(-scores, axis=-1, kind="stable")  # ties: the lower index first
    for i in np.ndindex(count.shape):
        assert sorted(got[i][:count[i]]) == sorted(order[i][:count[i]]), i


# --------------------------------------------------------------------------------------------
# Static checks and bad input.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k,n_split,kb,splits", [
    (24, None, 32, 1), (24, 2, 16, 2), (300, None, 128, 3), (5, None, 16, 1), (64, 3, 32, 2)])
def test_gpu_split_sizes_are_triton_legal(top_k, n_split, kb, splits):
    assert double_sparse_gpu.split_sizes(top_k, n_split) == (kb, splits)


def test_tpu_block_k_must_tile():
    q, k, v, channels, kv_len = _inputs(1, 1, 4, 2, 64, 16, 2, jnp.float32, seed=6)
    labels = ds.make_labels(k, channels)
    def call(block_k):  # traced only: the check fails before anything runs
        return jax.eval_shape(functools.partial(
            ds.double_sparse_attention, top_k=16, impl="pallas", interpret=True,
            backend="tpu", block_k=block_k), q, k, v, labels, channels, kv_len)

    with pytest.raises(ValueError, match="block_k=12 cannot be tiled on TPU"):
        call(12)
    with pytest.raises(ValueError, match="block_k=48 must divide the cache length 64"):
        call(48)


@pytest.mark.parametrize("r,top_k,match", [
    (17, 4, r"r=17 label channels must be an int in \[1, head_dim=16\]"),
    (2, 65, r"top_k=65 tokens is larger than the context of 64 cache slots"),
    (2, 0, r"top_k=0 must be a positive int"),
])
def test_bad_r_or_top_k(r, top_k, match):
    q, k, v, _, kv_len = _inputs(1, 1, 4, 2, 64, 16, 2, jnp.float32, seed=6)
    labels = jnp.zeros((1, 64, 2, r), jnp.float32)
    channels = jnp.zeros((2, r), jnp.int32)
    with pytest.raises(ValueError, match=match):
        ds.double_sparse_attention(q, k, v, labels, channels, kv_len, top_k=top_k)

"""Static checks: block shapes that Mosaic TPU or Triton would reject fail on CPU too.

Interpret mode accepts a (4, 32) TPU block or a 48-wide Triton tile and the bug only shows on
the device (kernels.md §4.3). These tests pin down the rules in pallas_kernels/_compat.py, that
the defaults pass them, and that the kernel wrappers run them before building a pallas_call.
"""
import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _compat, window_attention_gpu, window_attention_tpu
from pallas_kernels.window_attention import check_block_sizes, default_blocks


# --------------------------------------------------------------------------------------------
# TPU: last two block dims divisible by (8, 128) or equal to the array's.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block,array", [
    ((8, 128), (64, 256)),
    ((16, 256), (64, 256)),
    ((4, 32), (4, 32)),  # equal to the full dims
    ((None, None, 64, 40), (2, 4, 128, 40)),  # squeezed leading dims; head_dim = full dim
    ((None, 16, 128), (2, 64, 128)),
])
def test_tpu_block_shape_accepts(block, array):
    _compat.check_tpu_block_shape("x", block, array)


@pytest.mark.parametrize("block,array,match", [
    ((4, 32), (64, 128), "last .* 32 must be a multiple of 128"),
    ((4, 128), (64, 128), "second-to-last .* 4 must be a multiple of 8"),
    ((None, 128), (64, 128), "second-to-last .* 1 must be"),  # squeezed sublane dim
    ((12, 64), (48, 128), "x: block shape"),
    ((8, 128), (2, 64, 128), "rank"),
])
def test_tpu_block_shape_rejects(block, array, match):
    with pytest.raises(ValueError, match=match):
        _compat.check_tpu_block_shape("x", block, array)


@pytest.mark.parametrize("value", [8, 16, 24, 128, 512])
def test_tpu_block_size_accepts(value):
    _compat.check_tpu_block_size("block_q", value)


@pytest.mark.parametrize("value", [0, 4, 12, 100])
def test_tpu_block_size_rejects(value):
    with pytest.raises(ValueError, match=f"block_q={value} cannot be tiled on TPU"):
        _compat.check_tpu_block_size("block_q", value)


# --------------------------------------------------------------------------------------------
# Triton: power-of-two tiles, dot dims >= 16.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [16, 32, 64, 128, 256])
def test_triton_block_size_accepts(value):
    _compat.check_triton_block_size("block_k", value)


@pytest.mark.parametrize("value", [0, 8, 24, 48, 100])
def test_triton_block_size_rejects(value):
    with pytest.raises(ValueError, match=f"block_k={value} cannot be tiled by Triton"):
        _compat.check_triton_block_size("block_k", value)


def test_triton_array_shape():
    _compat.check_triton_array_shape("s", (64, 32))
    with pytest.raises(ValueError, match="size 1536"):
        _compat.check_triton_array_shape("s", (64, 24))


# --------------------------------------------------------------------------------------------
# Defaults pass; wrappers check before building the pallas_call.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("t", [1, 8, 72, 128, 1000, 32768])
def test_default_blocks_pass_the_checks(backend, t):
    bq, bk, bq_bwd, bk_bwd = default_blocks(backend, t)
    check_block_sizes(backend, block_q=bq, block_k=bk, block_q_bwd=bq_bwd, block_k_bwd=bk_bwd)


def _shapes(t=64, hq=2, hkv=1, d=32):
    q = jax.ShapeDtypeStruct((1, t, hq, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, hkv, d), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
    return q, kv, seg


@pytest.mark.parametrize("module,block_q,match", [
    (window_attention_gpu, 48, "block_q=48 cannot be tiled by Triton"),
    (window_attention_tpu, 12, "block_q=12 cannot be tiled on TPU"),
])
def test_kernel_wrappers_reject_bad_tiles_even_when_interpreted(module, block_q, match):
    q, kv, seg = _shapes(t=96)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda q_, k_, s_: module.forward(
            q_, k_, k_, s_, windows=(8, 8), scale=1.0, block_q=block_q, block_k=16,
            interpret=True), q, kv, seg)


def test_tpu_wrapper_checks_every_block_spec(monkeypatch):
    seen = []
    real = _compat.check_tpu_block_shape

    def record(name, block_shape, array_shape):
        seen.append(name)
        real(name, block_shape, array_shape)

    monkeypatch.setattr(_compat, "check_tpu_block_shape", record)
    q, kv, seg = _shapes()
    kw = dict(windows=(8, 20), scale=1.0, block_q=16, block_k=32, interpret=True)

    def fwd_bwd(q_, k_, s_):
        out, lse = window_attention_tpu.forward(q_, k_, k_, s_, **kw)
        return window_attention_tpu.backward(q_, k_, k_, s_, out, lse, out, **kw)

    jax.eval_shape(fwd_bwd, q, kv, seg)
    expected = {"q", "k", "v", "out", "lse", "do", "delta", "dq", "dk", "dv",
                "q segment ids", "kv segment ids"}
    assert expected <= set(seen)
    # With segment ids: 7 specs forward, 9 in the dq kernel, 10 in the dk/dv kernel.
    assert len(seen) == 7 + 9 + 10


def test_compiler_params_pick_the_backend():
    assert isinstance(_compat.compiler_params("tpu"), _compat.TPUCompilerParams)
    params = _compat.compiler_params("gpu", triton=dict(num_warps=4, num_stages=2))
    assert isinstance(params, _compat.TritonCompilerParams) and params.num_warps == 4
    # The TPU simulator rejects Triton params; a GPU-style kernel then passes None.
    assert _compat.compiler_params("gpu", pltpu.InterpretParams()) is None
    with pytest.raises(ValueError, match="backend 'cpu'"):
        _compat.compiler_params("cpu")

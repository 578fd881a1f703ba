"""Tests for pallas_kernels.blocked_attention (the "xla_blocked" window attention).

Outputs and gradients (dq, dk, dv through jax.vjp with a random cotangent) are compared with the
dense f32 reference; a structural test checks that no score tile spans the whole sequence, which
is what makes the cost grow with T * w rather than T^2.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import blocked_window_attention, window_attention
from pallas_kernels.blocked_attention import default_block
from tests import tolerances
from tests.pallas_kernels.test_window_attention import _check_against_reference, _inputs
from tests.pallas_kernels.test_window_attention import _reference

# name: (B, T, Hq, Hkv, D, dtype, segments, windows, block)
_CASES = {
    # window 1, 20 (not a block multiple), 64, 200 >= T (dense fallback); GQA; B > 1.
    "multiscale_gqa": (2, 128, 4, 2, 32, jnp.float32, False, (1, 20, 64, 200), None),
    # packed documents; repeated windows on non-adjacent heads (gather + un-permute); T = 100
    # padded to the explicit block 16.
    "segments_padded": (2, 100, 4, 4, 16, jnp.float32, True, (16, 5, 16, 33), 16),
    # bf16, multi-query.
    "bf16_mqa": (1, 128, 4, 1, 32, jnp.bfloat16, True, (3, 50, 96, 128), None),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_blocked_matches_reference(case):
    b, t, hq, hkv, d, dtype, segments, windows, block = _CASES[case]
    q, k, v, do, seg = _inputs(b, t, hq, hkv, d, dtype, segments)
    fn = functools.partial(blocked_window_attention, windows=windows, segment_ids=seg,
                           block=block)
    _check_against_reference(fn, q, k, v, do, seg, windows)


def test_window_attention_dispatches_to_blocked():
    q, k, v, _, seg = _inputs(1, 64, 2, 1, 16, jnp.float32, True)
    dispatched = jax.jit(functools.partial(window_attention, windows=(5, 12), segment_ids=seg,
                                           impl="xla_blocked", block_q=16))
    direct = jax.jit(functools.partial(blocked_window_attention, windows=(5, 12),
                                       segment_ids=seg, block=16))
    out = dispatched(q, k, v)
    np.testing.assert_array_equal(out, direct(q, k, v))
    np.testing.assert_allclose(out, _reference(q, k, v, (5, 12), segment_ids=seg),
                               rtol=tolerances.F32, atol=tolerances.F32)


def _dot_output_shapes(jaxpr):
    """Output shapes of every dot_general, including those inside vmapped/called sub-jaxprs."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(eqn.outvars[0].aval.shape)
        for param in eqn.params.values():
            sub = getattr(param, "jaxpr", param)
            if hasattr(sub, "eqns"):
                shapes += _dot_output_shapes(sub)
    return shapes


def test_score_tiles_never_span_the_sequence():
    t, windows = 1024, (32, 64, 64, 256)
    q = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32)
    jaxpr = jax.make_jaxpr(functools.partial(blocked_window_attention, windows=windows))(q, q, q)
    shapes = _dot_output_shapes(jaxpr.jaxpr)
    assert shapes
    # Scores are [rows, c, (n + 1) c] with (n + 1) c ~ w + c: never T wide, and in all far
    # fewer than the heads * T^2 of dense attention.
    assert max(s[-1] for s in shapes) <= 256 + default_block(256)
    assert sum(np.prod(s) for s in shapes if s[-1] != 16) < 4 * t * t / 4


@pytest.mark.parametrize("w,block", [(1, 32), (16, 32), (64, 32), (256, 128), (4096, 256)])
def test_default_block(w, block):
    assert default_block(w) == block


@pytest.mark.parametrize("block", [0, -16, 2.5, True])
def test_bad_block_raises(block):
    q, k, v, _, _ = _inputs(1, 32, 2, 1, 16, jnp.float32, False)
    with pytest.raises(ValueError, match=f"block={block!r}"):
        blocked_window_attention(q, k, v, (4, 8), block=block)

"""Tolerances for every numerical comparison in the test suite, written down once.

A tolerance here is never loosened to make a test pass: a failing comparison is a bug in the
code or in the reference, and is fixed there.
"""
import jax.numpy as jnp

# Kernels and model-vs-reference checks (DESIGN.md, "Habits").
F32 = 1e-5
BF16 = 2e-2
# Comparisons against another framework's float32 implementation (HF transformers on torch),
# where the two sides sum in different orders.
CROSS_FRAMEWORK_F32 = 1e-4


def for_dtype(dtype) -> float:
    """The tolerance for outputs computed in `dtype`."""
    return BF16 if jnp.dtype(dtype) == jnp.bfloat16 else F32

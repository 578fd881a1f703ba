"""RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467), as in Llama."""
import jax
import jax.numpy as jnp
from flax import nnx

from models.core.params import param


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in f32 whatever the compute dtype (bf16 sums drift)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("embed",), init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...]).astype(x.dtype)

"""SwiGLU feed-forward block (Shazeer 2020, arXiv 2002.05202), as in Llama."""
import jax
import jax.numpy as jnp
from flax import nnx

from models.core.params import param


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, *, out_stddev: float = 0.02, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.gate = param(rngs, (dim, hidden), ("embed", "mlp"))
        self.up = param(rngs, (dim, hidden), ("embed", "mlp"))
        self.down = param(rngs, (hidden, dim), ("mlp", "embed"), stddev=out_stddev)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        gate = x @ self.gate[...].astype(self.dtype)
        up = x @ self.up[...].astype(self.dtype)
        return (jax.nn.silu(gate) * up) @ self.down[...].astype(self.dtype)

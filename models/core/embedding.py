"""Token embedding table, optionally reused (tied) as the output projection."""
import jax
import jax.numpy as jnp
from flax import nnx

from models.core.params import param


class Embedding(nnx.Module):
    """ids -> vectors, and (when tied) vectors -> logits through the same table."""

    def __init__(self, vocab_size: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.table = param(rngs, (vocab_size, dim), ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the embedding table (tied output head)."""
        return x.astype(self.dtype) @ self.table[...].astype(self.dtype).T

"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864), Llama's "rotate half" layout.

The first and second halves of each head dimension form the rotated pairs (not interleaved
neighbours), which is the layout of Hugging Face's Llama, so weights convert without permuting.
Positions are per row and per token, so ragged batches and packed documents both work.
"""
import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0) -> jax.Array:
    """Rotates x [B, S, H, D] by positions [B, S] (int)."""
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)

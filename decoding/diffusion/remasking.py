"""LLaDA's semi-autoregressive remasking baseline (Nie et al. 2025, arXiv 2502.09992;
ML-GSAI/LLaDA @b7e6c35 `generate.py`, spec decoding.md section 4.2).

Each block of block_length positions is decoded in steps_per_block steps; step i of a block
commits k_i masked positions of that block, k_i = floor(BL / S) + [i < BL mod S], chosen by
the highest confidence (`low_confidence`: the softmax probability of the argmax token) or at
random (`random`). With S = BL this is the one-token-per-step baseline every accelerated
sampler is measured against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def rank(scores: jax.Array) -> jax.Array:
    """int32[B, L]: 0 for each row's highest score, 1 for the next, ... (ties: lower index
    first, a fixed-shape per-row top-k)."""
    return jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1,
                       stable=True).astype(jnp.int32)


def transfer_count(block_step: jax.Array, block_length: int, steps: int) -> jax.Array:
    """int32[B]: tokens step `block_step` of a block commits under LLaDA's schedule."""
    base, extra = divmod(block_length, steps)
    return (base + (block_step < extra)).astype(jnp.int32)


def topk_commit(scores: jax.Array, candidates: jax.Array, k: jax.Array) -> jax.Array:
    """bool[B, L]: the k[b] best-scoring candidates of each row (at least one if any)."""
    r = rank(jnp.where(candidates, scores, NEG_INF))
    return candidates & (r < jnp.maximum(k, 1)[:, None])


def random_scores(key: jax.Array, shape) -> jax.Array:
    """LLaDA's `random` remasking: uniform scores instead of confidences."""
    return jax.random.uniform(key, shape)

"""Fast-dLLM confidence-threshold parallel decoding (Wu et al. 2025, arXiv 2505.22618;
NVlabs/Fast-dLLM @24cc59e `llada/generate.py::get_transfer_index`, spec section 4.3).

Every step commits the masked positions of the current block whose confidence reaches tau,
and always the most confident one, so a block takes a variable number of steps (at least one,
at most block_length). Its approximate KV caches are decoding/diffusion/cache.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from decoding.diffusion.remasking import NEG_INF, rank


def threshold_commit(conf: jax.Array, candidates: jax.Array, tau: float) -> jax.Array:
    """bool[B, L]: (rank == 0) | (conf >= tau), among the candidates."""
    c = jnp.where(candidates, conf, NEG_INF)
    return candidates & ((rank(c) == 0) | (c >= tau))

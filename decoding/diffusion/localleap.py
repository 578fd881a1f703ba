"""LocalLeap: anchors and relaxed neighbourhoods (arXiv 2510.07081; rule from a third-party copy
of its `get_transfer_index` on Fast-dLLM, spec decoding.md section 4.5 (unverified against the
official friedrichor/LocalLeap repository).

High-confidence positions (conf >= kappa) are anchors; masked positions within `radius` of an
anchor commit at the lower threshold tau, on the principle that local determinism spreads
around anchors; the most confident position always commits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from decoding.diffusion.remasking import NEG_INF, rank


def near_anchor(anchor: jax.Array, radius: int) -> jax.Array:
    """bool[B, L]: within `radius` positions of some anchor (a max-pool of width 2r+1)."""
    pooled = jax.lax.reduce_window(anchor.astype(jnp.int32), 0, jax.lax.max,
                                   (1, 2 * radius + 1), (1, 1), "SAME")
    return pooled > 0


def localleap_commit(conf: jax.Array, candidates: jax.Array, kappa: float, tau: float,
                     radius: int) -> jax.Array:
    """bool[B, L]: (rank == 0) | anchor | (near an anchor & conf >= tau)."""
    c = jnp.where(candidates, conf, NEG_INF)
    anchor = c >= kappa
    near = near_anchor(anchor, radius)
    return candidates & ((rank(c) == 0) | anchor | (near & (c >= tau)))

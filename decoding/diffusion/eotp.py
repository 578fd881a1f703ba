"""End-of-text early stop (EoT rule of Learn2PD's code, arXiv 2509.25188;
ims-kdks/Learning-to-Parallel-Decoding `llada/generate.py`, spec decoding.md section 4.6), an
option of every sampler.

If any masked generation position currently predicts end-of-text, the most confident such
position and every masked position after it are filled with end-of-text at once, so padding
after the answer is never decoded step by step. (Learn2PD's learned filter: learn2pd.py.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def eot_fill(x0: jax.Array, conf: jax.Array, masked: jax.Array, eot_id: jax.Array
             ) -> jax.Array:
    """bool[B, L]: the masked positions to fill with eot_id (scalar; < 0 disables)."""
    predicts = masked & (x0 == eot_id) & (eot_id >= 0)
    best = jnp.argmax(jnp.where(predicts, conf, -jnp.inf), axis=1)
    pos = jnp.arange(x0.shape[1])[None, :]
    return masked & jnp.any(predicts, axis=1)[:, None] & (pos >= best[:, None])

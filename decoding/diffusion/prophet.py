"""Prophet early-commit "all-in" decoding (arXiv 2508.19982; pixeli99/Prophet @460afe4
`generate_earlyexit.py`, spec decoding.md section 4.4), an option of every sampler.

After each forward, before the step's own commit: the mean over the answer positions of the
gap between the top-1 and top-2 RAW logits is compared with a threshold that falls with
progress (7.5 / 5.0 / 2.5 over the first, middle and last third of the nominal steps,
progress = global step counted from 1 over the nominal total). When the gap reaches it, every
masked position of the whole generation commits its argmax and the row is done.

The answer span here is every still-masked generation position (the public code forces
"The answer is" at fixed offsets and watches the 5 tokens after it; our synthetic answers are
the whole generation). Under a block cache the gaps outside the recomputed window are those
of the last full forward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def logit_gap(logits: jax.Array) -> jax.Array:
    """f32[..., L]: top-1 minus top-2 raw logit at each position."""
    top2 = jax.lax.top_k(logits, 2)[0]
    return top2[..., 0] - top2[..., 1]


def prophet_exit(gap: jax.Array, answer: jax.Array, progress: jax.Array,
                 thresholds: tuple[float, float, float]) -> jax.Array:
    """bool[B]: rows whose mean answer gap reaches the threshold at this progress."""
    n = jnp.sum(answer, axis=1)
    mean_gap = jnp.sum(jnp.where(answer, gap, 0.0), axis=1) / jnp.maximum(n, 1)
    early, middle, late = thresholds
    thr = jnp.where(progress < 0.33, early, jnp.where(progress < 0.67, middle, late))
    return (n > 0) & (mean_gap >= thr)

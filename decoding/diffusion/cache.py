"""Fast-dLLM's approximate block KV caches (arXiv 2505.22618; NVlabs/Fast-dLLM @24cc59e
`llada/generate.py` generate_with_prefix_cache / generate_with_dual_cache, spec section 4.3),
an option of every masked-diffusion sampler but FreeDave.

A forward is summarised per position as (x0 = argmax token, conf = its probability, gap =
top-1 minus top-2 logit); samplers carry these [B, L] arrays, never the logits.

  none    every step runs the full bidirectional forward over the buffer.
  prefix  when a row enters a new block, a full forward refreshes the keys and values of every
          position; the other steps recompute only the window from the current block to the
          end of the buffer, reading the prompt and finished blocks from the cache.
  dual    as prefix, but the steps recompute only the current block: the masked suffix is read
          from the cache too.
The refreshing forward is also that step's prediction, so each step is one forward (one NFE)
either way. Rows enter blocks at different steps; whenever any active row does, the step runs
the full forward for all rows (exact for the others). Positions outside the window keep the
(x0, conf, gap) of the last full forward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from decoding.diffusion.prophet import logit_gap


def summarise(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x0 int32, conf f32, gap f32) [..., L] of logits [..., L, V]."""
    probs = jax.nn.softmax(logits, axis=-1)
    x0 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    return x0, conf, logit_gap(logits)


def full_predict(model, tokens: jax.Array, key_valid: jax.Array):
    """(x0, conf, gap) of the full forward over the buffer (padding in its own segment)."""
    logits = model(tokens, segment_ids=key_valid.astype(jnp.int32)).logits
    return summarise(logits)


def init_carry(model, batch: int, length: int, window: int) -> dict:
    """The cache carry: keys/values of every layer, the last summaries, the block each row's
    cache was refreshed for (-1: never), and the static window width (as a shape)."""
    return {"kv": model.init_cache(batch, length), "x0": jnp.zeros((batch, length), jnp.int32),
            "conf": jnp.zeros((batch, length), jnp.float32),
            "gap": jnp.zeros((batch, length), jnp.float32),
            "cached_block": jnp.full((batch,), -1, jnp.int32),
            "window": jnp.zeros((window,), jnp.int32)}


def cached_predict(model, tokens: jax.Array, key_valid: jax.Array, block: jax.Array,
                   block_start: jax.Array, active: jax.Array, carry: dict):
    """(x0, conf, gap, carry) for this step under the prefix or dual cache (the window width,
    carry["window"].shape[0], says which: the block length for dual, the rest of the buffer
    for prefix)."""
    batch, length = tokens.shape
    width = carry["window"].shape[0]
    refresh = jnp.any(active & (block != carry["cached_block"]))

    def full(carry):
        logits, kv = model.forward_with_kv(tokens, segment_ids=key_valid.astype(jnp.int32))
        x0, conf, gap = summarise(logits)
        return x0, conf, gap, kv, block

    def window(carry):
        positions = block_start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
        valid = positions < length
        safe = jnp.minimum(positions, length - 1)
        window_tokens = jnp.take_along_axis(tokens, safe, axis=1)
        logits, kv = model.window_forward(window_tokens, safe, valid, carry["kv"], key_valid)
        x0_w, conf_w, gap_w = summarise(logits)
        rows = jnp.arange(batch)[:, None]
        slots = jnp.where(valid, positions, length)
        put = lambda full, part: full.at[rows, slots].set(part, mode="drop")  # noqa: E731
        return (put(carry["x0"], x0_w), put(carry["conf"], conf_w), put(carry["gap"], gap_w),
                kv, carry["cached_block"])

    x0, conf, gap, kv, cached = jax.lax.cond(refresh, full, window, carry)
    return x0, conf, gap, {**carry, "kv": kv, "x0": x0, "conf": conf, "gap": gap,
                           "cached_block": cached}

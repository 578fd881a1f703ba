"""The parts every speculative round shares: one target call that verifies the drafts, the
commit with ragged per-row rollback, and a draft-model call that catches up on the token its
cache missed (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318).

Cache bookkeeping (per row, never a shared offset; mlx-vlm PR #1155 is what a shared offset
does to ragged batches):
- The target cache holds the committed sequence but its pending last token. A round extends it
  by `[pending, d_1..d_gamma]`, commits c = n + 1 tokens and rewinds to `lengths - 1`: at most
  gamma entries, all past the accepted prefix.
- A draft model's cache lags by at most one token: when all gamma drafts are accepted, the
  draft never processed d_gamma (vLLM PR #5765, FLy's `bonus_tok_from_target = 2`).
  `extend_from_pending` feeds a fixed-width chunk that starts at whatever the draft has not
  seen, so the catch-up costs no extra call and keeps static shapes.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from decoding import loop


def extend_from_pending(model, cache, seq: jax.Array, seq_len: jax.Array, extra: int
                        ) -> tuple[jax.Array, Any]:
    """Runs `model` so that its cache holds seq[b, :seq_len[b] + extra] and returns the logits
    f32[B, extra + 1, V] at positions seq_len - 1 .. seq_len - 1 + extra (the pending token and
    `extra` tokens already written after it, e.g. n-gram proposals).

    The cache must hold at least seq_len - 2 tokens of seq. The chunk has extra + 2 tokens
    starting at min(cache length, seq_len - 1): when the cache is one behind it re-feeds the
    token it missed; otherwise its last token is padding that the final rewind drops.
    """
    width = extra + 2
    start = jnp.minimum(cache.lengths, seq_len - 1)
    cache = model.rewind(cache, start)
    index = jnp.clip(start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :],
                     0, seq.shape[1] - 1)
    logits, cache = model.extend(jnp.take_along_axis(seq, index, axis=1), cache)
    offset = (seq_len - 1 - start)[:, None] + jnp.arange(extra + 1, dtype=jnp.int32)[None, :]
    logits = jnp.take_along_axis(logits, offset[:, :, None], axis=1)
    return logits, model.rewind(cache, seq_len + extra)


def verify_round(state: loop.LoopState, target, drafts: jax.Array, draft_len: jax.Array,
                 draft_probs: jax.Array | None, rule, rng: jax.Array) -> loop.LoopState:
    """One target call on [pending, drafts], the rule's accept decision, the commit, and the
    target cache rewound to the new lengths."""
    # Rewinding first makes the round independent of what a drafter did to the target cache
    # (self-speculation drafts through the target's own shallow layers).
    cache = target.rewind(state.caches["target"], state.lengths - 1)
    chunk = jnp.concatenate([loop.pending_token(state)[:, None], drafts], axis=1)
    logits, cache = target.extend(chunk, cache)
    return settle_round(state, target, cache, logits, drafts, draft_len, draft_probs, rule, rng)


def settle_round(state: loop.LoopState, target, cache, logits: jax.Array, drafts: jax.Array,
                 draft_len: jax.Array, draft_probs: jax.Array | None, rule, rng: jax.Array
                 ) -> loop.LoopState:
    """Given the target's logits f32[B, gamma + 1, V] over [pending, drafts] and the cache
    that computed them: the rule's accept decision, the commit, the target cache rewound to
    the new lengths, and the round's stats."""
    active = ~state.done
    n, out, counters = rule(rng, logits, drafts, draft_probs, draft_len)
    state, _ = loop.commit(state, out, n + 1)
    cache = target.rewind(cache, state.lengths - 1)

    s = state.stats
    total = lambda x: jnp.sum(jnp.where(active, x, 0)).astype(jnp.int32)  # noqa: E731
    stats = s.replace(
        target_calls=s.target_calls + 1,
        drafted=s.drafted + total(draft_len),
        accepted=s.accepted + total(n),
        counters={k: v + total(counters[k]) for k, v in s.counters.items()})
    return state.replace(caches={**state.caches, "target": cache}, stats=stats)


def add_draft_calls(state: loop.LoopState, calls) -> loop.LoopState:
    s = state.stats
    return state.replace(stats=s.replace(draft_calls=s.draft_calls + jnp.asarray(calls,
                                                                                  jnp.int32)))

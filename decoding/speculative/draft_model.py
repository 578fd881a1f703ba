"""Speculative decoding with a separate small draft model (Leviathan et al., arXiv 2211.17192;
Chen et al., arXiv 2302.01318).

Each round the draft proposes gamma tokens one at a time (gamma draft calls), the target scores
`[pending, d_1..d_gamma]` in one call, and a rule (decoding/speculative/rules.py) accepts a
prefix per row: `GreedyRule` when no sampling config is given (output equals the target's
greedy decoding), `LosslessRule` otherwise (output distributed exactly as the target's
processed sampling distribution). The draft may be any model of the protocol with the
target's vocabulary.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from decoding import loop, sampling
from decoding.speculative import verify
from decoding.speculative.base import DraftAndVerify


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """gamma: draft tokens per round (Leviathan et al. sweep 1..10; 4 is a common default)."""
    gamma: int = 4

    def __post_init__(self):
        if self.gamma < 1:
            raise ValueError(f"gamma={self.gamma} must be at least 1")


def draft_tokens(draft, cache, seq: jax.Array, seq_len: jax.Array, gamma: int, rng: jax.Array,
                 params: sampling.SamplingParams | None
                 ) -> tuple[jax.Array, jax.Array | None, Any]:
    """gamma tokens per row from `draft`, each conditioned on the previous ones.

    Returns drafts int32[B, gamma], their distributions f32[B, gamma, V] (None when greedy)
    and the draft cache, which then holds everything but the last draft.
    """
    keys = jax.random.split(rng, gamma)

    def propose(logits, key):
        if params is None:
            return sampling.greedy(logits), None
        logq = sampling.log_probs(logits, params)
        token = jax.random.categorical(key, logq, axis=-1).astype(jnp.int32)
        return token, jnp.exp(logq)

    logits, cache = verify.extend_from_pending(draft, cache, seq, seq_len, 0)
    first, first_q = propose(logits[:, 0], keys[0])

    def one(carry, key):
        cache, last = carry
        logits, cache = draft.extend(last[:, None], cache)
        token, q = propose(logits[:, 0], key)
        return (cache, token), (token, q)

    (cache, _), (rest, rest_q) = jax.lax.scan(one, (cache, first), keys[1:])
    drafts = jnp.concatenate([first[:, None], rest.T], axis=1)
    if params is None:
        return drafts, None, cache
    q = jnp.concatenate([first_q[:, None], jnp.moveaxis(rest_q, 0, 1)], axis=1)
    return drafts, q, cache


@dataclasses.dataclass(frozen=True)
class DraftModelSpeculative(DraftAndVerify):
    """Draft-model speculative decoding on the shared loop (greedy or lossless sampling)."""
    target: nnx.GraphDef
    draft: nnx.GraphDef
    config: SpeculativeConfig
    sampling: sampling.SamplingFilters | None = None  # None: greedy verification

    def step(self, state: loop.LoopState, weights) -> loop.LoopState:
        target = nnx.merge(self.target, weights["target"])
        draft = nnx.merge(self.draft, weights["draft"])
        params = sampling.bind(self.sampling, weights)
        rng, key_draft, key_rule = jax.random.split(state.rng, 3)
        drafts, q, draft_cache = draft_tokens(draft, state.caches["draft"], state.tokens,
                                              state.lengths, self.config.gamma, key_draft,
                                              params)
        state = state.replace(rng=rng, caches={**state.caches, "draft": draft_cache})
        state = verify.add_draft_calls(state, self.config.gamma)
        gamma_b = jnp.full(state.lengths.shape, self.config.gamma, jnp.int32)
        return verify.verify_round(state, target, drafts, gamma_b, q, self.rule(params),
                                   key_rule)

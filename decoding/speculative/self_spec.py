"""Self-speculative decoding by early exit (Kangaroo, arXiv 2404.18911; Equationliu/Kangaroo
@4f0949d, `evaluation/inference_kangaroo.py`).

The draft is the target itself cut after its first `exit_layer` blocks and read through its
final norm and head (`model.extend(..., exit_layer=l)`), so no second model is trained or
stored. Kangaroo's second early exit stops drafting a row as soon as the draft's confidence
(max probability) falls below a threshold: the low-confidence token is still proposed, then
that row drafts no more, so draft length adapts per row and per round. Drafting runs as a
`lax.while_loop` that ends when every row has stopped or gamma tokens exist; verification is
one full target call with the greedy or lossless rule, rows masked past their own length.

Differences from Kangaroo: no trained adapter (Kangaroo adds one attention layer between the
exit and the head; here the shallow draft reads the head directly), and verification recomputes
the first exit_layer blocks for the drafted tokens instead of resuming from the exited hidden
states, because the model protocol has no "continue from layer l" entry point. The early-exit
calls write the shallow layers' cache entries; the verification call rewrites them, so the
target cache stays exactly what plain decoding would hold.
"""
from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from decoding import loop, sampling
from decoding.speculative import rules, verify
from decoding.speculative.base import DraftAndVerify


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SelfSpecConfig:
    """Kangaroo's defaults: draft up to gamma = 6 tokens (--steps 6), stop a row after a token
    whose draft confidence is below threshold = 0.6 (the README's --threshold); exit after
    exit_layer blocks (Kangaroo uses 2 of Vicuna-7B's 32; tiny models here have 2 in all)."""
    exit_layer: int = 1
    gamma: int = 6
    threshold: float = 0.6

    def __post_init__(self):
        if self.exit_layer < 1:
            raise ValueError(f"exit_layer={self.exit_layer} must be at least 1")
        if self.gamma < 1:
            raise ValueError(f"gamma={self.gamma} must be at least 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be a probability in [0, 1]")


@dataclasses.dataclass(frozen=True)
class SelfSpeculative(DraftAndVerify):
    """Early-exit self-speculation with a per-row confidence stop."""
    target: nnx.GraphDef
    config: SelfSpecConfig
    sampling: sampling.SamplingConfig | None = None

    def _draft(self, model, cache, pending, drafting, rng):
        """Drafts up to gamma tokens per row from the early exit. Returns drafts int32[B, gamma],
        their distributions f32[B, gamma, V] (None when greedy), per-row draft lengths and the
        number of early-exit calls."""
        c = self.config
        greedy = self.sampling is None

        def call(cache, last, key):
            logits, cache = model.extend(last[:, None], cache, exit_layer=c.exit_layer)
            logits = logits[:, 0]
            if greedy:
                confidence = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
                return sampling.greedy(logits), confidence, None, cache
            probs = sampling.probs(logits, self.sampling)
            token = jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)
            return token, jnp.max(probs, axis=-1), probs, cache

        keys = jax.random.split(rng, c.gamma)
        # Every round drafts at least one token (Kangaroo checks confidence only from the
        # second draft step on); this first call also fixes the carried shapes.
        token, confidence, probs, cache = call(cache, pending, keys[0])
        drafts = jnp.zeros((pending.shape[0], c.gamma), jnp.int32).at[:, 0].set(token)
        qs = None if greedy else jnp.zeros(
            (pending.shape[0], c.gamma, probs.shape[-1]), jnp.float32).at[:, 0].set(probs)
        draft_len = drafting.astype(jnp.int32)
        drafting = drafting & (confidence >= c.threshold)

        def cond(carry):
            i, drafting = carry[0], carry[-1]
            return jnp.any(drafting) & (i < c.gamma)

        def body(carry):
            i, cache, last, drafts, qs, draft_len, drafting = carry
            token, confidence, probs, cache = call(cache, last, keys[i])
            drafts = drafts.at[:, i].set(token)
            if not greedy:
                qs = qs.at[:, i].set(probs)
            draft_len = draft_len + drafting.astype(jnp.int32)
            drafting = drafting & (confidence >= c.threshold)
            return i + 1, cache, token, drafts, qs, draft_len, drafting

        calls, _, _, drafts, qs, draft_len, _ = jax.lax.while_loop(
            cond, body, (jnp.ones((), jnp.int32), cache, token, drafts, qs, draft_len,
                         drafting))
        return drafts, qs, draft_len, calls

    def step(self, state: loop.LoopState, weights) -> loop.LoopState:
        model = nnx.merge(self.target, weights["target"])
        rng, key_draft, key_rule = jax.random.split(state.rng, 3)
        drafts, q, draft_len, calls = self._draft(
            model, state.caches["target"], loop.pending_token(state), ~state.done, key_draft)
        state = verify.add_draft_calls(state.replace(rng=rng), calls)
        # verify_round rewinds the target cache past the early-exit entries before verifying.
        return verify.verify_round(state, model, drafts, draft_len, q, self.rule, key_rule)

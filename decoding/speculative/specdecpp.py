"""SpecDec++: speculative decoding whose draft length is chosen per row and per round by an
acceptance-prediction head (arXiv 2405.19715; Kaffaljidhmah2/SpecDec_pp @937aee2,
`specdec_pp/hf_generation.py`, `num_assistant_tokens_schedule='ada'`).

The draft (models/acceptance_head.py: a draft Transformer carrying its trained head) drafts
one token per call. The call that feeds d_{k-1} also returns the head's acceptance
probability a_{k-1} of d_{k-1} and the logits of d_k, so after drafting d_k a row knows
prod(a_1..a_{k-1}), the predicted probability that every draft but the newest is accepted.
The paper's threshold policy (the optimal one of its MDP) stops the row when the predicted
probability that a rejection has already happened exceeds h:

    stop after d_k  if  1 - prod_{j<k} a_j > h   and  k >= min_draft,  or  k = gamma.

As in the official code the first draft's acceptance is not predicted (its factor is 1), so
a row always drafts at least two tokens (the README's bound is [2, 20]). Rows stop
independently; drafting is a `lax.while_loop` that ends when every row has stopped or gamma
tokens exist, so compute is saved when the whole batch stops early. Verification is the
usual one (decoding/speculative/verify.py): one target call on a fixed-width chunk of gamma+1
tokens with slots past a row's draft length rejected, greedy (output equals the target's
greedy decoding) or lossless sampling (the stopping decision depends only on the drafts so
far, so the committed tokens keep the target's distribution, the paper's Theorem).

The draft cache after a round holds every fed token (up to the newest draft but one); the next
round's `extend_from_pending` rewinds it to the accepted prefix and catches up, as for the
plain draft model.
"""
from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from decoding import loop, sampling
from decoding.speculative import verify
from decoding.speculative.base import DraftAndVerify
from models.acceptance_head import DraftWithAcceptanceHead


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SpecDecPPConfig:
    """gamma: the most tokens a row drafts per round (the official upper bound is 20; here
    the verification chunk has the static width gamma + 1 whatever rows draft, so a smaller
    cap is cheaper on CPU). threshold: h, stop once the predicted P(some draft is rejected)
    exceeds it (the README's --stop_threshold 0.3). min_draft: the lower bound (README 2)."""
    gamma: int = 8
    threshold: float = 0.3
    min_draft: int = 2

    def __post_init__(self):
        if self.gamma < 1:
            raise ValueError(f"gamma={self.gamma} must be at least 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be a probability in [0, 1]")
        if not 1 <= self.min_draft <= self.gamma:
            raise ValueError(f"min_draft={self.min_draft} must be in [1, gamma={self.gamma}]")


def draft_adaptive(draft: DraftWithAcceptanceHead, cache, seq: jax.Array, seq_len: jax.Array,
                   drafting: jax.Array, config: SpecDecPPConfig, rng: jax.Array,
                   params: sampling.SamplingParams | None):
    """Drafts up to gamma tokens per row, stopping each row by the SpecDec++ rule.

    Returns drafts int32[B, gamma], their distributions f32[B, gamma, V] (None when greedy),
    the per-row draft lengths int32[B] (0 for rows not drafting), the number of draft calls
    and the draft cache.
    """
    c = config
    keys = jax.random.split(rng, c.gamma)

    def propose(logits, key):
        if params is None:
            return sampling.greedy(logits), None
        logq = sampling.log_probs(logits, params)
        return jax.random.categorical(key, logq, axis=-1).astype(jnp.int32), jnp.exp(logq)

    # First call: catch up and feed the pending token; it drafts d_1 (no prediction yet).
    logits, cache = verify.extend_from_pending(draft, cache, seq, seq_len, 0)
    token, q = propose(logits[:, 0], keys[0])
    batch = token.shape[0]
    drafts = jnp.zeros((batch, c.gamma), jnp.int32).at[:, 0].set(token)
    qs = None if q is None else jnp.zeros((batch, c.gamma, q.shape[-1]), q.dtype
                                          ).at[:, 0].set(q)
    draft_len = drafting.astype(jnp.int32)
    drafting = drafting & (c.gamma > 1)
    log_accept = jnp.zeros((batch,), jnp.float32)  # log prod of predicted acceptances

    def cond(carry):
        i, drafting = carry[0], carry[-1]
        return jnp.any(drafting) & (i < c.gamma)

    def body(carry):
        i, cache, last, drafts, qs, draft_len, log_accept, drafting = carry
        logits, log_odds, cache = draft.extend_with_acceptance(last[:, None], cache)
        token, q = propose(logits[:, 0], keys[i])
        drafts = drafts.at[:, i].set(token)
        if qs is not None:
            qs = qs.at[:, i].set(q)
        draft_len = draft_len + drafting.astype(jnp.int32)
        # log a_{i} of the token just fed (d_i, 1-based), then the stop test after d_{i+1}.
        log_accept = log_accept + jax.nn.log_sigmoid(log_odds[:, 0])
        reject = 1.0 - jnp.exp(log_accept)
        stop = ((reject > c.threshold) & (i + 1 >= c.min_draft)) | (i + 1 >= c.gamma)
        return i + 1, cache, token, drafts, qs, draft_len, log_accept, drafting & ~stop

    calls, cache, _, drafts, qs, draft_len, _, _ = jax.lax.while_loop(
        cond, body, (jnp.ones((), jnp.int32), cache, token, drafts, qs, draft_len,
                     log_accept, drafting))
    return drafts, qs, draft_len, calls, cache


@dataclasses.dataclass(frozen=True)
class SpecDecPP(DraftAndVerify):
    """SpecDec++ on the shared loop (greedy or lossless sampling); `draft` is the graph of a
    DraftWithAcceptanceHead."""
    target: nnx.GraphDef
    draft: nnx.GraphDef
    config: SpecDecPPConfig
    sampling: sampling.SamplingFilters | None = None

    def step(self, state: loop.LoopState, weights) -> loop.LoopState:
        target = nnx.merge(self.target, weights["target"])
        draft = nnx.merge(self.draft, weights["draft"])
        params = sampling.bind(self.sampling, weights)
        rng, key_draft, key_rule = jax.random.split(state.rng, 3)
        drafts, q, draft_len, calls, draft_cache = draft_adaptive(
            draft, state.caches["draft"], state.tokens, state.lengths, ~state.done,
            self.config, key_draft, params)
        state = state.replace(rng=rng, caches={**state.caches, "draft": draft_cache})
        state = verify.add_draft_calls(state, calls)
        return verify.verify_round(state, target, drafts, draft_len, q, self.rule(params),
                                   key_rule)


def check_draft(name: str, sampler: SpecDecPP, model, draft_model, prompts, budgets) -> None:
    """The request check of the specdecpp samplers (decoding/registry.py)."""
    del sampler, prompts, budgets
    if not hasattr(model, "extend"):
        raise ValueError(f"sampler {name!r} needs a causal target with a KV cache (extend), "
                         f"got {type(model).__name__}")
    if not isinstance(draft_model, DraftWithAcceptanceHead):
        raise ValueError(f"sampler {name!r} needs a DraftWithAcceptanceHead as its draft model "
                         "(a draft Transformer with a trained acceptance head, "
                         f"models/acceptance_head.py), got {type(draft_model).__name__}")

"""Self-speculative decoding by early exit (Kangaroo, arXiv 2404.18911; Equationliu/Kangaroo
@4f0949d, `evaluation/inference_kangaroo.py`).

The draft is the target itself cut after its first `exit_layer` blocks, read through the
target's head: directly through its final norm, or (Kangaroo proper) through a small trained
adapter, models/early_exit_adapter.py, passed as the draft model. Kangaroo's second early exit
stops drafting a row as soon as the draft's confidence (max probability) falls below a
threshold: the low-confidence token is still proposed, then that row drafts no more, so draft
length adapts per row and per round. Drafting runs as a `lax.while_loop` that ends when every
row has stopped or gamma tokens exist.

Verification resumes from the exit instead of starting over, as Kangaroo does: every drafting
call keeps the layer-`exit_layer` residual state of the token it fed and wrote the shallow
layers' cache entries for it, so the round's one verification call runs only the deep blocks
(`model.extend_from`) over [pending, d_1..d_gamma], after one more shallow step for the last
draft (the only token drafting never fed). The target cache then holds exactly what plain
decoding would; entries past the accepted prefix are rewound as in every round. The adapter
keeps its own cache, rewound to the same length; the shallow step for the last draft also
writes the adapter's entry for it, so an all-accepted round needs no catch-up. Stats count the
drafting calls as `draft_calls`; that extra shallow step is part of the verification.
"""
from __future__ import annotations

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from decoding import loop, sampling
from decoding.speculative import verify
from decoding.speculative.base import DraftAndVerify
from models.early_exit_adapter import EarlyExitAdapter


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
    """Early-exit self-speculation with a per-row confidence stop. `draft`, when given, is the
    graph of an EarlyExitAdapter between the exit and the head."""
    target: nnx.GraphDef
    config: SelfSpecConfig
    sampling: sampling.SamplingFilters | None = None
    draft: nnx.GraphDef | None = None

    def init(self, weights, tokens, prompt_lengths, max_new_tokens, eos_id, rng, *,
             prefill_length: int) -> loop.LoopState:
        cache_length = tokens.shape[1] + self.cache_slack
        caches = {"target": loop.prefill(self.target, weights["target"], tokens,
                                         prompt_lengths, prefill_length=prefill_length,
                                         cache_length=cache_length)}
        if self.draft is not None:
            caches["draft"] = _prefill_adapter(
                self.target, self.draft, self.config.exit_layer, prefill_length, cache_length,
                weights["target"], weights["draft"], tokens,
                jnp.asarray(prompt_lengths, jnp.int32))
        return loop.new_state(tokens, prompt_lengths, max_new_tokens, eos_id, rng,
                              caches=caches, hist_size=self.hist_size,
                              counters=self.counter_names)

    def _draft(self, model, adapter, caches, pending, drafting, rng, params):
        """Drafts up to gamma tokens per row from the early exit. Returns drafts int32[B, gamma],
        their distributions f32[B, gamma, V] (None when greedy), per-row draft lengths, the
        number of drafting calls, the exit states [B, gamma + 1, d] of [pending, drafts]
        (valid up to index calls) and the caches holding their shallow entries."""
        c = self.config
        greedy = params is None

        def call(caches, last, key):
            """One shallow step on last [B]: its exit state, the draft token after it, that
            token's confidence and distribution (None when greedy)."""
            hidden, target_cache = model.extend_trunk(last[:, None], caches["target"],
                                                      exit_layer=c.exit_layer)
            caches = {**caches, "target": target_cache}
            if adapter is None:
                logits = model.logits(hidden)
            else:
                logits, caches["draft"] = adapter.extend(hidden, caches["draft"], model)
            logits = logits[:, 0]
            if greedy:
                confidence = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
                return hidden[:, 0], sampling.greedy(logits), confidence, None, caches
            probs = sampling.probs(logits, params)
            token = jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)
            return hidden[:, 0], token, jnp.max(probs, axis=-1), probs, caches

        batch = pending.shape[0]
        keys = jax.random.split(rng, c.gamma)
        # Every round drafts at least one token (Kangaroo checks confidence only from the
        # second draft step on); this first call also fixes the carried shapes.
        hidden, token, confidence, probs, caches = call(caches, pending, keys[0])
        hiddens = jnp.zeros((batch, c.gamma + 1, hidden.shape[-1]), hidden.dtype
                            ).at[:, 0].set(hidden)
        drafts = jnp.zeros((batch, c.gamma), jnp.int32).at[:, 0].set(token)
        qs = None if greedy else jnp.zeros(
            (batch, c.gamma, probs.shape[-1]), jnp.float32).at[:, 0].set(probs)
        draft_len = drafting.astype(jnp.int32)
        drafting = drafting & (confidence >= c.threshold)

        def cond(carry):
            i, drafting = carry[0], carry[-1]
            return jnp.any(drafting) & (i < c.gamma)

        def body(carry):
            i, caches, hiddens, last, drafts, qs, draft_len, drafting = carry
            hidden, token, confidence, probs, caches = call(caches, last, keys[i])
            hiddens = hiddens.at[:, i].set(hidden)
            drafts = drafts.at[:, i].set(token)
            if not greedy:
                qs = qs.at[:, i].set(probs)
            draft_len = draft_len + drafting.astype(jnp.int32)
            drafting = drafting & (confidence >= c.threshold)
            return i + 1, caches, hiddens, token, drafts, qs, draft_len, drafting

        calls, caches, hiddens, last, drafts, qs, draft_len, _ = jax.lax.while_loop(
            cond, body, (jnp.ones((), jnp.int32), caches, hiddens, token, drafts, qs,
                         draft_len, drafting))
        # The newest draft was never fed: one more shallow step gives its exit state (the
        # deep blocks need it for the bonus position) and writes its shallow and adapter
        # cache entries. Its draft logits are unused and compiled away.
        hidden, _, _, _, caches = call(caches, last, keys[0])
        hiddens = jax.lax.dynamic_update_slice_in_dim(hiddens, hidden[:, None], calls, axis=1)
        return drafts, qs, draft_len, calls, hiddens, caches

    def step(self, state: loop.LoopState, weights) -> loop.LoopState:
        model = nnx.merge(self.target, weights["target"])
        adapter = None if self.draft is None else nnx.merge(self.draft, weights["draft"])
        params = sampling.bind(self.sampling, weights)
        rng, key_draft, key_rule = jax.random.split(state.rng, 3)
        start = state.lengths - 1  # what the target cache held before the round
        drafts, q, draft_len, calls, hiddens, caches = self._draft(
            model, adapter, state.caches, loop.pending_token(state), ~state.done, key_draft,
            params)
        # Verification: back to where the round began, then only the deep blocks, on exit
        # states whose shallow entries drafting already wrote. Slots past `calls` hold zeros
        # (rows never draft that far, so the rule rejects them before they matter).
        target_cache = model.rewind(caches["target"], start)
        logits, target_cache = model.extend_from(hiddens, target_cache,
                                                 start_layer=self.config.exit_layer)
        state = verify.add_draft_calls(state.replace(rng=rng, caches=caches), calls)
        state = verify.settle_round(state, model, target_cache, logits, drafts, draft_len, q,
                                    self.rule(params), key_rule)
        if adapter is not None:
            state = state.replace(caches={
                **state.caches, "draft": adapter.rewind(state.caches["draft"],
                                                         state.lengths - 1)})
        return state


def check_adapter(name: str, sampler: SelfSpeculative, model, draft_model, prompts,
                  budgets) -> None:
    """The request check of the self_spec samplers (decoding/registry.py): the optional draft
    is an EarlyExitAdapter trained for this target at the sampler's exit layer."""
    del prompts, budgets
    if not hasattr(model, "extend_trunk"):
        raise ValueError(f"sampler {name!r} drafts from the target's early exit and needs a "
                         f"Transformer-family target, got {type(model).__name__}")
    if draft_model is None:
        return
    if not isinstance(draft_model, EarlyExitAdapter):
        raise ValueError(f"sampler {name!r} takes an EarlyExitAdapter as its draft model, got "
                         f"{type(draft_model).__name__}")
    draft_model.check_target(model, sampler.config.exit_layer)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _prefill_adapter(target_graph, adapter_graph, exit_layer: int, prefill_length: int,
                     cache_length: int, target_weights, adapter_weights, tokens,
                     prompt_lengths):
    """The adapter's cache over each row's prompt but its pending token. Recomputes the
    prompt's first exit_layer blocks (a fraction of the target's prefill) rather than
    threading exit states through the shared target prefill."""
    loop.TRACE_COUNTS["prefill_adapter"] += 1
    model = nnx.merge(target_graph, target_weights)
    adapter = nnx.merge(adapter_graph, adapter_weights)
    batch = tokens.shape[0]
    hidden, _ = model.extend_trunk(tokens[:, :prefill_length],
                                   model.init_cache(batch, cache_length),
                                   exit_layer=exit_layer, num_tokens=prompt_lengths - 1)
    _, cache = adapter.extend(hidden, adapter.init_cache(batch, cache_length), model,
                              num_tokens=prompt_lengths - 1)
    return cache

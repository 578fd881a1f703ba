"""The masked-diffusion sampler on the shared loop (DESIGN.md, "The decoding loop"; spec
decoding.md section 4.8): one init/step pair whose commit rule is LLaDA's top-k remasking
(low confidence or random), Fast-dLLM's threshold, LocalLeap's anchors or Learn2PD's learned
filter, with Prophet's early commit, the end-of-text stop and Fast-dLLM's block caches as
options of all of them.

Buffer. `init` fills every row's generation slots [prompt_length, limit) with the model's
MASK id; `step` runs one forward (one NFE, the loop's target_calls), commits positions of the
row's current block (the block of its first masked slot, so blocks advance by themselves)
with `loop.commit_at`, and marks the row done once nothing is masked. A done row's length is
set past its first end-of-sequence token (or to its limit), so `generate` returns the same
kind of output as for autoregressive samplers. Slots past a row's limit are padding in their
own attention segment: ragged rows never see each other's padding.

Every step commits at least one token of every active row (the top-ranked masked position of
its block always commits), so the loop ends within the generation length.

Counters (generate()'s stats): row_forwards (forward passes summed over active rows: the NFE
each prompt would cost alone), early_commits and early_commit_steps (rows Prophet finished and
the sum of the 1-based steps at which it did), eot_stops (rows the end-of-text stop filled).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decoding import loop
from decoding.diffusion import cache, eotp, learn2pd, localleap, prophet, remasking, threshold
from decoding.diffusion.config import DiffusionSamplerConfig

RULES = ("low_confidence", "random", "threshold", "localleap", "learn2pd")
COUNTERS = ("row_forwards", "early_commits", "early_commit_steps", "eot_stops")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each row stands, derived from the tokens alone (no block counter to carry)."""
    masked: jax.Array       # bool[B, L] masked generation slots
    key_valid: jax.Array    # bool[B, L] real positions (prompt + generation)
    block: jax.Array        # int32[B] index of the current block
    block_start: jax.Array  # int32[B]
    in_block: jax.Array     # bool[B, L]


def layout(tokens: jax.Array, prompt_lengths: jax.Array, limits: jax.Array, mask_id: int,
           block_length: int) -> Layout:
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    p = prompt_lengths[:, None]
    key_valid = pos < limits[:, None]
    masked = (tokens == mask_id) & (pos >= p) & key_valid
    first = jnp.where(jnp.any(masked, axis=1), jnp.argmax(masked, axis=1), limits)
    block = ((first - prompt_lengths) // block_length).astype(jnp.int32)
    start = prompt_lengths + block * block_length
    in_block = (pos >= start[:, None]) & (pos < start[:, None] + block_length)
    return Layout(masked, key_valid, block, start, in_block)


def output_lengths(tokens: jax.Array, prompt_lengths: jax.Array, limits: jax.Array,
                   eos_id: jax.Array) -> jax.Array:
    """int32[B]: a finished row's length: past its first end-of-sequence token, else limit."""
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    gen = (pos >= prompt_lengths[:, None]) & (pos < limits[:, None])
    is_eos = gen & jnp.any(tokens[:, :, None] == eos_id[None, None, :], axis=-1)
    return jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, limits
                     ).astype(jnp.int32)


def finish(state: loop.LoopState, values: jax.Array, commit: jax.Array, mask_id: int,
           extra: dict | None = None) -> loop.LoopState:
    """Commits values where commit, marks rows with nothing masked left done (their lengths
    set by output_lengths), and adds the step's counters."""
    active = ~state.done
    tokens = jnp.where(commit & active[:, None], values, state.tokens)
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    left = jnp.any((tokens == mask_id) & (pos >= state.prompt_lengths[:, None])
                   & (pos < state.limits[:, None]), axis=1)
    state = loop.commit_at(state, values, commit, ~left)
    ended = active & state.done
    lengths = jnp.where(ended, output_lengths(state.tokens, state.prompt_lengths,
                                              state.limits, state.eos_id), state.lengths)
    counters = dict(state.stats.counters)
    counters["row_forwards"] = counters["row_forwards"] + jnp.sum(active)
    for name, value in (extra or {}).items():
        counters[name] = counters[name] + value
    stats = state.stats.replace(counters=counters,
                                target_calls=state.stats.target_calls + 1)
    return state.replace(lengths=lengths, stats=stats)


@functools.partial(jax.jit, static_argnums=(0,))
def fill_masks(mask_id: int, tokens, prompt_lengths, limits):
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    gen = (pos >= prompt_lengths[:, None]) & (pos < limits[:, None])
    return jnp.where(gen, mask_id, tokens)


def mask_id_of(graph: nnx.GraphDef, weights) -> int:
    return int(nnx.merge(graph, weights).mask_token_id)


@dataclasses.dataclass(frozen=True)
class MaskedDiffusion:
    """A masked-diffusion sampler: `rule` in RULES, plus the config's options (`filter`:
    Learn2PD's trained filter, for rule "learn2pd")."""
    target: nnx.GraphDef
    config: DiffusionSamplerConfig
    rule: str = "low_confidence"
    force_prophet: bool = False
    filter: learn2pd.Filter | None = None

    @property
    def hist_size(self) -> int:
        return self.config.block_length + 2

    cache_slack: int = 0

    @property
    def prophet(self) -> bool:
        return self.force_prophet or self.config.prophet

    def init(self, weights, tokens, prompt_lengths, max_new_tokens, eos_id, rng, *,
             prefill_length: int) -> loop.LoopState:
        state = loop.new_state(tokens, prompt_lengths, max_new_tokens, eos_id, rng, caches={},
                               hist_size=self.hist_size, counters=COUNTERS)
        mask_id = mask_id_of(self.target, weights["target"])
        state = state.replace(tokens=fill_masks(mask_id, state.tokens, state.prompt_lengths,
                                                state.limits))
        carry = {"block_step": jnp.zeros(tokens.shape[:1], jnp.int32)}
        if self.config.cache != "none":
            model = nnx.merge(self.target, weights["target"])
            # Prefix: the window runs from the block to the end of any row's generation,
            # which the buffer past the prompt bucket bounds; dual: the block alone.
            width = (tokens.shape[1] - prefill_length if self.config.cache == "prefix"
                     else self.config.block_length)
            carry.update(cache.init_carry(model, tokens.shape[0], tokens.shape[1],
                                          max(width, self.config.block_length)))
        return state.replace(carry=carry)

    def predict(self, model, state, lay: Layout):
        """(x0, conf, gap, carry) of this step's one forward."""
        if self.config.cache == "none":
            x0, conf, gap = cache.full_predict(model, state.tokens, lay.key_valid)
            return x0, conf, gap, state.carry
        return cache.cached_predict(model, state.tokens, lay.key_valid, lay.block,
                                    lay.block_start, ~state.done, state.carry)

    def commit_rule(self, lay: Layout, conf, carry, key) -> jax.Array:
        c = self.config
        candidates = lay.masked & lay.in_block
        if self.rule == "threshold":
            return threshold.threshold_commit(conf, candidates, c.threshold)
        if self.rule == "localleap":
            return localleap.localleap_commit(conf, candidates, c.kappa, c.tau, c.radius)
        k = remasking.transfer_count(carry["block_step"], c.block_length,
                                     c.resolved_steps_per_block)
        if self.rule == "learn2pd":
            return learn2pd.learn2pd_commit(self.filter, conf, lay.block_start, candidates, k,
                                            c.filter_threshold)
        scores = conf if self.rule == "low_confidence" else remasking.random_scores(
            key, conf.shape)
        return remasking.topk_commit(scores, candidates, k)

    def step(self, state: loop.LoopState, weights) -> loop.LoopState:
        c = self.config
        model = nnx.merge(self.target, weights["target"])
        mask_id = model.mask_token_id
        rng, key = jax.random.split(state.rng)
        lay = layout(state.tokens, state.prompt_lengths, state.limits, mask_id, c.block_length)
        x0, conf, gap, carry = self.predict(model, state, lay)
        commit = self.commit_rule(lay, conf, carry, key)
        values = x0
        active = ~state.done
        extra = {}
        if self.prophet:
            # Nominal steps: generation length / block length blocks of steps_per_block.
            total = ((state.limits - state.prompt_lengths) // c.block_length
                     * c.resolved_steps_per_block)
            progress = (state.step + 1) / jnp.maximum(total, 1)
            exits = prophet.prophet_exit(gap, lay.masked, progress, c.prophet_thresholds)
            exits &= active
            commit = jnp.where(exits[:, None], lay.masked, commit)
            extra["early_commits"] = jnp.sum(exits)
            extra["early_commit_steps"] = jnp.sum(jnp.where(exits, state.step + 1, 0))
        if c.eot_stop:
            fill = eotp.eot_fill(x0, conf, lay.masked & ~commit, state.eos_id[0])
            values = jnp.where(fill, state.eos_id[0], values)
            commit |= fill
            extra["eot_stops"] = jnp.sum(active & jnp.any(fill, axis=1))
        state = finish(state.replace(rng=rng), values, commit, mask_id, extra)
        after = layout(state.tokens, state.prompt_lengths, state.limits, mask_id,
                       c.block_length)
        block_step = jnp.where(after.block == lay.block, carry["block_step"] + 1, 0)
        return state.replace(carry={**carry, "block_step": block_step})


def check_request(name: str, sampler, model, draft_model, prompts: list[np.ndarray],
                  budgets: np.ndarray) -> None:
    """The host-side check of every diffusion sampler (decoding/registry.py)."""
    del draft_model
    mask_id = getattr(model, "mask_token_id", None)
    if mask_id is None:
        raise ValueError(f"sampler {name!r} decodes a masked diffusion model (one with a "
                         f"mask_token_id, models/diffusion.py); got {type(model).__name__}")
    for b, row in enumerate(prompts):
        if np.any(row == mask_id):
            raise ValueError(f"prompt {b} holds the MASK token id {mask_id} at position "
                             f"{int(np.argmax(row == mask_id))}; prompts must be unmasked "
                             "text (the sampler masks the generation itself)")
    block = sampler.config.block_length
    bad = [int(n) for n in np.unique(budgets) if n % block]
    if bad:
        raise ValueError(f"max_new_tokens={bad[0]} (the generation length) is not a multiple "
                         f"of block_length={block}; use a multiple such as "
                         f"{block * max(1, round(bad[0] / block))}")

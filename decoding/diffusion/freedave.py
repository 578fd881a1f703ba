"""FreeDave: lossless draft-and-verify for masked diffusion LMs (arXiv 2510.00294;
cychomatica/FreeDave @8b48121 `generation/core.py` draft_verification_vectorized, spec
decoding.md section 4.7).

The reference is the one-token-per-step low-confidence baseline (remasking.py with
steps_per_block = block_length). FreeDave carries the (x0, conf) of its last forward. Each
step builds K drafts from it, draft k = the state with the k+1 most confident masked positions
of the current block set to their argmax (draft 0 IS the baseline's next state), runs ONE
batched forward over all drafts (one NFE; "batch-expanded" mode), and computes from each
draft's forward the baseline's step from that draft (its target). Draft j is verified when it
equals the target of an already verified draft i < j; the furthest verified draft becomes the
new state and its forward the carried prediction, so each step commits >= 1 token and the
sequence is exactly the baseline's. One extra forward at init (counted in target_calls and
row_forwards) starts the chain.

Exactness holds up to floating point: the batched forward computes the same per-row math as
the baseline's, which on CPU gives identical numbers (tested). Options: no block cache, no
Prophet and no end-of-text stop (each would change the reference it reproduces).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decoding import loop
from decoding.diffusion import base, cache, remasking
from decoding.diffusion.config import DiffusionSamplerConfig


def baseline_step(tokens, x0, conf, prompt_lengths, limits, mask_id: int, block_length: int):
    """The one-token-per-step low-confidence step from `tokens` given its prediction."""
    lay = base.layout(tokens, prompt_lengths, limits, mask_id, block_length)
    commit = remasking.topk_commit(conf, lay.masked & lay.in_block,
                                   jnp.ones(tokens.shape[:1], jnp.int32))
    return jnp.where(commit, x0, tokens)


def select_verified(agree: jax.Array) -> jax.Array:
    """int32[B]: the furthest draft reachable from draft 0 through verified links, where
    agree[b, i, j] (j > i) says draft j equals the baseline step from draft i."""
    k = agree.shape[-1]
    best = jnp.zeros(agree.shape[0], jnp.int32)
    idx = jnp.arange(k, dtype=jnp.int32)
    for _ in range(k - 1):
        row = jnp.take_along_axis(agree, best[:, None, None], axis=1)[:, 0]  # [B, K]
        best = jnp.maximum(best, jnp.max(jnp.where(row, idx[None, :], -1), axis=1))
    return best


@dataclasses.dataclass(frozen=True)
class FreeDave:
    target: nnx.GraphDef
    config: DiffusionSamplerConfig
    cache_slack: int = 0

    @property
    def hist_size(self) -> int:
        return self.config.draft_steps + 2

    def init(self, weights, tokens, prompt_lengths, max_new_tokens, eos_id, rng, *,
             prefill_length: int) -> loop.LoopState:
        del prefill_length
        state = loop.new_state(tokens, prompt_lengths, max_new_tokens, eos_id, rng, caches={},
                               hist_size=self.hist_size, counters=base.COUNTERS)
        mask_id = base.mask_id_of(self.target, weights["target"])
        filled = base.fill_masks(mask_id, state.tokens, state.prompt_lengths, state.limits)
        x0, conf = _first_forward(self.target, weights["target"], filled, state.limits)
        counters = {**state.stats.counters,
                    "row_forwards": jnp.sum(~state.done).astype(jnp.int32)}
        stats = state.stats.replace(target_calls=state.stats.target_calls + 1,
                                    counters=counters)
        return state.replace(tokens=filled, stats=stats, carry={"x0": x0, "conf": conf})

    def step(self, state: loop.LoopState, weights) -> loop.LoopState:
        c = self.config
        model = nnx.merge(self.target, weights["target"])
        mask_id = model.mask_token_id
        k = c.draft_steps
        tokens, p, lim = state.tokens, state.prompt_lengths, state.limits
        x0, conf = state.carry["x0"], state.carry["conf"]
        lay = base.layout(tokens, p, lim, mask_id, c.block_length)
        candidates = lay.masked & lay.in_block
        r = remasking.rank(jnp.where(candidates, conf, remasking.NEG_INF))
        counts = jnp.arange(1, k + 1, dtype=jnp.int32)[:, None, None]  # [K, 1, 1]
        drafts = jnp.where(candidates[None] & (r[None] < counts), x0[None], tokens[None])
        batch, length = tokens.shape
        flat = drafts.reshape(k * batch, length)
        valid = jnp.tile(lay.key_valid, (k, 1))
        dx0, dconf, _ = cache.full_predict(model, flat, valid)
        targets = baseline_step(flat, dx0, dconf, jnp.tile(p, k), jnp.tile(lim, k), mask_id,
                                c.block_length).reshape(k, batch, length)
        # agree[b, i, j]: draft j equals the baseline step from draft i (j > i).
        agree = jnp.all(drafts[None, :] == targets[:, None], axis=-1)  # [K_i, K_j, B]
        agree = jnp.moveaxis(agree, -1, 0) & jnp.triu(jnp.ones((k, k), bool), 1)[None]
        best = select_verified(agree)
        rows = jnp.arange(batch)
        new_tokens = drafts[best, rows]
        dx0 = dx0.reshape(k, batch, length)[best, rows]
        dconf = dconf.reshape(k, batch, length)[best, rows]
        active = ~state.done
        state = base.finish(state, new_tokens, new_tokens != tokens, mask_id)
        carry = {"x0": jnp.where(active[:, None], dx0, x0),
                 "conf": jnp.where(active[:, None], dconf, conf)}
        return state.replace(carry=carry)


def _first_forward_fn(graph, weights, tokens, limits):
    """(x0, conf) of the full forward that starts the draft chain."""
    model = nnx.merge(graph, weights)
    valid = jnp.arange(tokens.shape[1])[None, :] < limits[:, None]
    x0, conf, _ = cache.full_predict(model, tokens, valid)
    return x0, conf


_first_forward = jax.jit(_first_forward_fn, static_argnums=(0,))


def check_request(name: str, sampler, model, draft_model, prompts: list[np.ndarray],
                  budgets: np.ndarray) -> None:
    base.check_request(name, sampler, model, draft_model, prompts, budgets)
    c = sampler.config
    options = {k: v for k, v in (("cache", c.cache if c.cache != "none" else None),
                                 ("prophet", c.prophet or None),
                                 ("eot_stop", c.eot_stop or None)) if v}
    if options:
        raise ValueError(f"sampler {name!r} reproduces the one-token-per-step baseline "
                         f"exactly and takes no {sorted(options)} option (got {options}); "
                         "use it with cache='none', prophet=False, eot_stop=False")

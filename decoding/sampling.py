"""Token pickers (greedy, temperature, top-k, top-p) and the plain autoregressive sampler.

The pickers turn one position's logits into the distribution a sampler draws from. They are
pure functions on [..., V] arrays, so speculative rules (decoding/speculative/) use exactly the
same processed distributions for the target p and the draft q: lossless speculative sampling
(Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318) reproduces the *processed*
target distribution, so the processing has to be identical on both sides.

Processing order follows Hugging Face's default logits warpers: temperature, then top-k, then
top-p (nucleus sampling, Holtzman et al., arXiv 1904.09751) on the tempered, top-k-filtered
distribution, then renormalisation.

A `SamplingConfig` is what a user writes. Inside the jitted loop its numbers travel as traced
values (`SamplingParams`, fed through the loop's inputs under "sampling"), and only which
filters are on (`SamplingFilters`) is part of the compiled program: a new temperature, top-k or
top-p reuses the compiled loop, while switching top-k or top-p on or off compiles anew.

`Autoregressive` is the plain decoding sampler: an `init`/`step` pair on decoding.loop's state
that feeds the pending token, picks the next one and commits it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decoding import loop

_NEG_INF = -jnp.inf
# Where generate() puts the traced sampling values among the loop's inputs (beside the
# models' weights).
INPUTS_KEY = "sampling"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a sampling (non-greedy) decoder turns logits into a distribution.

    temperature: logits are divided by it; must be > 0 (greedy decoding is its own sampler).
    top_k: keep the k most likely tokens (ties with the k-th are kept too); 0 turns it off.
    top_p: keep the smallest set of most likely tokens whose mass reaches top_p (the token that
        crosses the threshold is kept); 1.0 turns it off.
    """
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(
                f"temperature={self.temperature} is not a sampling temperature; it must be > 0 "
                "(for deterministic decoding use a greedy sampler, e.g. 'greedy' or "
                "'speculative_greedy')")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 turns top-k off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1.0 turns top-p off)")

    @property
    def filters(self) -> SamplingFilters:
        """The static half: which filters run."""
        return SamplingFilters(top_k=self.top_k > 0, top_p=self.top_p < 1.0)

    def values(self) -> dict[str, np.ndarray]:
        """The traced half, as the loop's "sampling" input."""
        return {"temperature": np.float32(self.temperature), "top_k": np.int32(self.top_k),
                "top_p": np.float32(self.top_p)}

    def params(self) -> SamplingParams:
        return self.filters.bind(self.values())


@dataclasses.dataclass(frozen=True)
class SamplingFilters:
    """Which filters a sampling sampler applies: the part of a SamplingConfig that shapes
    the compiled program (samplers hold this, not the numbers, so equal filters share one
    compilation)."""
    top_k: bool = False
    top_p: bool = False

    def bind(self, values: dict[str, Any]) -> SamplingParams:
        return SamplingParams(jnp.asarray(values["temperature"], jnp.float32),
                              jnp.asarray(values["top_k"], jnp.int32),
                              jnp.asarray(values["top_p"], jnp.float32),
                              use_top_k=self.top_k, use_top_p=self.top_p)


@flax.struct.dataclass
class SamplingParams:
    """A SamplingConfig inside jit: the numbers are (possibly traced) scalars, the flags of
    which filters run are static."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    use_top_k: bool = flax.struct.field(pytree_node=False, default=False)
    use_top_p: bool = flax.struct.field(pytree_node=False, default=False)


def bind(filters: SamplingFilters | None, inputs: dict[str, Any]) -> SamplingParams | None:
    """A sampler's sampling parameters for this call: None for a greedy sampler, else its
    filters bound to the traced values generate() passed in `inputs[INPUTS_KEY]`."""
    if filters is None:
        return None
    if INPUTS_KEY not in inputs:
        raise ValueError(f"a sampling sampler needs its values in the loop inputs under "
                         f"{INPUTS_KEY!r} (SamplingConfig.values()); got keys {sorted(inputs)}")
    return filters.bind(inputs[INPUTS_KEY])


def greedy(logits: jax.Array) -> jax.Array:
    """argmax over the last axis, as int32 (ties go to the lowest id, as in jnp.argmax)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def log_probs(logits: jax.Array, config: SamplingConfig | SamplingParams) -> jax.Array:
    """Log-probabilities [..., V] of the distribution `config` samples from (-inf where removed)."""
    if isinstance(config, SamplingConfig):
        config = config.params()
    x = logits.astype(jnp.float32) / config.temperature
    vocab = x.shape[-1]
    if not (config.use_top_k or config.use_top_p):
        return jax.nn.log_softmax(x, axis=-1)
    # One descending order serves both filters: top-k only removes a tail of it, so the kept
    # tokens stay sorted for top-p (argsort is stable, so ties keep the lower id first).
    order = jnp.argsort(-x, axis=-1)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    if config.use_top_k:
        # k is traced, so the k-th largest value is read off the sort rather than taken with
        # lax.top_k (whose k must be static). k = 0 or k >= V keeps everything.
        k = jnp.where(config.top_k > 0, jnp.minimum(config.top_k, vocab), vocab)
        kth = jnp.take_along_axis(sorted_x, jnp.broadcast_to(k - 1, x.shape[:-1] + (1,)),
                                  axis=-1)
        x = jnp.where(x >= kth, x, _NEG_INF)
        sorted_x = jnp.where(sorted_x >= kth, sorted_x, _NEG_INF)
    if config.use_top_p:
        sorted_probs = jax.nn.softmax(sorted_x, axis=-1)
        # Mass strictly before each sorted token: a token is kept while that mass is still
        # short of top_p, which keeps the token that crosses the threshold.
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = before < config.top_p
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        x = jnp.where(keep, x, _NEG_INF)
    return jax.nn.log_softmax(x, axis=-1)


def probs(logits: jax.Array, config: SamplingConfig | SamplingParams) -> jax.Array:
    """Probabilities [..., V] of the processed distribution."""
    return jnp.exp(log_probs(logits, config))


def sample(rng: jax.Array, logits: jax.Array, config: SamplingConfig | SamplingParams
           ) -> jax.Array:
    """One token per leading index from the processed distribution (int32 [...])."""
    return jax.random.categorical(rng, log_probs(logits, config), axis=-1).astype(jnp.int32)


def pick(rng: jax.Array, logits: jax.Array, config: SamplingConfig | SamplingParams | None
         ) -> jax.Array:
    """greedy(logits) when config is None, else a sample; the one switch every sampler uses."""
    return greedy(logits) if config is None else sample(rng, logits, config)


@dataclasses.dataclass(frozen=True)
class Autoregressive:
    """Plain decoding: one target forward and one committed token per row per step.

    Frozen and hashable (the graphdef is structure only): jit keys compiled code on it, so
    equal samplers built on separate calls share one compilation.
    """
    target: nnx.GraphDef
    sampling: SamplingFilters | None = None  # None: greedy

    hist_size: int = 2       # committed tokens per row-step: 0 or 1
    cache_slack: int = 2     # positions the cache needs beyond the token buffer

    def init(self, weights: dict[str, Any], tokens: jax.Array, prompt_lengths: jax.Array,
             max_new_tokens: jax.Array, eos_id: jax.Array, rng: jax.Array, *,
             prefill_length: int) -> loop.LoopState:
        return loop.init_state({"target": self.target}, weights, tokens, prompt_lengths,
                               max_new_tokens, eos_id, rng, prefill_length=prefill_length,
                               cache_slack=self.cache_slack, hist_size=self.hist_size)

    def step(self, state: loop.LoopState, weights: dict[str, Any]) -> loop.LoopState:
        model = nnx.merge(self.target, weights["target"])
        rng, key = jax.random.split(state.rng)
        logits, cache = model.extend(loop.pending_token(state)[:, None], state.caches["target"])
        token = pick(key, logits[:, 0], bind(self.sampling, weights))
        state = state.replace(rng=rng)
        state, _ = loop.commit(state, token[:, None], jnp.ones_like(state.lengths))
        # The cache holds every committed token but the newest (the next pending one); rows
        # that were already done just drop the entry this step wrote.
        cache = model.rewind(cache, state.lengths - 1)
        stats = state.stats.replace(target_calls=state.stats.target_calls + 1)
        return state.replace(caches={**state.caches, "target": cache}, stats=stats)

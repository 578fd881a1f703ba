"""The one jit-compiled decoding loop (DESIGN.md, "The decoding loop").

Every sampler (plain, speculative, and later masked-diffusion) is a hashable object with an
`init(...) -> LoopState` and a `step(state, weights) -> LoopState`; `run` wraps the step in a
single `lax.while_loop` that stops when every row is done or the step budget is spent. This is
the shape of Gemma's `_sampler_loop.py` (a small typed jitted loop over a frozen state), with
T5X-style per-row positions so speculative rounds can accept a different number of tokens in
each row.

Rules that keep it fast: nothing leaves the device until the loop ends (no `.item()`, no Python
`if` on device values); the step budget and `max_new_tokens` are traced, so changing them does
not recompile; the state is donated, so the caches are updated in place; only tokens and small
counters are carried across steps, never full-vocabulary logits.

Buffer layout. `tokens[b, :lengths[b]]` is row b's committed sequence (its prompt first). For
autoregressive samplers the model caches hold every committed token but the last one, the
*pending* token, which the next step feeds; this makes the first decode step look like every
other one and lets a speculative round verify `[pending, d_1..d_gamma]` in one call. A diffusion
sampler may instead fill `tokens` with mask ids past the prompt and commit tokens at arbitrary
positions: `commit_at` updates the buffer and the stats for that case, and `run` only looks at
`done` and `step`.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

# The loop's traced inputs besides its state: model name ("target", "draft") -> nnx.State of
# that model, plus "sampling" -> the sampling values of a sampling sampler.
Weights = dict[str, Any]

# Incremented when a jitted function of the loop is traced, i.e. compiled anew; tests read it
# to show that a new prompt length in the same bucket, or a new max_new_tokens, reuses code.
TRACE_COUNTS: collections.Counter = collections.Counter()


@flax.struct.dataclass
class Stats:
    """Counters the loop keeps on device; generate() reads them once after the loop.

    target_calls / draft_calls: batched forward calls of each model after prefill.
    rounds: loop steps taken (one speculative round or one plain decode step each).
    drafted / accepted: draft tokens proposed and accepted, summed over active rows.
    accepted_hist[k]: (active row, round) pairs that committed k tokens (accepted drafts plus
        the target's own token); size gamma_max + 2, larger counts land in the last bin.
    committed_per_step[s]: tokens committed over all rows at step s (size = buffer length,
        which bounds the step count because every active row commits at least one token).
    counters: sampler-specific scalars (FLy's mismatches and rescued drafts, ...).
    """
    target_calls: jax.Array
    draft_calls: jax.Array
    rounds: jax.Array
    drafted: jax.Array
    accepted: jax.Array
    accepted_hist: jax.Array
    committed_per_step: jax.Array
    counters: dict[str, jax.Array]


@flax.struct.dataclass
class LoopState:
    """Everything the loop carries; a pytree of fixed-shape arrays.

    tokens: int32[B, L] token buffer.      lengths: int32[B] committed tokens per row.
    prompt_lengths: int32[B].              limits: int32[B] a row is done at this length.
    done: bool[B].                         eos_id: int32[K] ids that end a row (a chat
                                           model's end-of-turn and end-of-text; -1: none).
    rng: a PRNG key.                       step: int32[] loop steps taken.
    caches: model name -> cache (each exposes `.lengths`).
    carry: sampler-specific small arrays kept across steps (None for most samplers).
    stats: Stats.
    """
    tokens: jax.Array
    lengths: jax.Array
    prompt_lengths: jax.Array
    limits: jax.Array
    done: jax.Array
    eos_id: jax.Array
    rng: jax.Array
    step: jax.Array
    caches: dict[str, Any]
    carry: Any
    stats: Stats


class Sampler(Protocol):
    """What `generate` and `run` need from a sampler. Implementations are frozen dataclasses
    (hashable, compared by value) holding model graphdefs and static config, so that two equal
    samplers built by separate calls hit the same compiled code.

    `init` is called outside jit and does its heavy work through jitted pieces (`prefill`,
    `new_state`), so samplers on the same model share the compiled prefill; `step` runs
    inside `run`'s while loop."""

    hist_size: int    # size of Stats.accepted_hist (gamma_max + 2)
    cache_slack: int  # positions each cache needs beyond the token buffer

    def init(self, weights: Weights, tokens: jax.Array, prompt_lengths: jax.Array,
             max_new_tokens: jax.Array, eos_id: jax.Array, rng: jax.Array, *,
             prefill_length: int) -> LoopState: ...

    def step(self, state: LoopState, weights: Weights) -> LoopState: ...


def _zero() -> jax.Array:
    return jnp.zeros((), jnp.int32)


def new_state(tokens: jax.Array, prompt_lengths: jax.Array, max_new_tokens: jax.Array,
              eos_id: jax.Array, rng: jax.Array, *, caches: dict[str, Any], hist_size: int,
              carry: Any = None, counters: tuple[str, ...] = ()) -> LoopState:
    """A fresh state: prompts committed, nothing generated, zero stats. max_new_tokens is an
    int or int32[B]."""
    return _new_state(tokens, prompt_lengths, max_new_tokens, eos_id, rng, caches, carry,
                      hist_size=hist_size, counters=tuple(counters))


@functools.partial(jax.jit, static_argnames=("hist_size", "counters"))
def _new_state(tokens, prompt_lengths, max_new_tokens, eos_id, rng, caches, carry, *,
               hist_size: int, counters: tuple[str, ...]) -> LoopState:
    TRACE_COUNTS["new_state"] += 1
    batch, buffer_length = tokens.shape
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    limits = jnp.minimum(prompt_lengths + jnp.asarray(max_new_tokens, jnp.int32), buffer_length)
    stats = Stats(
        target_calls=_zero(), draft_calls=_zero(), rounds=_zero(), drafted=_zero(),
        accepted=_zero(), accepted_hist=jnp.zeros((hist_size,), jnp.int32),
        committed_per_step=jnp.zeros((buffer_length,), jnp.int32),
        counters={name: _zero() for name in counters})
    return LoopState(
        tokens=tokens.astype(jnp.int32), lengths=prompt_lengths, prompt_lengths=prompt_lengths,
        limits=limits, done=prompt_lengths >= limits,
        eos_id=jnp.asarray(eos_id, jnp.int32).reshape(-1),
        rng=rng, step=_zero(), caches=caches, carry=carry, stats=stats)


def prefill(graph: nnx.GraphDef, weights: Any, tokens: jax.Array, prompt_lengths: jax.Array,
            *, prefill_length: int, cache_length: int):
    """A cache of model (graph, weights) holding each row's prompt but its last, pending token.

    All rows run one extend of the bucketed `prefill_length` tokens with `num_tokens` set to
    each row's prompt length minus one, so ragged prompts share one compiled prefill and no row
    keeps its padding (a ring-buffer cache, as in MSWA, must never let padding overwrite
    history, so rewinding after a padded prefill would not do).
    Jitted on its own (keyed by the model's structure and the sizes), so every sampler on the
    same model and shapes shares one compiled prefill.
    """
    return _prefill(graph, prefill_length, cache_length, weights, tokens,
                    jnp.asarray(prompt_lengths, jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _prefill(graph, prefill_length: int, cache_length: int, weights, tokens, prompt_lengths):
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graph, weights)
    cache = model.init_cache(tokens.shape[0], cache_length)
    _, cache = model.extend(tokens[:, :prefill_length], cache, num_tokens=prompt_lengths - 1)
    return cache


def init_state(graphs: dict[str, nnx.GraphDef], weights: Weights, tokens: jax.Array,
               prompt_lengths: jax.Array, max_new_tokens: jax.Array, eos_id: jax.Array,
               rng: jax.Array, *, prefill_length: int, cache_slack: int, hist_size: int,
               counters: tuple[str, ...] = ()) -> LoopState:
    """What an autoregressive sampler's `init` does: prefill a cache for each named model
    (caches of tokens.shape[1] + cache_slack positions), then a fresh state."""
    cache_length = tokens.shape[1] + cache_slack
    caches = {name: prefill(graph, weights[name], tokens, prompt_lengths,
                            prefill_length=prefill_length, cache_length=cache_length)
              for name, graph in graphs.items()}
    return new_state(tokens, prompt_lengths, max_new_tokens, eos_id, rng, caches=caches,
                     hist_size=hist_size, counters=counters)


def pending_token(state: LoopState) -> jax.Array:
    """int32[B]: each row's newest committed token, the one its model caches have not seen."""
    return jnp.take_along_axis(state.tokens, (state.lengths - 1)[:, None], axis=1)[:, 0]


def commit(state: LoopState, new_tokens: jax.Array, counts: jax.Array
           ) -> tuple[LoopState, jax.Array]:
    """Appends the first counts[b] of new_tokens[b] (int32[B, C]) to each active row.

    A row's commit is cut after its first end-of-sequence token (any id of `state.eos_id`)
    and at its length limit; the row is then done. Done rows commit nothing. Returns the new
    state and the committed counts int32[B] (what a sampler rewinds its caches by).
    """
    batch, width = new_tokens.shape
    buffer_length = state.tokens.shape[1]
    active = ~state.done
    i = jnp.arange(width, dtype=jnp.int32)[None, :]
    is_eos = (jnp.any(new_tokens[:, :, None] == state.eos_id, axis=-1)
              & (i < counts[:, None]))
    has_eos = jnp.any(is_eos, axis=1)
    n = jnp.where(has_eos, jnp.argmax(is_eos, axis=1) + 1, counts)
    n = jnp.clip(jnp.minimum(n, state.limits - state.lengths), 0, width)
    n = jnp.where(active, n, 0).astype(jnp.int32)
    # Positions past the committed count point outside the buffer and are dropped.
    positions = jnp.where(i < n[:, None], state.lengths[:, None] + i, buffer_length)
    rows = jnp.arange(batch)[:, None]
    tokens = state.tokens.at[rows, positions].set(new_tokens.astype(jnp.int32), mode="drop")
    lengths = state.lengths + n
    ended = has_eos & (jnp.argmax(is_eos, axis=1) < n)
    done = state.done | (active & ended) | (lengths >= state.limits)
    state = state.replace(tokens=tokens, lengths=lengths, done=done)
    return record(state, n, active), n


def commit_at(state: LoopState, values: jax.Array, mask: jax.Array, done: jax.Array
              ) -> LoopState:
    """Commits values[b, j] wherever mask[b, j] (bool[B, L]) for rows not yet done, and marks
    rows `done` (bool[B]); for samplers that fill positions out of order (masked diffusion)."""
    active = ~state.done
    mask = mask & active[:, None]
    tokens = jnp.where(mask, values.astype(jnp.int32), state.tokens)
    n = jnp.sum(mask, axis=1).astype(jnp.int32)
    state = state.replace(tokens=tokens, done=state.done | done)
    return record(state, n, active)


def record(state: LoopState, committed: jax.Array, active: jax.Array) -> LoopState:
    """Adds one step's committed counts int32[B] of the active rows to the stats."""
    s = state.stats
    bins = jnp.clip(committed, 0, s.accepted_hist.shape[0] - 1)
    hist = s.accepted_hist.at[bins].add(active.astype(jnp.int32))
    slot = jnp.minimum(state.step, s.committed_per_step.shape[0] - 1)
    per_step = s.committed_per_step.at[slot].add(jnp.sum(committed))
    return state.replace(stats=s.replace(accepted_hist=hist, committed_per_step=per_step))


def run(step_fn, state: LoopState, max_steps, weights: Weights | None = None) -> LoopState:
    """Runs `step_fn(state, weights) -> state` under one jitted `lax.while_loop` until every
    row is done or `max_steps` steps have run.

    step_fn must be hashable and compare equal across calls for compiled code to be reused:
    a frozen dataclass, or a bound method of one such as `sampler.step` (Python compares bound
    methods by the identity of their object, so those are keyed by the object's value here).
    `state` is donated: do not use it after the call. `max_steps` is traced.
    """
    if inspect.ismethod(step_fn):
        step_fn = _BoundStep(step_fn.__self__, step_fn.__func__.__name__)
    return _run(step_fn, state, jnp.asarray(max_steps, jnp.int32), weights)


@dataclasses.dataclass(frozen=True)
class _BoundStep:
    """`owner.name` as a value-compared, hashable callable (a jit static argument)."""
    owner: Any
    name: str

    def __call__(self, state: LoopState, weights: Weights | None) -> LoopState:
        return getattr(self.owner, self.name)(state, weights)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _run(step_fn, state: LoopState, max_steps: jax.Array, weights: Weights | None) -> LoopState:
    TRACE_COUNTS["run"] += 1

    def cond(s: LoopState) -> jax.Array:
        return jnp.any(~s.done) & (s.step < max_steps)

    def body(s: LoopState) -> LoopState:
        s = step_fn(s, weights)
        return s.replace(step=s.step + 1, stats=s.stats.replace(rounds=s.stats.rounds + 1))

    return jax.lax.while_loop(cond, body, state)

"""The public decoding entry point: `generate(model, prompts, sampler=..., ...)`.

It checks the request on the host, pads the prompts into one token buffer, builds the named
sampler (decoding/sampling.py, decoding/speculative/), runs its jitted prefill and the single
jitted decoding loop (decoding/loop.py), and only then copies tokens and stats to the host.
Samplers: plain greedy and sampling, and the speculative family of Leviathan et al. (arXiv
2211.17192), Chen et al. (arXiv 2302.01318), prompt lookup decoding, FLy (arXiv 2511.22972),
Kangaroo-style self-speculation (arXiv 2404.18911) and SpecDec++ (arXiv 2405.19715); for
masked diffusion LMs, LLaDA's remasking, Fast-dLLM, Prophet, LocalLeap and FreeDave
(decoding/diffusion/). Every sampler is an entry of one registry (`_SAMPLERS`,
decoding/registry.py: constructor, draft needs, sampling, config class, its own request
check), so `generate` has no per-sampler branch.

What recompiles and what does not. Model weights enter jit as arguments (`nnx.split`), not as
constants. Prompts are padded to a bucket (a power of two, at least 16) and the buffer to a
power of two that holds bucket + max_new_tokens, so another prompt length in the same bucket
or another max_new_tokens that fits the same buffer reuses the compiled code; max_new_tokens,
the step budget and the sampling temperature, top-k and top-p values are traced. A different
sampler, sampler config (gamma, thresholds), batch size or bucket compiles anew, and so does
switching top-k or top-p on or off.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decoding import diffusion, loop
from decoding.registry import SamplerEntry, needs_causal_model
from decoding.sampling import INPUTS_KEY, Autoregressive, SamplingConfig
from decoding.speculative import (DraftModelSpeculative, FlyConfig, FlySpeculative,
                                  NgramConfig, NgramSpeculative, SelfSpecConfig,
                                  SelfSpeculative, SpeculativeConfig)
from decoding.speculative.self_spec import check_adapter
from decoding.speculative.specdecpp import SpecDecPP, SpecDecPPConfig, check_draft

MIN_PROMPT_BUCKET = 16


def _autoregressive(target, draft, config, filters):
    del draft, config
    return Autoregressive(target, filters)


def _speculative(target, draft, config, filters):
    return DraftModelSpeculative(target, draft, config, filters)


def _ngram(target, draft, config, filters):
    del draft
    return NgramSpeculative(target, config, filters)


def _fly(target, draft, config, filters):
    return FlySpeculative(target, draft, config, filters)


def _self_spec(target, draft, config, filters):
    return SelfSpeculative(target, config, filters, draft)


def _specdecpp(target, draft, config, filters):
    return SpecDecPP(target, draft, config, filters)


def _ar(build, draft: str, samples: bool, config_cls, check=needs_causal_model) -> SamplerEntry:
    return SamplerEntry(build, draft, samples, config_cls, check)


# The one sampler registry: name -> SamplerEntry (decoding/registry.py). "_greedy" variants
# verify by exact argmax match; FLy's default is greedy ("fly"), its T > 0 heuristic is
# "fly_sample". The masked-diffusion samplers list their own entries (decoding/diffusion/).
_SAMPLERS: dict[str, SamplerEntry] = {
    "greedy": _ar(_autoregressive, "none", False, None),
    "sample": _ar(_autoregressive, "none", True, None),
    "speculative_greedy": _ar(_speculative, "required", False, SpeculativeConfig),
    "speculative": _ar(_speculative, "required", True, SpeculativeConfig),
    "ngram_greedy": _ar(_ngram, "none", False, NgramConfig),
    "ngram": _ar(_ngram, "none", True, NgramConfig),
    "fly": _ar(_fly, "required", False, FlyConfig),
    "fly_sample": _ar(_fly, "required", True, FlyConfig),
    "self_spec_greedy": _ar(_self_spec, "optional", False, SelfSpecConfig, check_adapter),
    "self_spec": _ar(_self_spec, "optional", True, SelfSpecConfig, check_adapter),
    "specdecpp_greedy": _ar(_specdecpp, "required", False, SpecDecPPConfig, check_draft),
    "specdecpp": _ar(_specdecpp, "required", True, SpecDecPPConfig, check_draft),
    **diffusion.SAMPLERS,
}
SAMPLERS: tuple[str, ...] = tuple(_SAMPLERS)


@dataclasses.dataclass
class GenerateOutput:
    """tokens: the generated ids of each row (an end-of-sequence token, if hit, is the last
    one). stats: host-side numbers (see `generate`)."""
    tokens: list[list[int]]
    stats: dict[str, Any]


def sampler_spec(name: str) -> SamplerEntry:
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {SAMPLERS}")
    return _SAMPLERS[name]


def make_sampler(name: str, target: nnx.GraphDef, draft: nnx.GraphDef | None = None, *,
                 sampling: SamplingConfig | None = None, config: Any = None) -> loop.Sampler:
    """The sampler `name` on the given graphdefs. `config` defaults to the sampler's config
    class as gin configures it; `sampling` defaults to SamplingConfig() for sampling samplers
    and must be None for greedy ones. The sampler keeps only which sampling filters are on:
    its `step` reads the values from the loop inputs under sampling.INPUTS_KEY (see
    `sampling_inputs`)."""
    spec = sampler_spec(name)
    if spec.samples:
        sampling = sampling if sampling is not None else SamplingConfig()
    elif sampling is not None:
        raise ValueError(f"sampler {name!r} is greedy and takes no sampling config (got "
                         f"{sampling}); sampling samplers: "
                         f"{tuple(n for n, s in _SAMPLERS.items() if s.samples)}")
    if spec.draft == "required" and draft is None:
        raise ValueError(f"sampler {name!r} needs a draft model (draft_model=...)")
    if spec.draft == "none" and draft is not None:
        raise ValueError(f"sampler {name!r} takes no draft model; samplers with a draft: "
                         f"{tuple(n for n, s in _SAMPLERS.items() if s.draft != 'none')}")
    if spec.config_cls is None:
        if config is not None:
            raise ValueError(f"sampler {name!r} takes no config, got {config!r}")
    elif config is None:
        config = spec.config_cls()
    elif not isinstance(config, spec.config_cls):
        raise ValueError(f"sampler {name!r} needs a {spec.config_cls.__name__}, "
                         f"got {type(config).__name__}")
    return spec.build(target, draft, config, None if sampling is None else sampling.filters)


def sampling_inputs(name: str, sampling: SamplingConfig | None) -> dict[str, Any]:
    """The loop inputs, beside the models' weights, that sampler `name` reads: the traced
    sampling values for a sampling sampler (SamplingConfig() when None), nothing for a
    greedy one."""
    if not sampler_spec(name).samples:
        return {}
    config = sampling if sampling is not None else SamplingConfig()
    return {INPUTS_KEY: {k: jnp.asarray(v) for k, v in config.values().items()}}


def prompt_bucket(length: int) -> int:
    """The padded prompt length: the next power of two, at least MIN_PROMPT_BUCKET."""
    return max(MIN_PROMPT_BUCKET, 1 << max(length - 1, 0).bit_length())


def _prompt_rows(prompts, prompt_lengths, vocab_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    if isinstance(prompts, (list, tuple)) and prompt_lengths is None:
        rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    else:
        array = np.asarray(prompts)
        if array.ndim != 2:
            raise ValueError(f"prompts must be a list of token lists or a [B, T] array, got "
                             f"an array of shape {array.shape}")
        lengths = (np.full(array.shape[0], array.shape[1]) if prompt_lengths is None
                   else np.asarray(prompt_lengths).reshape(-1))
        if lengths.shape[0] != array.shape[0] or np.any(lengths > array.shape[1]):
            raise ValueError(f"prompt_lengths={lengths.tolist()} do not fit prompts of shape "
                             f"{array.shape}")
        rows = [array[b, :int(n)].astype(np.int64) for b, n in enumerate(lengths)]
    if not rows:
        raise ValueError("prompts is empty; give at least one prompt")
    for b, row in enumerate(rows):
        if row.size == 0:
            raise ValueError(f"prompt {b} is empty; every prompt needs at least one token "
                             "(e.g. the tokenizer's BOS id)")
        bad = row[(row < 0) | (row >= vocab_size)]
        if bad.size:
            raise ValueError(f"prompt {b} holds token id {int(bad[0])}, outside the model's "
                             f"vocabulary [0, {vocab_size})")
    return rows, np.array([r.size for r in rows], np.int32)


def _budgets(max_new_tokens, batch: int) -> np.ndarray:
    """max_new_tokens (an int, or one per row) as int32[B]."""
    budgets = np.asarray(max_new_tokens)
    if (budgets.dtype.kind not in "iu" or budgets.ndim > 1 or np.any(budgets < 0)
            or (budgets.ndim == 1 and budgets.size != batch)):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0, or one "
                         f"per prompt ({batch})")
    return np.broadcast_to(budgets, (batch,)).astype(np.int32)


def _check_rewind_margin(name: str, sampler_obj, models: dict) -> None:
    """Models with bounded history (MSWA's ring buffers) can roll back only `rewind_margin`
    tokens; a speculative round may roll back up to the sampler's cache slack. Under jit a
    deeper rewind could only poison the row (NaN logits), so refuse it here, on the host."""
    depth = getattr(sampler_obj, "cache_slack", 0)
    for role, m in models.items():
        margin = getattr(getattr(m, "config", None), "rewind_margin", None)
        if margin is not None and depth > margin:
            raise ValueError(
                f"sampler {name!r} may roll the {role} back by {depth} tokens, but its "
                f"rewind_margin={margin}; raise the model's rewind_margin to at least {depth} "
                "or lower the sampler's gamma")


def _check_min_prompt_length(lengths: np.ndarray, models: dict) -> None:
    """Models that predict only after a whole first unit of context (the Block Transformer
    needs one block) declare `config.min_prompt_length`; refuse shorter prompts on the host."""
    for role, m in models.items():
        need = getattr(getattr(m, "config", None), "min_prompt_length", None)
        if need is not None and int(lengths.min()) < need:
            b = int(lengths.argmin())
            raise ValueError(f"prompt {b} has {int(lengths[b])} tokens, but the {role} model "
                             f"needs at least min_prompt_length={need} to start decoding "
                             "(left-pad it with the pad id, e.g. pads then BOS)")


def generate(model, prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array, *,
             sampler: str = "greedy", max_new_tokens: int | Sequence[int] = 32, seed: int = 0,
             draft_model=None, sampling: SamplingConfig | None = None, config: Any = None,
             eos_id: int | Sequence[int] | None = None,
             prompt_lengths: Sequence[int] | None = None, max_length: int | None = None,
             max_steps: int | None = None,
             on_chunk: Callable[[list[list[int]]], None] | None = None,
             chunk_steps: int = 16) -> GenerateOutput:
    """Decodes up to max_new_tokens tokens (an int, or one per row) after each prompt with
    the named sampler.

    model / draft_model: models of the protocol (models/core/protocol.py); the draft must
        share the target's vocabulary. Samplers: SAMPLERS. For the self_spec samplers the
        optional draft_model is a trained EarlyExitAdapter of `model` (Kangaroo); without
        one the early exit reads the target's head directly.
    prompts: a list of token-id lists (ragged), or a [B, T] array with prompt_lengths.
    sampling: SamplingConfig for the sampling samplers; config: the sampler's own config
        (SpeculativeConfig, NgramConfig, FlyConfig, SelfSpecConfig), gin defaults if None.
    eos_id: a row stops after emitting it, or any of several ids (a chat model's end-of-turn
        and end-of-text); None: rows run to max_new_tokens.
    max_length: buffer length (prompt + generated) to use instead of the automatic one;
        a prompt that leaves no room in it is an error.
    max_steps: loop step budget (default max_new_tokens, enough since every step commits at
        least one token per unfinished row).
    on_chunk: streaming. The loop then runs `chunk_steps` steps at a time (the same compiled
        loop: its step budget is traced) and after each chunk on_chunk(tokens) receives every
        row's generated ids so far: one device -> host copy per chunk, never one per token.

    Returns GenerateOutput(tokens, stats) with stats: sampler, steps, prefill_calls,
    target_calls and draft_calls (batched calls after prefill), drafted, accepted,
    acceptance_rate, tokens_per_target_call (mean tokens a row commits per target call),
    accepted_hist, committed_per_step, new_tokens per row, and sampler counters.
    """
    sampler_spec(sampler)  # an unknown name fails before any work
    vocab_size = int(model.vocab_size)
    if draft_model is not None and int(draft_model.vocab_size) != vocab_size:
        raise ValueError(f"draft model vocab_size={draft_model.vocab_size} differs from the "
                         f"target's vocab_size={vocab_size}; they must share a vocabulary")
    rows, lengths = _prompt_rows(prompts, prompt_lengths, vocab_size)
    budgets = _budgets(max_new_tokens, len(rows))
    stop_ids = _stop_ids(eos_id)
    longest = int(lengths.max())
    if max_length is None:
        buffer_length = 1 << (prompt_bucket(longest) + max(int(budgets.max()), 1) - 1
                              ).bit_length()
    else:
        buffer_length = int(max_length)
        if longest >= buffer_length:
            raise ValueError(f"prompt {int(lengths.argmax())} has {longest} tokens, which does "
                             f"not fit max_length={buffer_length} (the cache must hold the "
                             "prompt and at least one new token)")
    prefill_length = min(prompt_bucket(longest), buffer_length)

    target_graph, target_weights = nnx.split(model)
    weights = {"target": target_weights}
    draft_graph = None
    if draft_model is not None:
        draft_graph, weights["draft"] = nnx.split(draft_model)
    sampler_obj = make_sampler(sampler, target_graph, draft_graph, sampling=sampling,
                               config=config)
    check = sampler_spec(sampler).check
    if check is not None:
        check(sampler, sampler_obj, model, draft_model, rows, budgets)
    _check_rewind_margin(sampler, sampler_obj, {"target": model, "draft": draft_model})
    _check_min_prompt_length(lengths, {"target": model, "draft": draft_model})
    weights.update(sampling_inputs(sampler, sampling))

    tokens = np.zeros((len(rows), buffer_length), np.int32)
    for b, row in enumerate(rows):
        tokens[b, :row.size] = row
    state = sampler_obj.init(weights, jnp.asarray(tokens), jnp.asarray(lengths),
                             jnp.asarray(budgets), jnp.asarray(stop_ids),
                             jax.random.key(seed), prefill_length=prefill_length)
    budget = int(budgets.max()) if max_steps is None else max_steps
    if on_chunk is None:
        state = loop.run(sampler_obj.step, state, budget, weights)
    else:
        state = _run_streaming(sampler_obj, state, budget, weights, lengths, on_chunk,
                               chunk_steps)

    # The one device -> host transfer of the call (streaming adds one per chunk).
    host = jax.device_get({"tokens": state.tokens, "lengths": state.lengths,
                           "step": state.step, "stats": state.stats})
    out_tokens = [host["tokens"][b, lengths[b]:host["lengths"][b]].tolist()
                  for b in range(len(rows))]
    return GenerateOutput(out_tokens, _stats(sampler, host, out_tokens, draft_model is not None))


def _stop_ids(eos_id: int | Sequence[int] | None) -> np.ndarray:
    """int32[K] end-of-sequence ids for the loop (-1 matches no token)."""
    ids = np.asarray([-1] if eos_id is None else eos_id).reshape(-1)
    if ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError(f"eos_id={eos_id!r} must be a token id, a sequence of token ids, or "
                         "None")
    return ids.astype(np.int32)


def _run_streaming(sampler_obj, state: loop.LoopState, budget: int, weights, prompt_lengths,
                   on_chunk, chunk_steps: int) -> loop.LoopState:
    """loop.run in chunks of chunk_steps steps, handing the tokens so far to on_chunk after
    each; the loop's cond still stops early once every row is done."""
    if chunk_steps < 1:
        raise ValueError(f"chunk_steps={chunk_steps} must be at least 1")
    steps = 0
    while True:
        steps = min(steps + chunk_steps, budget)
        state = loop.run(sampler_obj.step, state, steps, weights)
        host = jax.device_get({"tokens": state.tokens, "lengths": state.lengths,
                               "done": state.done})
        on_chunk([host["tokens"][b, prompt_lengths[b]:host["lengths"][b]].tolist()
                  for b in range(len(prompt_lengths))])
        if steps >= budget or bool(np.all(host["done"])):
            return state


def _stats(sampler: str, host: dict, out_tokens: list[list[int]], has_draft: bool) -> dict:
    s = host["stats"]
    hist = np.asarray(s.accepted_hist)
    steps = int(host["step"])
    row_rounds = int(hist.sum())
    stats = {
        "sampler": sampler,
        "steps": steps,
        "prefill_calls": 2 if has_draft else 1,
        "target_calls": int(s.target_calls),
        "draft_calls": int(s.draft_calls),
        "drafted": int(s.drafted),
        "accepted": int(s.accepted),
        "acceptance_rate": float(s.accepted) / max(int(s.drafted), 1),
        "tokens_per_target_call": float((np.arange(hist.size) * hist).sum()) / max(row_rounds, 1),
        "accepted_hist": hist.tolist(),
        "committed_per_step": np.asarray(s.committed_per_step)[:steps].tolist(),
        "new_tokens": [len(t) for t in out_tokens],
    }
    stats.update({k: int(v) for k, v in s.counters.items()})
    return stats

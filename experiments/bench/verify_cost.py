"""What a speculative verification costs against one decoding step, on this machine.

Speculative decoding (Leviathan et al., arXiv 2211.17192) pays when scoring gamma + 1 tokens
in one target call costs about what scoring one token costs, i.e. when a decode step is bound
by reading the weights rather than by arithmetic. This bench times, at batch 1 after a
112-token prompt, one jitted `extend` of 1 token and of gamma + 1 tokens on the same cache,
and reports their ratio: the number of plain decoding steps one verification is worth. Every
position's logits are consumed, as a verification does. The two calls are timed in
interleaved rounds (best round's ratio `value`, per-round median `ratio_median`). The ideal
is 1; a sampler whose rounds commit t tokens per target call can beat plain decoding
only if t exceeds this ratio plus its drafting cost in the same units.

Cases: the speculative bench's target shape (experiments/configs/target_small.gin, 3M
parameters) and the decode bench's ~100M-parameter shape, both randomly initialised (the
weights' values do not change the cost), at gamma 4 (greedy speculative decoding) and 15
(FLy's spd_k).

    python -m experiments.bench.verify_cost [--gammas 4,15] [--repeats 200]

prints one JSON line per (model, gamma): metric `verify_cost_ratio`, with the two times.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench.sizes import DECODE_SIZES, gin_model_config
from models import registry
from models.transformer import Transformer, TransformerConfig

PROMPT_TOKENS = 112
MODELS = ("target_small", "100m")


def model_config(name: str) -> TransformerConfig:
    if name == "target_small":
        return gin_model_config("target_small.gin")
    if name in DECODE_SIZES:
        return DECODE_SIZES[name]
    raise ValueError(f"unknown model {name!r}; valid: {list(MODELS)}")


@functools.partial(jax.jit, static_argnums=0)
def _extend(graph, weights, tokens, cache):
    logits, cache = nnx.merge(graph, weights).extend(tokens, cache)
    # A verification reads the logits of every drafted position: keep them all live. With
    # only the last row returned, XLA may compute the head for that row alone (today's XLA:CPU
    # still computes every row, but nothing promises it).
    return jnp.argmax(logits, -1), cache.lengths


def _seconds_per_call(graph, weights, tokens, cache, repeats: int) -> float:
    """Mean wall time of one extend of `tokens` on `cache` over `repeats` calls (the cache is
    not donated, so every call starts from the same state)."""
    start = time.perf_counter()
    for _ in range(repeats):
        out = _extend(graph, weights, tokens, cache)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def measure_model(model, gammas: list[int], repeats: int, rounds: int = 5) -> list[dict]:
    """One row per gamma: the 1-token and (gamma + 1)-token extend times of `model` at batch
    1 after a PROMPT_TOKENS prompt. The calls are timed in interleaved rounds so that a
    change of the machine's load hits both sides of a ratio alike; `value` is the ratio of
    the best rounds and `ratio_median` the median of the per-round ratios."""
    graph, weights = nnx.split(model)
    prompt = jax.random.randint(jax.random.key(0), (1, PROMPT_TOKENS), 0,
                                model.config.vocab_size)
    cache = model.init_cache(1, 256)
    _, cache = jax.jit(lambda w, t, c: nnx.merge(graph, w).extend(t, c))(weights, prompt,
                                                                          cache)
    widths = [1] + [g + 1 for g in gammas]
    calls = {w: jnp.tile(prompt[:, :1], (1, w)) for w in widths}
    for tokens in calls.values():
        jax.block_until_ready(_extend(graph, weights, tokens, cache))  # compile
    times = {w: [] for w in widths}
    for _ in range(rounds):
        for w, tokens in calls.items():
            times[w].append(_seconds_per_call(graph, weights, tokens, cache, repeats))
    one = min(times[1])
    rows = []
    for gamma in gammas:
        many = times[gamma + 1]
        rows.append({"gamma": gamma, "one_token_ms": one * 1e3, "verify_ms": min(many) * 1e3,
                     "value": min(many) / one,
                     "ratio_median": float(np.median(np.divide(many, times[1]))),
                     "rounds": rounds, "num_params": model.num_params()})
    return rows


def measure(config: TransformerConfig, gammas: list[int], repeats: int) -> list[dict]:
    return measure_model(registry.construct(Transformer, config, seed=0), gammas, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--gammas", default="4,15")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    gammas = [int(g) for g in args.gammas.split(",")]
    for name in args.models.split(","):
        config = model_config(name)
        repeats = args.repeats if name == "target_small" else max(args.repeats // 20, 3)
        for row in measure(config, gammas, repeats):
            print(json.dumps({
                "bench": "verify_cost", "case": f"{name}_gamma{row['gamma']}",
                "metric": "verify_cost_ratio", **row, "machine": platform.machine(),
                "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0],
                "backend": jax.default_backend()}), flush=True)


if __name__ == "__main__":
    main()

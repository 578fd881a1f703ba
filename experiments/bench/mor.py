"""Mixture-of-Recursions (arXiv 2507.10524) at CPU scale: training step time against the
Recursive Transformer, decode throughput with depth-wise batching against the vanilla and
Recursive Transformers, and KV-cache size, all measured side by side in one run.

Models: experiments/configs/mor_tiny.gin (Middle-Cycle, 8 effective layers = 1 + 2 x 3 + 1
of width 128, expert-choice, recursion-wise caching), recursive_tiny.gin (the same without a
router) and mor_vanilla_tiny.gin (8 unique layers of width 128); random weights, f32.

Metrics, one JSON line each:
  train_time_over_ideal  (MoR step time / Recursive step time) over the ideal ratio of block
                         applications from the capacities (2 + K sum c_r) / (2 + K N_r); a
                         training step is forward + backward on [8, 256] (goal <= 1.3).
  throughput_ratio       generated tokens/s (greedy through decoding.generate, 256 new tokens,
                         prompt 16, no EOS) of MoR over vanilla (vs_vanilla_bB) and over the
                         Recursive Transformer (vs_recursive_bB) at batches 1, 8, 32
                         (goal 1.5 vs vanilla at batch 32). MoR decodes with its default
                         decode capacity: a one-token step gathers ceil(c_r B) rows at
                         recursion r (B, 2B/3, B/3 for c = 1, 2/3, 1/3), so its compute per
                         step is fixed by the capacities; rows beyond them exit early.
                         `routed_fraction` is the fraction of tokens the (random) router sends
                         through each recursion under the causal rule, measured by prefilling
                         the generated sequences in one chunk (no capacity): about half at
                         each recursion, hierarchically, so the capacities rarely overflow.
  kv_bytes_ratio         K/V entries MoR's recursion-wise caches hold after prefilling prompt
                         + 256 tokens, over vanilla's, beside the analytic (N_r + 1) / (2 N_r)
                         for top-k capacities (the paper's memory claim). `allocated_ratio` is
                         the ratio of what init_cache allocates: every depth's cache is sized
                         for the whole buffer, so the saving is in occupancy (what a paged
                         cache would allocate), not in the static arrays.

    python -m experiments.bench.mor [--quick] [--output FILE.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from decoding.generate import generate
from experiments import gin_config, pipeline
from models import registry

MODELS = {"mor": "mor_tiny.gin", "recursive": "recursive_tiny.gin",
          "vanilla": "mor_vanilla_tiny.gin"}
TRAIN_GOAL, THROUGHPUT_GOAL = 1.3, 1.5


def build(gin_file: str, seed: int = 0):
    gin_config.parse([gin_file])
    name = pipeline.experiment()
    return registry.build(name, registry.lookup(name)[0](), seed=seed)


def _machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "jax_backend": jax.default_backend(), "jax": jax.__version__,
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def train_step_seconds(model, batch: int, seq: int, repeats: int) -> float:
    """Median seconds of a jitted forward + backward (LM loss + aux_loss) on [batch, seq]."""
    @nnx.jit
    def step(m, tokens):
        def loss(m):
            out = m(tokens[:, :-1])
            nll = optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens[:, 1:])
            return jnp.mean(nll) + out.aux_loss
        return nnx.grad(loss)(m)

    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, model.vocab_size)
    jax.block_until_ready(step(model, tokens))          # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(model, tokens))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def decode_seconds(model, prompts: np.ndarray, new: int) -> tuple[float, dict]:
    """Seconds of a warmed-up greedy generate of `new` tokens, and its stats."""
    length = 1 << (prompts.shape[1] + new - 1).bit_length()
    generate(model, prompts, sampler="greedy", max_new_tokens=2, max_length=length)  # compile
    start = time.perf_counter()
    out = generate(model, prompts, sampler="greedy", max_new_tokens=new, max_length=length)
    seconds = time.perf_counter() - start
    assert all(len(t) == new for t in out.tokens)
    return seconds, out


def routing_stats(model, prompts: np.ndarray, generated: list[list[int]]) -> dict:
    """Prefill prompt + generated tokens in one chunk (the same causal routing as decoding):
    K/V entries held, tokens routed per recursion, and the overflow of a one-token step."""
    seqs = np.concatenate([prompts, np.asarray(generated, np.int32)], axis=1)
    b, t = seqs.shape
    cache = model.init_cache(b, t)
    _, cache = nnx.jit(lambda m, x, c: m.extend(x, c))(model, jnp.asarray(seqs), cache)
    return {"kv_entries": float(np.mean(np.asarray(cache.kv_entries()))), "tokens": t,
            "routed": np.asarray(cache.routed).tolist()}


def emit(line: dict, output: str | None) -> dict:
    print(json.dumps(line), flush=True)
    if output:
        with open(output, "a") as f:
            f.write(json.dumps(line) + "\n")
    return line


def run(quick: bool = False, seed: int = 0, output: str | None = None) -> list[dict]:
    models = {role: build(f, seed) for role, f in MODELS.items()}
    mor_config = models["mor"].config
    params = {role: m.num_params(non_embedding=True) for role, m in models.items()}
    common = {"bench": "mor", "models": dict(MODELS), "non_embedding_params": params,
              "quick": quick}
    results = []

    # (1) training step time, MoR against the Recursive Transformer of the same shape.
    batch, seq, repeats = (2, 32, 2) if quick else (8, 256, 5)
    t_mor = train_step_seconds(models["mor"], batch, seq, repeats)
    t_rec = train_step_seconds(models["recursive"], batch, seq, repeats)
    ideal = mor_config.ideal_compute_fraction()
    results.append(emit({
        **common, "case": f"train_b{batch}_t{seq}", "metric": "train_time_over_ideal",
        "value": round(t_mor / t_rec / ideal, 3), "goal": TRAIN_GOAL,
        "mor_step_s": round(t_mor, 4), "recursive_step_s": round(t_rec, 4),
        "time_ratio": round(t_mor / t_rec, 3), "ideal_ratio": round(ideal, 4),
        "capacities": list(mor_config.resolved_capacities), **_machine()}, output))

    # (2) decode throughput with depth-wise batching, (3) KV entries.
    prompt, new = (8, 16) if quick else (16, 256)
    batches = (1, 2) if quick else (1, 8, 32)
    for b in batches:
        prompts = np.random.default_rng(seed + b).integers(3, 256, (b, prompt), dtype=np.int32)
        seconds, outs = {}, {}
        for role, model in models.items():
            seconds[role], outs[role] = decode_seconds(model, prompts, new)
        tps = {role: b * new / s for role, s in seconds.items()}
        stats = routing_stats(models["mor"], prompts, outs["mor"].tokens)
        rows = mor_config.decode_rows(b)
        detail = {"batch": b, "prompt_len": prompt, "new_tokens": new,
                  "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
                  "seconds": {k: round(v, 3) for k, v in seconds.items()},
                  "decode_rows": list(rows), "routed_per_recursion": stats["routed"],
                  "routed_fraction": [round(r / (b * stats["tokens"]), 3)
                                      for r in stats["routed"]], **_machine()}
        for other in ("vanilla", "recursive"):
            results.append(emit({
                **common, **detail, "case": f"vs_{other}_b{b}", "metric": "throughput_ratio",
                "value": round(tps["mor"] / tps[other], 3),
                "goal": THROUGHPUT_GOAL if other == "vanilla" and b == 32 else None}, output))
        n = mor_config.num_recursions
        vanilla_entries = models["vanilla"].config.n_layers * stats["tokens"]
        alloc = {role: cache_bytes(models[role], b, stats["tokens"]) for role in ("mor",
                                                                                 "vanilla")}
        results.append(emit({
            **common, **detail, "case": f"kv_b{b}", "metric": "kv_bytes_ratio",
            "value": round(stats["kv_entries"] / vanilla_entries, 4), "goal": None,
            "analytic_recursive_layers": round((n + 1) / (2 * n), 4),
            "analytic_with_ends": round(
                (2 + mor_config.layers_per_recursion * sum(mor_config.resolved_capacities))
                / mor_config.n_layers, 4),
            "allocated_ratio": round(alloc["mor"] / alloc["vanilla"], 4)}, output))
    return results


def cache_bytes(model, batch: int, length: int) -> int:
    shapes = jax.eval_shape(lambda: model.init_cache(batch, length))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    run(quick=args.quick, seed=args.seed, output=args.output)


if __name__ == "__main__":
    main()

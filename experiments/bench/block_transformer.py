"""Decode throughput of the Block Transformer beside a vanilla Transformer of equal
non-embedding parameters, both through `decoding.generate` in one run (Ho, Bae et al.,
arXiv 2406.02657; protocol of the official measure_generation_time.py at CPU scale).

Models: experiments/configs/block_tiny.gin (L_B = 4, 2 x 128 block decoder + 2 x 128 token
decoder, 0.82M non-embedding parameters) and block_vanilla_tiny.gin (4 x 128, 0.81M), random
weights (throughput does not depend on them), f32, greedy, no EOS, so every row generates
exactly `new` tokens. Regimes: prefill_heavy (prompt 2048, 128 new) and decode_heavy (prompt
128, 2048 new); batches 1, 8 and the largest of {16, 32, 64, 128} whose estimated peak memory
(caches plus the vanilla prefill's attention matrices) stays under a quarter of the machine's
available memory, capped by --max_batch (default 64: on a 2-core CPU the vanilla model's
decode-heavy run at batch 128 alone takes minutes, past the bench's time budget). Each call is warmed up (compilation) with the same buffer length, then timed
whole: prefill plus decoding, as the official script times `generate`.

Metrics, one JSON line each:
  throughput_ratio  generated tokens/s of the block model over the vanilla one
                    (goal 5 for decode_heavy at the largest batch)
  kv_bytes_ratio    cache bytes per token of context, block over vanilla, measured from the
                    arrays `init_cache` allocates for the run's buffer (block KV + local rings +
                    contexts + token history, against the vanilla KV cache)

    python -m experiments.bench.block_transformer [--quick] [--output FILE.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from decoding.generate import generate, prompt_bucket
from experiments import gin_config, pipeline
from models import registry

MODELS = {"block": "block_tiny.gin", "vanilla": "block_vanilla_tiny.gin"}
REGIMES = {"prefill_heavy": (2048, 128), "decode_heavy": (128, 2048)}
QUICK_REGIMES = {"prefill_heavy": (64, 8), "decode_heavy": (8, 64)}
LARGE_BATCHES = (16, 32, 64, 128)
GOAL = 5.0


def build(gin_file: str, seed: int = 0):
    gin_config.parse([gin_file])
    name = pipeline.experiment()
    config = registry.lookup(name)[0]()
    return registry.build(name, config, seed=seed)


def buffer_length(prompt: int, new: int) -> int:
    """The token buffer generate() would choose (fixed here so warm-up reuses the program)."""
    return 1 << (prompt_bucket(prompt) + new - 1).bit_length()


def cache_bytes(model, batch: int, length: int) -> int:
    """Bytes of every array of the model's decoding cache (shapes only; nothing allocated)."""
    shapes = jax.eval_shape(lambda: model.init_cache(batch, length))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return 8 * 2 ** 30


def peak_estimate(vanilla, batch: int, prompt: int, new: int) -> int:
    """Rough peak bytes of the vanilla side (the larger one): its cache plus the prefill's
    f32 attention logits and probabilities [B, H, S, S] for one layer."""
    c = vanilla.config
    s = prompt_bucket(prompt)
    return (cache_bytes(vanilla, batch, buffer_length(prompt, new))
            + 3 * batch * c.n_heads * s * s * 4)


def time_generate(model, prompts: np.ndarray, new: int, length: int) -> tuple[float, float]:
    """(seconds for the whole call, seconds for a 1-token call ~ prefill), both warmed up."""
    def call(n):
        out = generate(model, prompts, sampler="greedy", max_new_tokens=n, max_length=length)
        assert all(len(t) == n for t in out.tokens)  # host lists: the device work is done
    call(2)  # compiles prefill and loop for this buffer; max_new_tokens is traced
    start = time.perf_counter()
    call(1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    call(new)
    return time.perf_counter() - start, prefill


def run(quick: bool = False, batches: list[int] | None = None, seed: int = 0,
        output: str | None = None, max_batch: int = 64) -> list[dict]:
    models = {role: build(f, seed) for role, f in MODELS.items()}
    params = {role: m.num_params(non_embedding=True) for role, m in models.items()}
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(),
               "jax_backend": jax.default_backend(), "jax": jax.__version__}
    regimes = QUICK_REGIMES if quick else REGIMES
    results = []
    for regime, (prompt, new) in regimes.items():
        length = buffer_length(prompt, new)
        if batches is None:
            budget = available_bytes() // 4
            fitting = [b for b in LARGE_BATCHES if b <= max_batch
                       and peak_estimate(models["vanilla"], b, prompt, new) <= budget]
            case_batches = [1, 2] if quick else [1, 8, max(fitting or [LARGE_BATCHES[0]])]
        else:
            case_batches = batches
        for batch in case_batches:
            rng = np.random.default_rng(seed + batch)
            prompts = rng.integers(3, 256, (batch, prompt), dtype=np.int32)
            timing = {}
            for role, model in models.items():
                total, prefill = time_generate(model, prompts, new, length)
                timing[role] = {"s": total, "prefill_s": prefill,
                                "tokens_per_s": batch * new / total,
                                "cache_bytes": cache_bytes(model, batch, length)}
            b, v = timing["block"], timing["vanilla"]
            common = {
                "bench": "block_transformer", "case": f"{regime}_b{batch}", "batch": batch,
                "prompt_len": prompt, "new_tokens": new, "buffer_length": length,
                "models": dict(MODELS), "non_embedding_params": params,
                "block_tokens_per_s": round(b["tokens_per_s"], 1),
                "vanilla_tokens_per_s": round(v["tokens_per_s"], 1),
                "block_s": round(b["s"], 3), "vanilla_s": round(v["s"], 3),
                "block_prefill_s": round(b["prefill_s"], 3),
                "vanilla_prefill_s": round(v["prefill_s"], 3),
                "block_cache_bytes": b["cache_bytes"], "vanilla_cache_bytes": v["cache_bytes"],
                "largest_batch": batch == case_batches[-1], "quick": quick,
                "available_memory_gb": round(available_bytes() / 2 ** 30, 1), **machine,
                "load_avg_1m": round(os.getloadavg()[0], 2)}
            lines = [
                {**common, "metric": "throughput_ratio",
                 "value": round(b["tokens_per_s"] / v["tokens_per_s"], 3),
                 "goal": GOAL if regime == "decode_heavy" and batch == case_batches[-1]
                 and not quick else None},
                {**common, "metric": "kv_bytes_ratio",
                 "value": round(b["cache_bytes"] / v["cache_bytes"], 4), "goal": None,
                 "block_cache_bytes_per_token": round(b["cache_bytes"] / (batch * length), 1),
                 "vanilla_cache_bytes_per_token": round(v["cache_bytes"] / (batch * length), 1)}]
            for line in lines:
                print(json.dumps(line), flush=True)
                if output:
                    with open(output, "a") as f:
                        f.write(json.dumps(line) + "\n")
            results += lines
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny prompts and budgets at batches 1 and 2: a smoke check")
    p.add_argument("--batches", default=None,
                   help="comma-separated batch sizes instead of 1, 8 and the largest fitting")
    p.add_argument("--max_batch", type=int, default=64,
                   help="cap on the largest batch (from 16, 32, 64, 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    batches = None if args.batches is None else [int(b) for b in args.batches.split(",")]
    if batches is not None and any(b < 1 for b in batches):
        raise SystemExit(f"--batches={args.batches}: every batch size must be at least 1")
    run(quick=args.quick, batches=batches, seed=args.seed, output=args.output,
        max_batch=args.max_batch)


if __name__ == "__main__":
    main()

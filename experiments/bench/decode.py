"""Greedy decoding speed: swiftlm's jitted loop beside Hugging Face `generate`, same weights.

A Llama-style Transformer (Touvron et al. 2023, arXiv 2302.13971) is initialised at random,
converted with models/convert_hf.py into a transformers LlamaForCausalLM (torch, CPU, f32),
and both decode the same prompts greedily for exactly `new_tokens` tokens (no EOS on either
side). Each side is warmed up once (swiftlm: compilation; HF: first-call allocations) and then
timed over whole calls, prefill included. Both must produce the same tokens (`tokens_match`).

The HF side gets its usual fast setup: torch.inference_mode(), all CPU threads, the KV cache
(use_cache=True), do_sample=False, min_new_tokens = max_new_tokens. On a machine busy with
other work, torch's thread pool suffers more than XLA's (measured at load ~8 on 2 cores: HF was
3-7x slower with 2 threads than with 1), so each line records the load average, and
--torch_threads=1 gives the HF side its better setting there.

At batch 1 decoding is memory bound, so the speed is also read against the machine's floor:
every generated token must read the weights once (all of them but the embedding rows not
looked up) plus the KV cache of its context; `bandwidth_fraction` = achieved tokens/s divided
by (copy bandwidth / bytes per token), the copy bandwidth measured in the same run with a large
jnp array copy (bytes read + bytes written per second, as STREAM counts it).

    python -m experiments.bench.decode [--sizes tiny,100m] [--batches 1,8] [--new_tokens 256]
        [--repeats 1] [--torch_threads N]

prints one JSON line per result: metric `speedup_vs_hf` for cases tiny_b1, tiny_b8, 100m_b1,
100m_b8, and `bandwidth_fraction` for each batch-1 case (the goal is set for 100m_b1; the tiny
model fits in cache, so its floor means little).
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
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from decoding.generate import generate
from experiments.bench.sizes import DECODE_SIZES
from models import convert_hf, registry
from models.transformer import Transformer, TransformerConfig

GOALS = {("speedup_vs_hf", "tiny"): 3.0, ("speedup_vs_hf", "100m"): 1.5,
         ("bandwidth_fraction", "100m"): 0.5}


def measure_copy_bandwidth(nbytes: int = 512 * 2 ** 20, repeats: int = 5) -> float:
    """Bytes moved per second (read + write, as STREAM counts a copy) by a jitted elementwise
    copy of an f32 array far larger than any cache; the best of `repeats`.

    The input is donated so the output reuses its buffer: a fresh 512 MiB output each call
    would time the kernel's first-touch page faults (measured: ~10x slower), not the memory.
    """
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)  # +1: a real read and write per element
    x = copy(jnp.zeros((nbytes // 4,), jnp.float32))
    x.block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x = copy(x)
        x.block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def measure_memcpy_bandwidth(nbytes: int = 512 * 2 ** 20, repeats: int = 5) -> float:
    """The same for numpy's memcpy (non-temporal stores, often faster than XLA's loop); reported
    beside the jnp figure so the floor's choice of bandwidth is visible."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def bytes_per_token(config: TransformerConfig, num_params: int, context: float) -> dict:
    """Bytes one batch-1 decode step must read: the f32 weights (an untied embedding table is
    only looked up, one row) and the K and V of `context` cached positions."""
    weights = num_params * 4
    if not config.tie_embeddings:
        weights -= (config.vocab_size - 1) * config.d_model * 4
    itemsize = jnp.dtype(config.compute_dtype).itemsize
    kv = 2 * config.n_layers * config.n_kv_heads * config.resolved_head_dim * itemsize * context
    return {"weights": weights, "kv_cache": int(kv), "total": int(weights + kv)}


def _to_hf(model: Transformer) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(LlamaConfig(**convert_hf.config_to_hf(model.config))).eval()
    state = {k: torch.from_numpy(v) for k, v in convert_hf.to_hf_state_dict(model).items()}
    hf.load_state_dict(state, strict=True)
    hf.generation_config.eos_token_id = None  # no EOS: both sides decode exactly new_tokens
    hf.generation_config.pad_token_id = 0     # never used (no padding); silences a warning
    return hf


def _time_ours(model, prompts: np.ndarray, new_tokens: int, repeats: int):
    def call():
        return generate(model, prompts, sampler="greedy", max_new_tokens=new_tokens, seed=0)
    call()  # compiles prefill and loop; later calls reuse them
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()  # returns host lists, so the device work is finished
        best = min(best, time.perf_counter() - start)
    return best, np.asarray(out.tokens)


def _time_hf(hf, prompts: np.ndarray, new_tokens: int, repeats: int):
    input_ids = torch.from_numpy(prompts.astype(np.int64))
    mask = torch.ones_like(input_ids)

    def call(n):
        return hf.generate(input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True)
    with torch.inference_mode():
        call(8)  # warm-up: torch has nothing to compile, the first call only allocates
        best, out = float("inf"), None
        for _ in range(repeats):
            start = time.perf_counter()
            out = call(new_tokens)
            best = min(best, time.perf_counter() - start)
    return best, out[:, prompts.shape[1]:].numpy()


def _first_mismatch(a: np.ndarray, b: np.ndarray) -> list | None:
    if a.shape != b.shape:
        return [list(a.shape), list(b.shape)]
    diff = np.argwhere(a != b)
    return None if diff.size == 0 else diff[0].tolist()


def run(sizes: list[str], batches: list[int], prompt_len: int, new_tokens: int,
        repeats: int, seed: int, torch_threads: int | None = None) -> list[dict]:
    torch.set_num_threads(torch_threads or os.cpu_count())
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(),
               "jax_backend": jax.default_backend(), "jax": jax.__version__,
               "torch": torch.__version__, "transformers": transformers.__version__,
               "torch_threads": torch.get_num_threads()}
    results = []
    for size in sizes:
        config = DECODE_SIZES[size]
        model = registry.construct(Transformer, config, seed=seed)
        hf = _to_hf(model)
        num_params = model.num_params()
        for batch in batches:
            case = f"{size}_b{batch}"
            rng = np.random.default_rng(seed + batch)
            prompts = rng.integers(0, config.vocab_size, (batch, prompt_len), dtype=np.int32)
            ours_s, ours_tokens = _time_ours(model, prompts, new_tokens, repeats)
            hf_s, hf_tokens = _time_hf(hf, prompts, new_tokens, repeats)
            generated = batch * new_tokens
            ours_tps, hf_tps = generated / ours_s, generated / hf_s
            common = {"bench": "decode", "case": case, "params": num_params, "batch": batch,
                      "prompt_len": prompt_len, "new_tokens": new_tokens,
                      "ours_tokens_per_s": round(ours_tps, 1),
                      "hf_tokens_per_s": round(hf_tps, 1), "ours_s": round(ours_s, 4),
                      "hf_s": round(hf_s, 4),
                      "tokens_match": bool(np.array_equal(ours_tokens, hf_tokens)),
                      "first_mismatch": _first_mismatch(ours_tokens, hf_tokens),
                      "config": dict(config.__dict__), **machine,
                      # Other processes on the machine skew every number; this says how much.
                      "load_avg_1m": round(os.getloadavg()[0], 2)}
            lines = [{**common, "metric": "speedup_vs_hf", "value": round(ours_tps / hf_tps, 3),
                      "goal": GOALS.get(("speedup_vs_hf", size))}]
            if batch == 1:
                # Mean context a decode step reads: the prompt plus half the generated tokens.
                need = bytes_per_token(config, num_params, prompt_len + (new_tokens - 1) / 2)
                bandwidth = measure_copy_bandwidth()  # now, under the load the timings saw
                memcpy = measure_memcpy_bandwidth()
                floor_tps = bandwidth / need["total"]
                lines.append({**common, "metric": "bandwidth_fraction",
                              "value": round(ours_tps / floor_tps, 3),
                              "goal": GOALS.get(("bandwidth_fraction", size)),
                              "hf_bandwidth_fraction": round(hf_tps / floor_tps, 3),
                              "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
                              "memcpy_bandwidth_gb_s": round(memcpy / 1e9, 2),
                              "bandwidth_fraction_vs_memcpy": round(
                                  ours_tps * need["total"] / memcpy, 3),
                              "bytes_per_token": need,
                              "floor_tokens_per_s": round(floor_tps, 1)})
            for line in lines:
                print(json.dumps(line), flush=True)
            results += lines
    return results


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,100m",
                   help=f"comma-separated model sizes from {tuple(DECODE_SIZES)}")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="timed calls per side; best is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch_threads", type=int, default=None,
                   help="threads for the HF side (default: os.cpu_count()); on a machine "
                        "busy with other work fewer threads can be faster")
    args = p.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in args.sizes if s not in DECODE_SIZES]
    if unknown:
        p.error(f"unknown size(s) {unknown}; valid: {tuple(DECODE_SIZES)}")
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if not args.batches or min(args.batches) < 1:
        p.error(f"--batches={args.batches} must list batch sizes >= 1")
    if args.prompt_len < 1 or args.new_tokens < 1 or args.repeats < 1:
        p.error("--prompt_len, --new_tokens and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    run(args.sizes, args.batches, args.prompt_len, args.new_tokens, args.repeats, args.seed,
        args.torch_threads)


if __name__ == "__main__":
    main()

"""Training-step efficiency: model FLOP utilisation against the matmul rate measured in the
same run, and the data loader's throughput beside what the train step consumes.

    python -m experiments.bench.train_step [--cases tiny,small] [--steps 5] [--no_loader]

mfu = achieved training FLOP/s / the FLOP/s a large jitted f32 matmul (2048 x 2048 @
2048 x 2048, median of several calls) reaches on the same device in the same run. So the
ratio says how close the train step gets to this machine's own dense-matmul rate, whatever the
machine. Training FLOPs per token (Kaplan et al. 2020, arXiv 2001.08361; PaLM's attention
term, arXiv 2204.02311):

    6 * N_matmul + 12 * n_layers * n_heads * head_dim * T

N_matmul counts the weights that enter a matmul (every parameter but the embedding table,
whose lookup is a gather; the untied output head is included), 6 = forward 2 + backward 4,
and the attention term counts QK^T and PV over all T keys, which is what the dense XLA
attention computes before masking. Norms, softmax, RoPE and the optimizer are not counted.

loader_over_train = tokens/s the train.data pipeline delivers (experiments/bench/loader.py)
/ tokens/s the train step consumes, at the case's batch size and sequence length (goal 10).

Prints one JSON line per (case, metric).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.transformer import TransformerConfig
from train import trainer

CASES = {
    # name: (model config, batch size, sequence length, mfu goal)
    "tiny": (TransformerConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2), 8, 256, None),
    "small": (TransformerConfig(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4), 8, 512, 0.5),
}
MATMUL_SIZE = 2048


def _median_seconds(fn: Callable[[], jax.Array], repeats: int) -> float:
    jax.block_until_ready(fn())   # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_s(size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """FLOP/s of a jitted f32 [size, size] @ [size, size] matmul (median)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return 2 * size ** 3 / _median_seconds(lambda: matmul(a, b), repeats)


def train_flops_per_token(config: TransformerConfig, num_params: int, seq_len: int) -> float:
    """6 * N_matmul + 12 * n_layers * n_heads * head_dim * T (see the module docstring)."""
    n_matmul = num_params - config.vocab_size * config.d_model   # minus the embedding table
    attention = 12 * config.n_layers * config.n_heads * config.resolved_head_dim * seq_len
    return 6 * n_matmul + attention


def _batch(batch_size: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (batch_size, seq_len)
    return {"inputs": rng.integers(0, vocab, shape, dtype=np.int32),
            "targets": rng.integers(0, vocab, shape, dtype=np.int32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
            "loss_mask": np.ones(shape, np.int32)}


def measure_train_step(config: TransformerConfig, batch_size: int, seq_len: int,
                       steps: int) -> dict[str, float]:
    """Seconds per optimizer step (after compilation) and the model's parameter count."""
    train_config = trainer.TrainConfig(steps=1000, warmup_steps=10)
    graphdef, state = trainer.init_train_state("transformer", config, train_config)
    step = trainer.make_train_step(graphdef, train_config.optimizer(),
                                   train_config.schedule_fn())
    batch = {k: jnp.asarray(v) for k, v in _batch(batch_size, seq_len, config.vocab_size).items()}
    state, metrics = step(state, batch)   # compile
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    return {"step_seconds": seconds, "num_params": num_params,
            "loss": float(metrics["loss"])}


def loader_over_train(train_tokens_per_s: float, *, batch_size: int, seq_len: int,
                      num_batches: int = 50) -> dict[str, float]:
    """The loader's tokens/s (experiments/bench/loader.py, default dataset and tokenizer) at
    this batch shape, over the train step's tokens/s."""
    from experiments.bench.loader import measure_loader_tokens_per_s
    from train import data

    config = data.DataConfig(batch_size=batch_size, seq_len=seq_len)
    loader_tokens_per_s = measure_loader_tokens_per_s(config, num_batches=num_batches)
    return {"value": loader_tokens_per_s / train_tokens_per_s,
            "loader_tokens_per_s": loader_tokens_per_s}


def _emit(case: str, metric: str, value: float, goal, **details) -> None:
    print(json.dumps({"bench": "train_step", "case": case, "metric": metric,
                      "value": round(value, 4), "goal": goal, **details}), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {list(CASES)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case")
    p.add_argument("--no_loader", action="store_true", help="skip loader_over_train")
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    for name in cases:
        if name not in CASES:
            raise ValueError(f"unknown case {name!r}; valid: {list(CASES)}")
    machine = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
               "num_devices": jax.device_count(), "machine": platform.machine()}
    for name in cases:
        config, batch_size, seq_len, goal = CASES[name]
        # Measured next to each case, so both numbers see the same machine load.
        peak = matmul_flops_per_s()
        result = measure_train_step(config, batch_size, seq_len, args.steps)
        tokens = batch_size * seq_len
        flops = train_flops_per_token(config, result["num_params"], seq_len) * tokens
        achieved = flops / result["step_seconds"]
        tokens_per_s = tokens / result["step_seconds"]
        _emit(name, "mfu", achieved / peak, goal,
              achieved_flops_per_s=round(achieved), matmul_flops_per_s=round(peak),
              matmul_size=MATMUL_SIZE, step_seconds=round(result["step_seconds"], 5),
              tokens_per_s=round(tokens_per_s, 1), flops_per_step=flops,
              num_params=result["num_params"], batch_size=batch_size, seq_len=seq_len,
              d_model=config.d_model, n_layers=config.n_layers, steps=args.steps, **machine)
        if not args.no_loader:
            loader = loader_over_train(tokens_per_s, batch_size=batch_size, seq_len=seq_len)
            _emit(name, "loader_over_train", loader["value"], 10,
                  loader_tokens_per_s=round(loader["loader_tokens_per_s"], 1),
                  train_tokens_per_s=round(tokens_per_s, 1), batch_size=batch_size,
                  seq_len=seq_len, **machine)


if __name__ == "__main__":
    main()

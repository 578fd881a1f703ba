"""Data loader throughput: packed training tokens per second out of train.data's grain pipeline.

The loader must outrun the train step, so this number is read next to the train-step
benchmark's tokens/s. Timed over an already-warmed iterator (threads started, first shuffle
window filled), so it measures the steady state a long run sees.

    python -m experiments.bench.loader --seq_len=1024 --batch_size=8 --num_batches=200

prints one JSON line: {"bench": "loader", "case": ..., "metric": "tokens_per_s", "value": ...,
"goal": null, ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import grain

from train import data


def _time_batches(iterator, num_batches: int) -> tuple[float, int]:
    """Seconds to draw `num_batches` batches, and how many of their targets are scored."""
    scored = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        scored += int(next(iterator)["loss_mask"].sum())
    return time.perf_counter() - start, scored


def measure_loader_tokens_per_s(config: data.DataConfig, num_batches: int,
                                warmup_batches: int = 10) -> float:
    """Steady-state tokens (batch_size * seq_len positions) per second the loader delivers."""
    return _measure(config, num_batches, warmup_batches)["value"]


def _measure(config: data.DataConfig, num_batches: int, warmup_batches: int) -> dict:
    iterator = data.make_iterator(config)
    try:
        _time_batches(iterator, warmup_batches)
        seconds, scored = _time_batches(iterator, num_batches)
    finally:
        iterator.close()  # stop prefetch threads now, not at interpreter exit
    tokens = num_batches * config.batch_size * config.seq_len
    return {"value": tokens / seconds, "seconds": seconds, "tokens": tokens,
            "scored_fraction": scored / tokens}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = data.DataConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default=defaults.dataset)
    p.add_argument("--tokenizer", default=defaults.tokenizer)
    p.add_argument("--tokenizer_path", default=None)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_batches", type=int, default=200)
    p.add_argument("--read_threads", type=int, default=defaults.read_threads)
    p.add_argument("--data_dir", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    config = data.DataConfig(dataset=args.dataset, tokenizer=args.tokenizer,
                             tokenizer_path=args.tokenizer_path, seq_len=args.seq_len,
                             batch_size=args.batch_size, read_threads=args.read_threads,
                             data_dir=args.data_dir)
    result = _measure(config, args.num_batches, warmup_batches=10)
    print(json.dumps({
        "bench": "loader",
        "case": f"{args.dataset}/{args.tokenizer}/B{args.batch_size}xT{args.seq_len}",
        "metric": "tokens_per_s",
        "value": round(result["value"], 1),
        "goal": None,
        "seconds": round(result["seconds"], 4),
        "num_batches": args.num_batches,
        "tokens": result["tokens"],
        "scored_fraction": round(result["scored_fraction"], 4),
        "read_threads": args.read_threads,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "grain": grain.__version__,
    }))


if __name__ == "__main__":
    main()

"""Quality of MSWA against sliding-window and full attention at tiny size (arXiv 2501.01039).

    python -m experiments.bench.mswa_quality [--steps=300] [--workdir_root=workdirs/mswa_quality]

Trains full attention, SWA and MSWA (the paper's multipliers, and the official code's, which
have exactly SWA's window budget) from the same seed on the embedded corpus for the same number
of steps, and reports validation bits per byte. The runs differ only in their windows
(experiments/configs/{full,swa,mswa}_tiny.gin), so the gaps measure the attention pattern.
One JSON line per run; `value` is bits per byte, `ratio_vs_swa` compares against SWA.
"""
import argparse
import json
import os
import platform
import shutil
import time

import jax

from experiments import gin_config, pipeline
from models import registry

RUNS = (
    ("full", "full_tiny.gin", []),
    ("swa", "swa_tiny.gin", []),
    ("mswa_paper", "mswa_tiny.gin", ['MSWAConfig.multiplier_preset = "paper"']),
    ("mswa_official", "mswa_tiny.gin", ['MSWAConfig.multiplier_preset = "official_finetune"']),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_batches", type=int, default=16)
    parser.add_argument("--workdir_root", default="workdirs/mswa_quality")
    args = parser.parse_args()
    results = {}
    for case, gin_file, extra in RUNS:
        workdir = os.path.join(args.workdir_root, case)
        shutil.rmtree(workdir, ignore_errors=True)  # same steps from scratch for every case
        gin_config.parse([gin_file], extra + [
            f"DataConfig.seq_len = {args.seq_len}", f"DataConfig.batch_size = {args.batch_size}",
            f"TrainConfig.steps = {args.steps}", f"TrainConfig.warmup_steps = {args.steps // 10}",
            "TrainConfig.lr = 3e-3", f"TrainConfig.eval_batches = {args.eval_batches}",
            "TrainConfig.checkpoint_every = 0", "TrainConfig.eval_every = 0"])
        start = time.perf_counter()
        summary = pipeline.run(workdir, progress=False)
        config = registry.lookup(summary["model_name"])[0](**summary["model_config"])
        results[case] = summary["eval"]["bits_per_byte"]
        print(json.dumps({
            "bench": "mswa_quality", "case": case, "metric": "val_bits_per_byte",
            "value": results[case], "goal": None,
            "ratio_vs_swa": results[case] / results["swa"] if "swa" in results else None,
            "window_budget_ratio": config.window_budget_ratio(), "steps": args.steps,
            "seq_len": args.seq_len, "batch_size": args.batch_size,
            "train_seconds": round(time.perf_counter() - start, 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].platform}",
        }), flush=True)


if __name__ == "__main__":
    main()

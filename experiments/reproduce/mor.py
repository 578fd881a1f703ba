"""Reproduction of Mixture-of-Recursions (Bae, Kim, Bayat et al.; arXiv 2507.10524) at CPU
scale: vanilla vs Recursive vs MoR (expert-choice, N_r = 2 and 3) at equal training FLOPs,
byte-level on the embedded corpus.

    python -m experiments.reproduce.mor [--steps 250] [--seed 0]

All models have 8 effective layers of width 128 (experiments/configs/mor_vanilla_tiny.gin,
recursive_tiny.gin, mor_tiny.gin; MoR-2 is mor_tiny.gin with num_recursions = 2, i.e.
1 + 3 x 2 + 1). Vanilla and Recursive apply 8 blocks per token, MoR-3 applies 2 + 2 x (1 +
2/3 + 1/3) = 6 and MoR-2 2 + 3 x (1 + 1/2) = 6.5, so at equal training FLOPs (the paper's
protocol) MoR trains on proportionally more tokens: steps = --steps x 8 / blocks-per-token
(same batch and sequence length; attention's quadratic term, which favours MoR further, is
ignored). Every run sees the same token stream.

Measured per run: validation bits per byte with the training forward (expert-choice top-k over
the whole sequence, non-causal: what the official code evaluates) and, for MoR, with the
causal threshold rule sigmoid(s) >= 0.5 that decoding uses; router separation (accuracy of
the threshold rule against the top-k selection per recursion, the paper's "sampling
accuracy") and the depth histograms. Results land in docs/results/mor.md with a plot;
finished runs are kept in <workdir_root>/results.jsonl (an interrupted run resumes).
"""
import argparse
import json
import math
import os
import platform
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import gin_config, pipeline
from experiments.finished_runs import FinishedRuns
from train import checkpoint as checkpoint_lib
from train import data as data_lib

RUNS = (   # name, config, extra bindings, blocks per token (relative to 8)
    ("vanilla", "mor_vanilla_tiny.gin", [], 8.0),
    ("recursive", "recursive_tiny.gin", [], 8.0),
    ("mor_r3", "mor_tiny.gin", [], 6.0),
    ("mor_r2", "mor_tiny.gin", ["MoRConfig.num_recursions = 2"], 6.5),
)


def evaluate(workdir: str, num_batches: int) -> dict:
    """Validation bits per byte (training forward and, for MoR, causal threshold routing)
    and MoR's router statistics."""
    model, _, _ = checkpoint_lib.restore_model(workdir)
    data_config = data_lib.DataConfig()
    tokenizer = data_lib.load_tokenizer(data_config)
    byte_lengths = tokenizer.token_byte_lengths()
    # Only expert-choice has two routing modes (the Recursive baseline and vanilla route
    # nothing; token-choice is causal as trained).
    is_expert = getattr(model.config, "router", None) == "expert"
    modes = ("topk", "threshold") if is_expert else ("topk",)

    @nnx.jit
    def score(m, batch):
        out = {}
        for mode in modes:
            kw = {"routing": mode} if is_expert else {}
            o = m(batch["inputs"], segment_ids=batch["segment_ids"],
                  positions=batch["positions"], **kw)
            nll = optax.softmax_cross_entropy_with_integer_labels(o.logits, batch["targets"])
            out[mode] = (jnp.sum(nll * batch["loss_mask"]), o.metrics)
        return out

    nll = {mode: 0.0 for mode in modes}
    metrics, nbytes = {mode: [] for mode in modes}, 0
    for batch in data_lib.eval_batches(data_config, tokenizer, max_batches=num_batches):
        out = jax.device_get(score(model, batch))
        for mode in modes:
            nll[mode] += float(out[mode][0])
            metrics[mode].append(out[mode][1])
        nbytes += data_lib.target_byte_count(batch, byte_lengths)
    row = {f"val_bpb_{mode}": nll[mode] / (math.log(2) * nbytes) for mode in modes}
    if is_expert:
        mean = lambda mode, key: np.mean([m[key] for m in metrics[mode]], axis=0).tolist()
        row.update(router_accuracy=mean("topk", "router_accuracy"),
                   dead_token_ratio=mean("topk", "dead_token_ratio"),
                   depth_histogram_topk=mean("topk", "depth_histogram"),
                   depth_histogram_threshold=mean("threshold", "depth_histogram"))
    return row


def run_one(name: str, gin_file: str, extra: list[str], blocks: float, args) -> dict:
    steps = int(round(args.steps * 8.0 / blocks))
    workdir = os.path.join(args.workdir_root, name)
    shutil.rmtree(workdir, ignore_errors=True)
    gin_config.parse([gin_file], extra + [
        f"TrainConfig.steps = {steps}", f"TrainConfig.warmup_steps = {max(1, steps // 10)}",
        f"TrainConfig.seed = {args.seed}", f"TrainConfig.eval_batches = {args.eval_batches}",
        "TrainConfig.checkpoint_every = 0", "TrainConfig.eval_every = 0",
        f"TrainConfig.log_every = {steps}"])
    start = time.perf_counter()
    summary = pipeline.run(workdir, progress=False)
    seconds = time.perf_counter() - start
    row = {"run": name, "steps": steps, "base_steps": args.steps, "blocks_per_token": blocks,
           "relative_flops": round(steps * blocks / (args.steps * 8.0), 4),
           "num_params": summary["num_params"], "train_seconds": round(seconds, 1),
           "val_bpb_trainer": summary["eval"]["bits_per_byte"],
           "losses": [float(x) for x in summary["losses"]]}
    row.update(evaluate(workdir, args.eval_batches))
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250, help="vanilla's steps; others match FLOPs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_batches", type=int, default=16)
    p.add_argument("--runs", default=",".join(r[0] for r in RUNS))
    p.add_argument("--workdir_root", default="workdirs/mor_repro")
    p.add_argument("--out", default="docs/results/mor.md")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args(argv)
    wanted = args.runs.split(",")
    known = [r[0] for r in RUNS]
    for w in wanted:
        if w not in known:
            raise ValueError(f"unknown run {w!r}; valid: {known}")
    done = FinishedRuns(args.workdir_root, key=lambda r: r["run"],
                        matches=lambda r: r["base_steps"] == args.steps, fresh=args.fresh)
    for name, gin_file, extra, blocks in RUNS:
        if name not in wanted or name in done or args.report_only:
            continue
        row = run_one(name, gin_file, extra, blocks, args)
        done.add(row)
        print(json.dumps({"bench": "mor_reproduce", "case": name, "metric": "val_bpb",
                          "value": row["val_bpb_topk"], "goal": None,
                          "val_bpb_threshold": row.get("val_bpb_threshold"),
                          "train_seconds": row["train_seconds"]}), flush=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
               f"({jax.default_backend()})")
    from experiments.results_pages import mor as report   # matplotlib only when reporting
    report.write([done.rows[n] for n in known if n in done], args.out, machine=machine,
                 steps=args.steps, seed=args.seed, eval_batches=args.eval_batches)


if __name__ == "__main__":
    main()

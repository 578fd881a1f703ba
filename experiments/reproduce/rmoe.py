"""Reproduction of RMoE (Layerwise Recurrent Router for MoE; Qiu, Huang et al., ICLR 2025;
arXiv 2408.06793) at CPU scale: SMoE vs RMoE vs RMoE-NP vs RMoE with a detached state, at 6
and 12 layers, 2 seeds each, byte-level on the embedded corpus.

    python -m experiments.reproduce.rmoe [--steps 300] [--depths 6,12] [--seeds 0,1]

Every run uses the same data (same token stream, DataConfig.seed fixed) and differs only in
the router and the model seed (TrainConfig.seed). Configs: experiments/configs/
{smoe,rmoe}_tiny.gin (6 layers) and {smoe,rmoe}_deep_tiny.gin (12 layers); the ablations are
bindings of RMoEConfig.state_passing. After training, each model's router statistics (per
layer entropy and expert load) are measured on validation batches. Results land in
docs/results/rmoe.md with two plots; finished runs are kept in
<workdir_root>/results.jsonl, so an interrupted reproduction resumes where it stopped.
"""
import argparse
import json
import os
import platform
import shutil
import time

import jax
import numpy as np
from flax import nnx

from experiments import gin_config, pipeline
from experiments.finished_runs import FinishedRuns
from experiments.results_pages import rmoe as rmoe_report
from train import checkpoint as checkpoint_lib
from train import data as data_lib

VARIANTS = (   # name, config family, extra bindings
    ("SMoE", "smoe", []),
    ("RMoE", "rmoe", []),
    ("RMoE-NP", "rmoe", ['RMoEConfig.state_passing = "none"']),
    ("RMoE-detached", "rmoe", ['RMoEConfig.state_passing = "detached"']),
)
CONFIG_FILES = {6: "{}_tiny.gin", 12: "{}_deep_tiny.gin"}


def router_statistics(workdir: str, num_batches: int) -> dict:
    """Mean per-layer router entropy [L] and expert load [L, E] on validation batches."""
    model, _, _ = checkpoint_lib.restore_model(workdir)
    data_config = data_lib.DataConfig()
    forward = nnx.jit(lambda m, b: m(b["inputs"], segment_ids=b["segment_ids"],
                                     positions=b["positions"]).metrics)
    metrics = [jax.device_get(forward(model, batch)) for batch in data_lib.eval_batches(
        data_config, data_lib.load_tokenizer(data_config), max_batches=num_batches)]
    mean = lambda key: np.mean([m[key] for m in metrics], axis=0).tolist()
    return {"router_entropy": mean("router_entropy"), "expert_load": mean("expert_load"),
            "dropped_fraction": float(np.mean([m["dropped_fraction"] for m in metrics]))}


def run_one(variant: str, family: str, extra: list[str], depth: int, seed: int,
            args) -> dict:
    workdir = os.path.join(args.workdir_root, f"{variant}_L{depth}_s{seed}")
    shutil.rmtree(workdir, ignore_errors=True)   # same steps from scratch for every run
    gin_config.parse([CONFIG_FILES[depth].format(family)], extra + [
        f"TrainConfig.steps = {args.steps}", f"TrainConfig.warmup_steps = {args.steps // 10}",
        f"TrainConfig.seed = {seed}", f"TrainConfig.eval_batches = {args.eval_batches}",
        "TrainConfig.checkpoint_every = 0", "TrainConfig.eval_every = 0",
        f"TrainConfig.log_every = {args.steps}"] + (
        [] if args.capacity_factor is None
        else [f"RMoEConfig.capacity_factor = {args.capacity_factor}"]))
    start = time.perf_counter()
    summary = pipeline.run(workdir, progress=False)
    seconds = time.perf_counter() - start
    stats = router_statistics(workdir, args.stat_batches)
    config = summary["model_config"]
    return {"variant": variant, "depth": depth, "seed": seed,
            "val_bits_per_byte": summary["eval"]["bits_per_byte"],
            "final_train_loss": summary["losses"][-1], "num_params": summary["num_params"],
            "train_seconds": round(seconds, 1), "steps": args.steps,
            "d_model": config["d_model"], "num_experts": config["num_experts"],
            "top_k": config["top_k"], "router_dim": config["router_dim"],
            "dispatch": config["dispatch"], "capacity_factor": config["capacity_factor"],
            **stats}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--depths", default="6,12")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--eval_batches", type=int, default=16)
    p.add_argument("--capacity_factor", type=float, default=None,
                   help="override the configs' capacity factor (fewer dropped slots)")
    p.add_argument("--stat_batches", type=int, default=4)
    p.add_argument("--workdir_root", default="workdirs/rmoe_repro")
    p.add_argument("--out", default="docs/results/rmoe.md")
    p.add_argument("--fresh", action="store_true", help="ignore finished runs in results.jsonl")
    p.add_argument("--report_only", action="store_true",
                   help="rewrite the report from results.jsonl without training")
    args = p.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    for d in depths:
        if d not in CONFIG_FILES:
            raise ValueError(f"depth {d} has no config; valid: {sorted(CONFIG_FILES)}")
    done = FinishedRuns(args.workdir_root, key=lambda r: (r["variant"], r["depth"], r["seed"]),
                        matches=lambda r: r["steps"] == args.steps, fresh=args.fresh)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
               f"({jax.default_backend()})")
    # Seeds outermost, and the headline comparison (SMoE vs RMoE at every depth) before the
    # ablations: a partial reproduction still answers the main claim.
    families = {name: (family, extra) for name, family, extra in VARIANTS}
    plan = ([(d, v) for v in ("SMoE", "RMoE") for d in depths]
            + [(d, v) for d in depths for v in ("RMoE-NP", "RMoE-detached")])
    for seed in ([] if args.report_only else seeds):
        for depth, variant in plan:
            if (variant, depth, seed) in done:
                continue
            row = run_one(variant, *families[variant], depth, seed, args)
            done.add(row)
            print(json.dumps({"bench": "rmoe_reproduce", "case": f"{variant}_L{depth}_s{seed}",
                              "metric": "val_bits_per_byte",
                              "value": row["val_bits_per_byte"], "goal": None,
                              "train_seconds": row["train_seconds"]}), flush=True)
    rows = [done.rows[k] for k in sorted(done.rows) if k[1] in depths and k[2] in seeds]
    rmoe_report.write(rows, args.out, machine=machine, steps=args.steps, seeds=seeds,
                      stat_batches=args.stat_batches)


if __name__ == "__main__":
    main()

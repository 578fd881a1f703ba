"""Masked-diffusion samplers against the one-token-per-step baseline on held-out synthetic tasks.

    python -m experiments.bench.diffusion [--workdir=workdirs/diffusion_alternate] [--num_prompts=N]
    python -m experiments.bench.diffusion --gin_file=diffusion_task_tiny.gin \
        --workdir=workdirs/diffusion_task            # the saturated copy/shift task
    python -m experiments.bench.diffusion --quick     # seconds: random weights, 4 prompts

Loads the tiny masked diffusion LM trained on train/synthetic_tasks.py from --workdir, or
trains it there first with --gin_file (default experiments/configs/diffusion_alternate_tiny.gin:
the `alternate` task, whose answer tokens depend on each other; ~15 minutes on 2 CPU cores).
Then, in one run, decodes the same held-out prompts (never seen in training) with the baseline
(LLaDA low-confidence remasking, one token per step) and every sampler of decoding/diffusion/:
Fast-dLLM's threshold (arXiv 2505.22618, with and without its block caches), Prophet (arXiv
2508.19982, alone and on top of the threshold), LocalLeap (arXiv 2510.07081), FreeDave (arXiv
2510.00294), Learn2PD's learned filter and end-of-text stop (arXiv 2509.25188) and random
remasking. Each case is compiled by a first call and timed on a second.
Learn2PD's filter is trained post hoc (decoding/diffusion/learn2pd_train.py) on training-split
prompts, never the held-out ones, and saved as WORKDIR/learn2pd_filter.npz (reused when
present; its training seconds are reported).

JSON lines: per case `accuracy` (`accuracy_kind` says how it is scored: "valid" for tasks with
several correct answers, such as `alternate` (xyxy... or yxyx...), "exact match" for tasks with
one answer), `nfe` (forward passes per prompt, what a prompt decoded alone costs),
`nfe_reduction` (baseline NFE / the sampler's), `accuracy_retained` (accuracy / baseline
accuracy), `wall_clock_speedup` (batch decode time ratio) and, for FreeDave,
`identical_to_baseline` (fraction of prompts with the baseline's exact tokens). Goals (issue
13): >= 3x fewer NFE at >= 0.99 of the baseline's accuracy for Prophet and the threshold;
FreeDave identical.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import time

import jax

from decoding.diffusion import DiffusionSamplerConfig
from decoding.generate import generate
from train import synthetic_tasks as st

BLOCK = 16
# (case, sampler, config overrides); "baseline" first.
CASES = (
    ("baseline", "llada", {}),
    ("llada_random", "llada_random", {}),
    ("fast_dllm", "fast_dllm", {"threshold": 0.9}),
    ("fast_dllm_prefix_cache", "fast_dllm", {"threshold": 0.9, "cache": "prefix"}),
    ("fast_dllm_dual_cache", "fast_dllm", {"threshold": 0.9, "cache": "dual"}),
    ("prophet", "prophet", {}),
    ("prophet_fast_dllm", "fast_dllm", {"threshold": 0.9, "prophet": True}),
    ("localleap", "localleap", {}),
    ("freedave", "freedave", {"draft_steps": 4}),
    ("learn2pd", "learn2pd", {}),
    ("learn2pd_eot_stop", "learn2pd", {"eot_stop": True}),
    ("llada_eot_stop", "llada", {"eot_stop": True}),
)
FILTER = "learn2pd_filter.npz"
FILTER_PROMPTS = 256   # training-split prompts the filter's oracle data come from
GOALS = {"fast_dllm": (3.0, 0.99), "prophet": (3.0, 0.99)}


GIN_FILE = "diffusion_alternate_tiny.gin"
TIMED_REPEATS = 2
WORKDIR = "workdirs/diffusion_alternate"


def _task_fields(path: str) -> dict:
    """The SyntheticTaskConfig bindings of a gin file (literal values, comments dropped)."""
    fields = {}
    with open(path) as f:
        for line in f:
            name, _, value = line.split("#")[0].partition("=")
            if name.strip().startswith("SyntheticTaskConfig."):
                fields[name.strip().split(".")[1]] = ast.literal_eval(value.strip())
    return fields


def task_config(workdir: str | None = None, gin_file: str = GIN_FILE
                ) -> st.SyntheticTaskConfig:
    """The task the workdir's model was trained on (its config.gin), else that of the shipped
    `gin_file` (experiments/configs/)."""
    from experiments import gin_config

    path = os.path.join(workdir or "", "config.gin")
    if not (workdir and os.path.exists(path)):
        path = str(gin_config.CONFIG_DIR / gin_file)
    return st.SyntheticTaskConfig(**_task_fields(path))


def learn2pd_filter(model, path: str, task: st.SyntheticTaskConfig, num_prompts: int
                    ) -> tuple[str, dict | None]:
    """(path, fit metrics or None when reused): Learn2PD's filter for `model`, trained on
    the oracle data of `num_prompts` training-split prompts (never held out)."""
    from decoding.diffusion import learn2pd, learn2pd_train

    if os.path.exists(path):
        return path, None
    start = time.perf_counter()
    examples = [st.make_example(task, "train", 7, i) for i in range(num_prompts)]
    prompts = [e.prompt for e in examples]
    reference = generate(model, prompts, sampler="llada", max_new_tokens=task.gen_length,
                         eos_id=st.EOS, config=DiffusionSamplerConfig(block_length=BLOCK))
    conf, labels = learn2pd_train.oracle_data(model, prompts, reference.tokens,
                                              task.gen_length, BLOCK, st.EOS, st.PAD)
    filt, metrics = learn2pd_train.train_filter(conf, labels)
    learn2pd.save_filter(path, filt)
    return path, {**metrics, "seconds": time.perf_counter() - start,
                  "num_prompts": num_prompts}


def load_or_train(workdir: str, train_steps: int | None, step: int | None = None,
                  gin_file: str = GIN_FILE) -> tuple[object, float | None]:
    """(model, training seconds or None when reused) from the workdir's newest checkpoint,
    trained there first with `gin_file` when it has none (or train_steps is given)."""
    from train.checkpoint import restore_model

    seconds = None
    if not os.path.isdir(os.path.join(workdir, "checkpoints")) or train_steps:
        from experiments import gin_config, pipeline

        bindings = [f"TrainConfig.steps = {train_steps}"] if train_steps else []
        gin_config.parse([gin_file], bindings)
        start = time.perf_counter()
        pipeline.run(workdir, progress=False)
        seconds = time.perf_counter() - start
    return restore_model(workdir, step)[0], seconds


def decode(model, examples, sampler: str, config: DiffusionSamplerConfig, gen_length: int,
           *, timed: bool = True) -> dict:
    """Decodes every example's prompt in one batch; accuracy, NFE and seconds (when timed, the
    best of TIMED_REPEATS calls after a compiling one: a single call once came out 1.5x slow)."""
    prompts = [e.prompt for e in examples]
    kwargs = dict(sampler=sampler, config=config, max_new_tokens=gen_length, eos_id=st.EOS)
    if timed:
        generate(model, prompts, **kwargs)   # compiles
    seconds = float("inf")
    for _ in range(TIMED_REPEATS if timed else 1):
        start = time.perf_counter()
        out = generate(model, prompts, **kwargs)
        seconds = min(seconds, time.perf_counter() - start)
    correct = [st.is_correct(e, t) for e, t in zip(examples, out.tokens)]
    s = out.stats
    return {"tokens": out.tokens, "accuracy": sum(correct) / len(correct),
            "nfe": s["row_forwards"] / len(prompts), "batch_forwards": s["target_calls"],
            "steps": s["steps"], "seconds": seconds,
            "early_commits": s["early_commits"],
            "mean_early_commit_step": s["early_commit_steps"] / max(s["early_commits"], 1),
            "eot_stops": s["eot_stops"]}


def _machine() -> dict:
    return {"machine": f"{platform.machine()} {os.cpu_count()} cores, "
                       f"{jax.devices()[0].platform}",
            "load_average": os.getloadavg()[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=WORKDIR)
    parser.add_argument("--gin_file", default=GIN_FILE,
                        help="the task config to train with when the workdir has no model")
    parser.add_argument("--train_steps", type=int, default=None,
                        help="train (or continue) to this many steps first")
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (newest)")
    parser.add_argument("--quick", action="store_true",
                        help="random weights, 4 prompts: checks the plumbing in seconds")
    args = parser.parse_args(argv)
    task = task_config(None if args.quick else args.workdir, args.gin_file)
    if args.quick:
        from models import registry
        from models.diffusion import DiffusionConfig

        model, train_seconds = registry.build("diffusion", DiffusionConfig(
            d_model=32, n_layers=1, n_heads=2, n_kv_heads=1)), None
        examples = st.held_out_examples(4, task)
        cases = [c for c in CASES if c[0] in ("baseline", "fast_dllm", "freedave", "learn2pd")]
        import tempfile
        filter_path, fit = learn2pd_filter(model, os.path.join(tempfile.mkdtemp(), FILTER),
                                           task, 8)
    else:
        model, train_seconds = load_or_train(args.workdir, args.train_steps, args.step,
                                             args.gin_file)
        examples = st.held_out_examples(args.num_prompts, task)
        cases = CASES
        filter_path, fit = learn2pd_filter(model, os.path.join(args.workdir, FILTER), task,
                                           FILTER_PROMPTS)
    if fit is not None:
        for metric in ("test_accuracy", "test_precision", "test_recall", "seconds"):
            print(json.dumps({"bench": "diffusion", "case": "learn2pd_filter_fit",
                              "task": "+".join(task.tasks),
                              "metric": metric, "value": fit[metric], "goal": None, **fit,
                              **_machine()}), flush=True)
    base = None
    for case, sampler, overrides in cases:
        if sampler == "learn2pd":
            overrides = {**overrides, "learn2pd_filter": filter_path}
        config = DiffusionSamplerConfig(block_length=BLOCK, **overrides)
        r = decode(model, examples, sampler, config, task.gen_length)
        base = base or r
        common = {"bench": "diffusion", "case": case, "sampler": sampler,
                  "config": overrides, "task": "+".join(task.tasks),
                  "accuracy_kind": st.accuracy_kind(task.tasks),
                  "accuracy": r["accuracy"], "nfe": r["nfe"],
                  "baseline_accuracy": base["accuracy"], "baseline_nfe": base["nfe"],
                  "batch_forwards": r["batch_forwards"], "seconds": round(r["seconds"], 3),
                  "baseline_seconds": round(base["seconds"], 3),
                  "early_commits": r["early_commits"],
                  "mean_early_commit_step": r["mean_early_commit_step"],
                  "eot_stops": r["eot_stops"], "num_prompts": len(examples),
                  "gen_length": task.gen_length, "block_length": BLOCK,
                  "train_seconds": train_seconds, "workdir": None if args.quick else
                  args.workdir, **_machine()}
        goal_nfe, goal_acc = GOALS.get(case, (None, None))
        lines = [("accuracy", r["accuracy"], None), ("nfe", r["nfe"], None),
                 ("nfe_reduction", base["nfe"] / r["nfe"], goal_nfe),
                 ("accuracy_retained", r["accuracy"] / base["accuracy"]
                  if base["accuracy"] else None, goal_acc),
                 ("wall_clock_speedup", base["seconds"] / r["seconds"], None)]
        if sampler == "freedave":
            same = sum(a == b for a, b in zip(r["tokens"], base["tokens"])) / len(examples)
            lines.append(("identical_to_baseline", same, 1.0))
        for metric, value, goal in lines:
            print(json.dumps({**common, "metric": metric, "value": value, "goal": goal}),
                  flush=True)


if __name__ == "__main__":
    main()

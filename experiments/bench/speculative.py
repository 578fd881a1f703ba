"""Speculative decoding against plain decoding of the same target, side by side in one run.

Samplers (decoding/): greedy speculative decoding with a draft model and lossless speculative
sampling (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318), prompt-lookup
n-gram drafting, FLy (arXiv 2511.22972) and early-exit self-speculation (Kangaroo, arXiv
2404.18911). The target and draft are byte-level Transformers trained on the embedded
Python-stdlib corpus (experiments/configs/target_small.gin, draft_tiny.gin); checkpoints in
the workdirs are reused, missing ones are trained first (a few minutes of CPU each).

Prompts are cut from validation-split files (never trained on) at line ends: BOS plus the
`prompt_bytes` bytes before the cut, so all prompts share one length bucket. Each sampler
decodes every prompt, by default at batch 1 (the latency setting speculative decoding is for;
--batch_size decodes several rows together, each accepting its own number of drafts); compiled
code is warmed up first, and the timed passes interleave the samplers so that load from other
processes falls on all of them alike.

    python -m experiments.bench.speculative [--target_workdir DIR] [--draft_workdir DIR]
        [--num_prompts 32] [--batch_size 1] [--prompt_bytes 111] [--max_new_tokens 96]
        [--max_line_bytes 24] [--repeats 2] [--no_train]

Reading the numbers on CPU. Speculative decoding pays when a (gamma+1)-token verification
costs about what a 1-token step costs, i.e. when decoding is bound by reading the weights. On
a 2-core CPU it is not: XLA's matrix products run at a roughly fixed arithmetic rate here, so
scoring k tokens costs several 1-token steps (`python -m experiments.bench.verify_cost`
measures the ratio), and a sampler must commit more tokens per target call than that ratio,
plus its drafting cost, before it beats plain decoding.

prints one JSON line per result: `speedup` (wall time of plain decoding / the sampler's; plain
greedy for the greedy samplers, plain sampling at the same temperature for `lossless` and
`fly_sample`) and `tokens_per_target_call` for every case in CASES; `agreement` (share of the
target's greedy tokens reproduced before the first divergence) for each; for
`self_spec_adapter`, when it trains the adapter, `draft_top1_agreement` of the early exit
before and after distillation; and `accuracy_retained` for fly: exact match of the first
generated line with the file's real next line, FLy's accuracy over the target's (None while
the target gets no line right), with the byte-prefix match as a softer reading.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np

from decoding.generate import generate
from decoding.sampling import SamplingConfig
from decoding.speculative import FlyConfig, NgramConfig, SelfSpecConfig, SpeculativeConfig

BENCH = "speculative"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
DEFAULT_ROOT = os.path.join("workdirs", "bench_speculative")
GOALS = {("speedup", "greedy"): 2.0, ("accuracy_retained", "fly"): 0.99}
CASES = ("greedy", "lossless", "ngram", "fly", "fly_sample", "self_spec", "self_spec_adapter")


def ensure_trained(workdir: str, gin_file: str) -> None:
    """Trains the gin-configured model into `workdir` unless its final checkpoint exists."""
    from experiments import gin_config, pipeline
    from train import checkpoint as checkpoint_lib
    from train import trainer as trainer_lib

    gin_config.parse([gin_file])
    steps = trainer_lib.TrainConfig().steps
    if os.path.isdir(workdir):
        ckpt = checkpoint_lib.Checkpointer(workdir, read_only=True, async_save=False)
        try:
            if ckpt.steps() and max(ckpt.steps()) >= steps:
                return
        finally:
            ckpt.close()
    pipeline.run(workdir, progress=False)


def ensure_adapter(args: argparse.Namespace, target):
    """The target's trained early-exit adapter for args.exit_layer (Kangaroo), distilled into
    <target_workdir>/adapter_l<exit_layer> first unless it is there; prints its held-out
    draft quality before and after training when it trains."""
    from train import adapter_distill

    out_dir = os.path.join(args.target_workdir, f"adapter_l{args.exit_layer}")
    if not os.path.isfile(os.path.join(out_dir, adapter_distill.META_FILE)):
        if args.no_train:
            raise ValueError(f"no adapter in {out_dir!r} and --no_train was given")
        config = adapter_distill.AdapterTrainConfig(exit_layer=args.exit_layer,
                                                    steps=args.adapter_steps)
        summary = adapter_distill.distill_workdir(args.target_workdir, out_dir, config)
        for when in ("before", "after"):
            _line("self_spec_adapter", "draft_top1_agreement", summary[when]["top1_agreement"],
                  when=when, **summary[when], exit_layer=args.exit_layer, steps=config.steps)
    return adapter_distill.load_adapter(out_dir, target)


def cut_prompts(documents: list[str], num_prompts: int, prompt_bytes: int,
                max_line_bytes: int = 24, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(prompt, next_line) pairs: prompt = the prompt_bytes bytes ending at a line break,
    next_line = the non-blank line after it (at most max_line_bytes, without its newline).
    num_prompts distinct cuts drawn (seeded) from every eligible line of every document."""
    eligible = []
    for doc in documents:
        raw = doc.encode("utf-8")
        end = raw.find(b"\n", prompt_bytes - 1) + 1
        while end > 0:
            stop = raw.find(b"\n", end)
            if stop < 0:
                break
            line = raw[end:stop]
            if line.strip() and len(line) <= max_line_bytes:
                eligible.append((raw[end - prompt_bytes:end], line))
            end = stop + 1
    if len(eligible) < num_prompts:
        raise ValueError(f"only {len(eligible)} of num_prompts={num_prompts} prompts could be "
                         f"cut with prompt_bytes={prompt_bytes}, "
                         f"max_line_bytes={max_line_bytes}")
    rng = np.random.default_rng(seed)
    return [eligible[i] for i in sorted(rng.choice(len(eligible), num_prompts, replace=False))]


def first_line(tokens: list[int]) -> bytes:
    """The bytes of generated byte-token ids up to the first newline (specials dropped)."""
    raw = bytes(t for t in tokens if 0 <= t < 256)
    return raw.split(b"\n", 1)[0]


def agreement(reference, tokens) -> float:
    """Share of `reference` (token ids, or bytes) reproduced before the first divergence."""
    same = 0
    for a, b in zip(reference, tokens):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)


def prefix_match(truth: bytes, generated: bytes) -> float:
    """Share of the true line's bytes the generated line reproduces before diverging."""
    return agreement(truth, generated)


def _decode_all(target, prompts: list[list[int]], kwargs: dict[str, Any], max_new: int,
                eos_id: int, batch_size: int
                ) -> tuple[list[list[int]], list[dict[str, Any]], float]:
    outs, stats = [], []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        out = generate(target, prompts[i:i + batch_size], max_new_tokens=max_new,
                       eos_id=eos_id, **kwargs)
        outs.extend(out.tokens)
        stats.append(out.stats)
    return outs, stats, time.perf_counter() - start


def _line(case: str, metric: str, value, **details) -> None:
    print(json.dumps({"bench": BENCH, "case": case, "metric": metric, "value": value,
                      "goal": GOALS.get((metric, case)), **details}), flush=True)


def run(args: argparse.Namespace) -> None:
    from train.checkpoint import restore_model
    from train.data import load_text_source
    from train.tokenizer import make_tokenizer

    if not args.no_train:
        ensure_trained(args.draft_workdir, os.path.join(CONFIG_DIR, "draft_tiny.gin"))
        ensure_trained(args.target_workdir, os.path.join(CONFIG_DIR, "target_small.gin"))
    target, _, target_config = restore_model(args.target_workdir)
    draft, _, draft_config = restore_model(args.draft_workdir)
    adapter = ensure_adapter(args, target)
    tokenizer = make_tokenizer("byte")

    source = load_text_source("python_stdlib", "validation")
    documents = [source[i].decode("utf-8") if isinstance(source[i], bytes) else source[i]
                 for i in range(len(source))]
    pairs = cut_prompts(documents, args.num_prompts, args.prompt_bytes, args.max_line_bytes)
    prompts = [[tokenizer.bos_id] + list(p) for p, _ in pairs]

    sampling = SamplingConfig(temperature=args.temperature)
    samplers: dict[str, dict[str, Any]] = {
        "plain_greedy": {"sampler": "greedy"},
        "plain_sample": {"sampler": "sample", "sampling": sampling, "seed": 1},
        "greedy": {"sampler": "speculative_greedy", "draft_model": draft,
                   "config": SpeculativeConfig(gamma=args.gamma)},
        "lossless": {"sampler": "speculative", "draft_model": draft, "sampling": sampling,
                     "config": SpeculativeConfig(gamma=args.gamma), "seed": 1},
        "ngram": {"sampler": "ngram_greedy", "config": NgramConfig()},
        "fly": {"sampler": "fly", "draft_model": draft, "config": FlyConfig()},
        "fly_sample": {"sampler": "fly_sample", "draft_model": draft, "sampling": sampling,
                       "config": FlyConfig(), "seed": 1},
        "self_spec": {"sampler": "self_spec_greedy",
                      "config": SelfSpecConfig(exit_layer=args.exit_layer)},
        "self_spec_adapter": {"sampler": "self_spec_greedy", "draft_model": adapter,
                              "config": SelfSpecConfig(exit_layer=args.exit_layer)},
    }
    baseline = {"lossless": "plain_sample", "fly_sample": "plain_sample"}

    if len(prompts) % args.batch_size:
        raise ValueError(f"num_prompts={len(prompts)} is not a multiple of "
                         f"batch_size={args.batch_size}")
    # Warm-up: compile every sampler on this batch size and prompt length once.
    for kwargs in samplers.values():
        generate(target, prompts[:args.batch_size], max_new_tokens=args.max_new_tokens,
                 eos_id=tokenizer.eos_id, **kwargs)
    times: dict[str, list[float]] = {name: [] for name in samplers}
    results: dict[str, tuple[list[list[int]], list[dict[str, Any]]]] = {}
    for _ in range(args.repeats):
        for name, kwargs in samplers.items():
            outs, stats, seconds = _decode_all(target, prompts, kwargs, args.max_new_tokens,
                                               tokenizer.eos_id, args.batch_size)
            times[name].append(seconds)
            results[name] = (outs, stats)

    reference = results["plain_greedy"][0]
    truth = [line for _, line in pairs]

    def accuracy(outs: list[list[int]]) -> float:
        return float(np.mean([first_line(o) == t for o, t in zip(outs, truth)]))

    def soft_accuracy(outs: list[list[int]]) -> float:
        return float(np.mean([prefix_match(t, first_line(o)) for o, t in zip(outs, truth)]))

    machine = {"machine": platform.machine(), "cpus": os.cpu_count(),
               "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
               "target_d_model": target_config.d_model, "target_layers": target_config.n_layers,
               "draft_d_model": draft_config.d_model, "draft_layers": draft_config.n_layers,
               "num_prompts": len(prompts), "batch_size": args.batch_size,
               "prompt_tokens": len(prompts[0]),
               "max_new_tokens": args.max_new_tokens, "repeats": args.repeats}
    for case in CASES:
        outs, stats = results[case]
        base = baseline.get(case, "plain_greedy")
        seconds, base_seconds = min(times[case]), min(times[base])
        committed = sum(sum(s["accepted_hist"][k] * k for k in range(len(s["accepted_hist"])))
                        for s in stats)
        row_rounds = sum(sum(s["accepted_hist"]) for s in stats)
        details = {"seconds": seconds, "baseline": base, "baseline_seconds": base_seconds,
                   "target_calls": sum(s["target_calls"] for s in stats),
                   "draft_calls": sum(s["draft_calls"] for s in stats),
                   "acceptance_rate": sum(s["accepted"] for s in stats)
                   / max(sum(s["drafted"] for s in stats), 1), **machine}
        _line(case, "speedup", base_seconds / seconds, **details)
        _line(case, "tokens_per_target_call", committed / max(row_rounds, 1), **details)
        _line(case, "agreement", float(np.mean([agreement(r, o) for r, o in
                                                zip(reference, outs)])),
              exact_sequences=float(np.mean([r == o for r, o in zip(reference, outs)])),
              **machine)
    fly_acc, target_acc = accuracy(results["fly"][0]), accuracy(reference)
    fly_soft, target_soft = soft_accuracy(results["fly"][0]), soft_accuracy(reference)
    fly_stats = results["fly"][1]
    # value: exact-match accuracy ratio (None when the target solves no task at all); the
    # byte-prefix version is a softer reading of the same comparison.
    _line("fly", "accuracy_retained", fly_acc / target_acc if target_acc else None,
          fly_accuracy=fly_acc, target_accuracy=target_acc,
          fly_prefix_match=fly_soft, target_prefix_match=target_soft,
          prefix_match_retained=fly_soft / target_soft if target_soft else None,
          rescued=sum(s["rescued"] for s in fly_stats),
          mismatches=sum(s["mismatches"] for s in fly_stats), **machine)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target_workdir", default=os.path.join(DEFAULT_ROOT, "target"))
    parser.add_argument("--draft_workdir", default=os.path.join(DEFAULT_ROOT, "draft"))
    parser.add_argument("--no_train", action="store_true",
                        help="measure the given checkpoints; never train")
    parser.add_argument("--num_prompts", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=1,
                        help="prompts decoded together (1: the latency setting)")
    parser.add_argument("--prompt_bytes", type=int, default=111,
                        help="prompt length in bytes (+1 BOS: 112 tokens, bucket 128)")
    parser.add_argument("--max_line_bytes", type=int, default=24,
                        help="longest next line used as an exact-match task")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--gamma", type=int, default=SpeculativeConfig().gamma)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--exit_layer", type=int, default=2,
                        help="self_spec: blocks the early-exit draft runs")
    parser.add_argument("--adapter_steps", type=int, default=300,
                        help="self_spec_adapter: distillation steps when no adapter exists")
    parser.add_argument("--repeats", type=int, default=2)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()

"""Speculative decoding on a real model (SmolLM2-135M-Instruct, packaged GGUF, f32): wall-clock
speedup of each speculative sampler over plain greedy decoding of the same target, on tasks
with checkable answers (experiments/real_tasks.py), in one run, plus what one verification
costs against one decoding step.

Samplers (cases `{sampler}_{task}_b{batch}`):
  ngram         prompt lookup, greedy verification (Saxena 2023; Leviathan et al., arXiv
                2211.17192)
  self_spec_lL  Kangaroo early exit at layer L (arXiv 2404.18911) through a trained adapter
                (--adapter_dirs L:DIR,...; experiments/train_adapter.py --pretrained), or the
                plain early exit for an --exit_layers entry without one
  speculative_greedy / speculative (lossless sampling, T=1) / fly / fly_sample /
  specdecpp_greedy / specdecpp   with the distilled draft in --draft_dir (trained there by
                experiments/train_draft.py when missing) and, for specdecpp, its acceptance
                head in DIR/acceptance_head
Every greedy-exact sampler must reproduce plain greedy's tokens (`tokens_match`); sampling
cases are timed against plain sampling of the target too (`speedup_vs_sample`). FLy's
`accuracy_retained` is its task accuracy over plain greedy's (goal 0.99).

HF transformers runs the same prompts at batch 1 (its assisted generation takes one
sequence): greedy, prompt lookup, `assistant_early_exit` at the first --exit_layers, and
assisted generation with the same draft (DIR/draft.gguf).

Metrics, one JSON line each:
  speedup            t(greedy) / t(sampler), the same prompts, batches and budget (goal 1.5
                     for the best sampler at batch 1 on the edit task); with
                     tokens_per_target_call, accuracy of the completions and greedy's accuracy
  speedup_vs_hf_same_method  HF's time / ours for the same method (greedy, n-gram, early
                     exit), batch 1, with HF's own speedup over its greedy (goal 1)
  verify_cost_ratio  one jitted extend of gamma + 1 = 5 tokens over one of 1 token on the real
                     weights after a 112-token prompt, all logits consumed (goal 1.5)

Times are whole `generate` calls after a compiling warm-up call, best of --repeats; prompts of
a task are cut to one prompt bucket so no case compiles twice.

    python -m experiments.bench.real_speculative [--tasks edit,next_line] [--batches 1,4]
        [--n 8] [--exit_layers 8] [--adapter_dirs 8:DIR] [--draft_dir DIR] [--quick]
        [--samplers ngram,fly] [--hf_methods greedy,speculative_greedy] [--jsonl F]
    python -m experiments.bench.real_speculative --plot_from F --plot PNG   # redraw only
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
from decoding.sampling import SamplingConfig
from decoding.speculative import NgramConfig, SelfSpecConfig
from experiments import real_tasks
from experiments.bench import verify_cost as verify_cost_bench
from experiments.bench.hf_speculative import HF_METHODS, hf_side

BENCH = "real_speculative"
GOALS = {"speedup": 1.5, "verify_cost_ratio": 1.5, "accuracy_retained": 0.99}
DEFAULT_DRAFT_DIR = os.path.join("workdirs", "smollm2_draft")


def emit(line: dict, lines: list[dict]) -> None:
    lines.append(line)
    print(json.dumps(line), flush=True)


def latest(lines: list[dict], metric: str) -> dict[str, dict]:
    """case -> its last line of `metric`: a case measured again (a later run appended to the
    same JSONL) counts as last measured."""
    return {x["case"]: x for x in lines if x["metric"] == metric}


def latest_speedups(lines: list[dict]) -> list[dict]:
    """The measured speedup lines, one per case, as last measured."""
    return [x for x in latest(lines, "speedup").values() if x["value"] is not None]


def sampler_of(line: dict) -> str:
    """The sampler part of a case name `{sampler}_{task}_b{batch}`."""
    return line["case"].split(f"_{line['task']}_")[0]


def plot(lines: list[dict], path: str) -> None:
    """Speedup over greedy against tokens per target call, one point per case: colour by
    sampler, marker by task, filled at batch 1 and hollow at batch 4 (labels per point would
    pile up in the crowd below 1x)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = latest_speedups(lines)
    samplers = sorted({sampler_of(x) for x in points})
    colours = dict(zip(samplers, plt.cm.tab20.colors * 2))
    fig, ax = plt.subplots(figsize=(8, 5))
    for x in points:
        c = colours[sampler_of(x)]
        ax.scatter(x["tokens_per_target_call"], x["value"],
                   marker="o" if x["task"] == "edit" else "^",
                   facecolors=c if x["batch"] == 1 else "none", edgecolors=c)
    for sampler in samplers:
        ax.scatter([], [], color=colours[sampler], label=sampler)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("tokens per target call")
    ax.set_ylabel("speedup over greedy (wall clock)")
    ax.set_title("SmolLM2-135M, CPU (o edit, ^ next_line; filled batch 1, hollow batch 4)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def task_prompts(tokenizer, kind: str, n: int, seed: int = 0):
    """n tasks of `kind` whose prompts share one prompt bucket (the most common one among
    4n candidates), their prompt ids, and a token budget that fits every answer."""
    candidates = real_tasks.build_tasks(kind, 4 * n, seed)
    ids = [tokenizer.encode(t.prompt) for t in candidates]
    buckets = [prompt_bucket(len(i)) for i in ids]
    common = max(set(buckets), key=buckets.count)
    keep = [k for k, b in enumerate(buckets) if b == common][:n]
    tasks = [candidates[k] for k in keep]
    # In context the answer may tokenize a little longer than alone.
    budget = int(1.15 * max(len(tokenizer.encode(t.answer)) for t in tasks)) + 8
    return tasks, [ids[k] for k in keep], budget


def run_case(model, prompts, batch: int, budget: int, stop_ids, kwargs: dict,
             repeats: int):
    """(best total seconds over `repeats`, tokens per row, merged stats) of decoding every
    prompt in groups of `batch`, after one warm-up call that compiles."""
    groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    groups = [g for g in groups if len(g) == batch]
    generate(model, groups[0], max_new_tokens=budget, eos_id=stop_ids, **kwargs)
    best, tokens, stats = float("inf"), [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [generate(model, g, max_new_tokens=budget, eos_id=stop_ids, **kwargs)
                for g in groups]
        best = min(best, time.perf_counter() - start)
        tokens = [t for o in outs for t in o.tokens]
        stats = {k: sum(o.stats[k] for o in outs) for k in ("target_calls", "draft_calls",
                                                            "drafted", "accepted")}
        hist = np.sum([o.stats["accepted_hist"] for o in outs], axis=0)
        stats["tokens_per_target_call"] = float(
            (np.arange(hist.size) * hist).sum() / max(hist.sum(), 1))
    return best, tokens, stats


def verify_cost(model) -> dict:
    """The verify_cost_ratio line's numbers on `model`'s real weights
    (experiments/bench/verify_cost.py's interleaved measurement, gamma 4)."""
    row = verify_cost_bench.measure_model(model, [4], repeats=20, rounds=7)[0]
    return {"one_token_ms": round(row["one_token_ms"], 2),
            "verify_ms": round(row["verify_ms"], 2), "value": round(row["value"], 3),
            "ratio_median": round(row["ratio_median"], 3), "rounds": row["rounds"], "gamma": 4}


def load_draft(draft_dir: str, target_gguf: str, log=print):
    """(draft Transformer, draft with acceptance head or None, draft GGUF path) from
    draft_dir, distilling the draft there first (experiments/train_draft.py's defaults,
    about half an hour of this CPU) when it holds no finished one."""
    from train import acceptance_distill, draft_distill
    from train.checkpoint import restore_model

    summary = draft_distill.read_summary(draft_dir)
    if summary is None or "after" not in summary:
        from experiments.pretrained import load_pretrained

        pre = load_pretrained(gguf=target_gguf)
        log(f"no finished draft in {draft_dir!r}: distilling one (experiments/train_draft.py)")
        summary = draft_distill.run(draft_dir, draft_distill.DraftTrainConfig(), pre.model,
                                    pre.tokenizer, target_gguf=target_gguf)
    draft = restore_model(draft_dir)[0]
    head_dir = os.path.join(draft_dir, "acceptance_head")
    with_head = (acceptance_distill.load_head(head_dir, draft)
                 if os.path.isdir(head_dir) else None)
    return draft, with_head, summary.get("gguf")


def sampler_cases(args, model, draft=None, with_head=None) -> dict[str, dict | str]:
    """name -> generate kwargs, or the reason the case cannot run."""
    from decoding.speculative import FlyConfig, SpecDecPPConfig, SpeculativeConfig
    from train.adapter_distill import load_adapter

    sample = SamplingConfig(temperature=1.0)
    cases: dict[str, dict | str] = {"ngram": {"sampler": "ngram_greedy",
                                              "config": NgramConfig()}}
    for layer in args.exit_layers:
        adapter = args.adapter_dirs.get(layer)
        kwargs = {"sampler": "self_spec_greedy", "config": SelfSpecConfig(
            exit_layer=layer, gamma=6, threshold=0.6)}
        if adapter:
            kwargs["draft_model"] = load_adapter(adapter, model)
        cases[f"self_spec_l{layer}" + ("" if adapter else "_noadapter")] = kwargs
    if draft is None:
        for name in ("speculative_greedy", "speculative", "fly", "fly_sample"):
            cases[name] = "no distilled draft (--draft_dir)"
    else:
        spec = SpeculativeConfig(gamma=args.spec_gamma)
        suffix = "" if args.spec_gamma == 4 else f"_g{args.spec_gamma}"
        cases["speculative_greedy" + suffix] = {"sampler": "speculative_greedy",
                                                "config": spec, "draft_model": draft}
        cases["speculative" + suffix] = {"sampler": "speculative", "config": spec,
                                         "draft_model": draft, "sampling": sample}
        cases["fly"] = {"sampler": "fly", "config": FlyConfig(), "draft_model": draft}
        cases["fly_sample"] = {"sampler": "fly_sample", "config": FlyConfig(),
                               "draft_model": draft, "sampling": sample}
    if with_head is None:
        for name in ("specdecpp_greedy", "specdecpp"):
            cases[name] = "no acceptance head in DIR/acceptance_head of --draft_dir"
    else:
        for h in args.specdecpp_thresholds:
            config = SpecDecPPConfig(threshold=h)
            suffix = "" if h == SpecDecPPConfig.threshold else f"_h{h:g}"
            cases["specdecpp_greedy" + suffix] = {"sampler": "specdecpp_greedy",
                                                  "config": config, "draft_model": with_head}
            cases["specdecpp" + suffix] = {"sampler": "specdecpp", "config": config,
                                           "draft_model": with_head, "sampling": sample}
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="edit,next_line")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--exit_layers", default="8")
    parser.add_argument("--adapter_dirs", default="",
                        help="L:DIR,... trained early-exit adapters by exit layer")
    parser.add_argument("--draft_dir", default=DEFAULT_DRAFT_DIR,
                        help="distilled draft (trained here when missing); 'none' skips")
    parser.add_argument("--jsonl", default=None, help="append the JSON lines to this file")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--samplers", default=None, help="subset of the cases' samplers")
    parser.add_argument("--specdecpp_thresholds", default="0.3",
                        help="SpecDec++'s stop thresholds h to run; cases other than the "
                        "default 0.3 are named specdecpp(_greedy)_hH")
    parser.add_argument("--spec_gamma", type=int, default=4,
                        help="draft length of speculative(_greedy); cases other than 4 are "
                        "named speculative(_greedy)_gN")
    parser.add_argument("--quick", action="store_true",
                        help="4 prompts, batch 1, the edit task, one exit layer")
    parser.add_argument("--no_verify_cost", action="store_true")
    parser.add_argument("--plot", default=None, help="PNG path for the speedup plot")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                        help="also run HF transformers' methods (batch 1)")
    parser.add_argument("--hf_methods", default=None,
                        help="subset of HF's methods (" + ",".join(HF_METHODS) + "); its "
                        "greedy always runs as their baseline")
    parser.add_argument("--plot_from", default=None,
                        help="only redraw --plot from this JSONL's speedup lines (the last "
                        "line of each case wins) and exit")
    args = parser.parse_args(argv)
    hf_methods = args.hf_methods.split(",") if args.hf_methods else None
    bad = sorted(set(hf_methods or []) - set(HF_METHODS))
    if bad:
        parser.error(f"--hf_methods: unknown {bad}; valid: {list(HF_METHODS)}")
    if args.plot_from:
        if not args.plot:
            parser.error("--plot_from needs --plot (the PNG to write)")
        with open(args.plot_from) as f:
            plot([json.loads(line) for line in f if line.strip()], args.plot)
        return
    if args.quick:
        args.tasks, args.batches, args.n, args.exit_layers = "edit", "1", 4, "8"
    args.exit_layers = [int(x) for x in args.exit_layers.split(",")]
    args.specdecpp_thresholds = [float(h) for h in args.specdecpp_thresholds.split(",")]
    args.adapter_dirs = {int(k): v for k, v in (x.split(":", 1) for x in
                                                args.adapter_dirs.split(",") if x)}
    args.exit_layers += [k for k in args.adapter_dirs if k not in args.exit_layers]
    from experiments.pretrained import load_pretrained

    pre = load_pretrained(name="smollm2")
    model, tok = pre.model, pre.tokenizer
    draft = with_head = draft_gguf = None
    if args.draft_dir != "none":
        draft, with_head, draft_gguf = load_draft(args.draft_dir, pre.source)
    common = {"bench": BENCH, "model": "smollm2", "machine": platform.machine(),
              "cpus": os.cpu_count(), "backend": jax.default_backend()}
    lines: list[dict] = []
    if not args.no_verify_cost:
        emit({**common, "case": "smollm2_gamma4", "metric": "verify_cost_ratio",
              **verify_cost(model), "goal": GOALS["verify_cost_ratio"],
              "load_avg": os.getloadavg()[0]}, lines)
    cases = sampler_cases(args, model, draft, with_head)
    if args.samplers:
        keep = args.samplers.split(",")
        cases = {k: v for k, v in cases.items() if any(k.startswith(s) for s in keep)}
    batches = [int(b) for b in args.batches.split(",")]
    ours: dict = {}
    for kind in args.tasks.split(","):
        tasks, prompts, budget = task_prompts(tok, kind, args.n)
        for batch in batches:
            t_greedy, greedy_tokens, _ = run_case(model, prompts, batch, budget,
                                                  tok.stop_ids, {"sampler": "greedy"},
                                                  args.repeats)
            n_rows = len(greedy_tokens)
            greedy_acc = real_tasks.accuracy(tasks[:n_rows], [tok.decode(t)
                                                              for t in greedy_tokens])
            base = {**common, "task": kind, "batch": batch, "prompts": n_rows,
                    "max_new_tokens": budget, "greedy_s": round(t_greedy, 3),
                    "greedy_accuracy": greedy_acc,
                    "greedy_tokens_per_s": round(sum(map(len, greedy_tokens)) / t_greedy, 1)}
            t_sample = None
            if any(isinstance(k, dict) and "sampling" in k for k in cases.values()):
                t_sample, sample_tokens, _ = run_case(
                    model, prompts, batch, budget, tok.stop_ids,
                    {"sampler": "sample", "sampling": SamplingConfig(temperature=1.0)},
                    args.repeats)
                base["sample_s"] = round(t_sample, 3)
                base["sample_accuracy"] = real_tasks.accuracy(
                    tasks[:n_rows], [tok.decode(t) for t in sample_tokens])
            for name, kwargs in cases.items():
                line = {**base, "case": f"{name}_{kind}_b{batch}", "metric": "speedup",
                        "goal": GOALS["speedup"] if batch == 1 and kind == "edit" else None}
                if isinstance(kwargs, str):
                    emit({**line, "value": None, "reason": kwargs}, lines)
                    continue
                seconds, tokens, stats = run_case(model, prompts, batch, budget, tok.stop_ids,
                                                  kwargs, args.repeats)
                acc = real_tasks.accuracy(tasks[:n_rows], [tok.decode(t) for t in tokens])
                extra = {}
                if "sampling" in kwargs:
                    extra["speedup_vs_sample"] = round(t_sample / seconds, 3)
                else:
                    extra["tokens_match"] = tokens == greedy_tokens
                emit({**line, "value": round(t_greedy / seconds, 3),
                      "seconds": round(seconds, 3), "accuracy": acc, **extra, **stats,
                      "load_avg": os.getloadavg()[0]}, lines)
                if name.startswith("fly"):
                    emit({**base, "case": f"{name}_{kind}_b{batch}",
                          "metric": "accuracy_retained", "goal": GOALS["accuracy_retained"],
                          "value": round(acc / greedy_acc, 3) if greedy_acc else None,
                          "accuracy": acc, **({} if greedy_acc else {
                              "reason": "plain greedy scored 0 on this task"})}, lines)
                ours[(kind, batch, name)] = (seconds, tokens)
            ours[(kind, batch, "greedy")] = (t_greedy, greedy_tokens)
        if args.hf and 1 in batches:
            hf = {}
            for method, r in hf_side(pre.source, prompts, budget, tok.stop_ids,
                                     args.exit_layers[0], args.repeats, draft_gguf,
                                     methods=hf_methods):
                hf[method] = r
                mine = ours.get((kind, 1, method)) or ours.get((kind, 1, method + "_noadapter"))
                line = {**common, "task": kind, "batch": 1, "prompts": len(prompts),
                        "max_new_tokens": budget, "case": f"{method}_{kind}_b1",
                        "hf_seconds": round(r["seconds"], 3),
                        "hf_speedup_over_hf_greedy": round(
                            hf["greedy"]["seconds"] / r["seconds"], 3),
                        "load_avg": os.getloadavg()[0]}
                if mine is None:
                    emit({**line, "metric": "speedup_vs_hf_same_method", "value": None,
                          "goal": 1.0, "reason": "our side did not run this method"}, lines)
                    continue
                emit({**line, "metric": "speedup_vs_hf_same_method",
                      "value": round(r["seconds"] / mine[0], 3), "goal": 1.0,
                      "our_seconds": round(mine[0], 3),
                      "tokens_match_hf": mine[1] == r["tokens"]}, lines)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)
    if args.plot:
        plot(lines, args.plot)


if __name__ == "__main__":
    main()

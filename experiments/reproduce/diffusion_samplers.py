"""Accuracy against NFE for every masked-diffusion sampler on held-out synthetic tasks, with a
verdict per paper claim: Prophet (arXiv 2508.19982, "up to 3.4x fewer steps"), LocalLeap
(arXiv 2510.07081, steps cut to 14.2%, ~7x), Fast-dLLM (arXiv 2505.22618, 2.5-5.8x fewer
steps from parallel decoding at equal accuracy; caches add throughput), FreeDave (arXiv
2510.00294, lossless, up to 2.83x) and Learn2PD (arXiv 2509.25188, up to 22.58x without a
performance drop).

    python -m experiments.reproduce.diffusion_samplers [--workdir=workdirs/diffusion_task]

Uses (or first trains, experiments/configs/diffusion_task_tiny.gin) the tiny masked diffusion
LM of experiments/bench/diffusion.py, sweeps each sampler's parameters (LLaDA's steps per block,
Fast-dLLM's threshold with and without the dual cache, Prophet's gap thresholds, LocalLeap's
kappa/tau/radius, FreeDave's draft count, Learn2PD's filter threshold, the end-of-text stop)
on the same held-out prompts, and writes docs/results/diffusion_samplers.md and
diffusion_samplers_accuracy_vs_nfe.png. Learn2PD's filter is the bench's (trained post hoc on
training-split prompts into WORKDIR/learn2pd_filter.npz when absent).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from decoding.diffusion import DiffusionSamplerConfig  # noqa: E402
from experiments.bench import diffusion as bench  # noqa: E402
from train import synthetic_tasks as st  # noqa: E402

OUT = "docs/results/diffusion_samplers.md"
PLOT = "docs/results/diffusion_samplers_accuracy_vs_nfe.png"


NOTES = """\
- **The task saturates the claims.** copy and shift map each answer position to one prompt
  position, so once trained the model predicts every answer token from the all-masked
  context with near-certain confidence (training loss ~1e-4). Any confidence rule then commits
  a whole block per forward (NFE = generation length / block length = 3), and Prophet's gap
  test passes at the first step (NFE 1). The speed-ups measured here are upper bounds set by
  the block structure, not evidence that the papers' factors hold on reasoning tasks, where
  tokens depend on each other and confidence is lower. Harder tasks did not train within the
  CPU budget: reverse+sort reached 0% exact match after 1000 steps; 32-digit addition written
  least-significant digit first (`add_lsd`, 3 layers, batch 16, lr 3e-3) stayed at the
  unigram loss (~1.5) for 940 steps, then spiked; `either` (answer s or shift(s) at random, so
  answer tokens must agree with each other) learned per-position marginals (loss ~0.5) but not
  their coupling in 2000-3000 steps: the one-token-per-step baseline itself mixed the two
  answers (0% exact match at steps 1500 and 2000). So no setting here probes the regime the
  papers' factors are about: the verdicts above are "reproduced" only at this scale and on
  this task.
- **The one-token-per-step baseline is not the most accurate setting.** Its misses are single
  letters of `shift` answers (k decoded as g) committed late in a block, when the context is
  mostly decoded; the parallel rules commit the same positions from the all-masked context,
  where the model is most reliable. So `accuracy_retained` exceeds 1 and the samplers agree
  with the baseline's tokens on fewer prompts than they are correct on.
- **FreeDave** is exact by construction (the test suite checks it against the baseline on a
  random-weight model too); its NFE counts one batched forward of K drafts, which costs K
  times the baseline's compute per NFE, so on this CPU it is slower in wall-clock time even
  with fewer NFE (see docs/benchmarks.md, bench `diffusion`).
- **Caches.** With every block decoded in one step, the prefix and dual caches never reuse a
  cached block here (each step is a block's first, which refreshes the cache); their effect
  on accuracy is therefore nil and on time negative at this scale.
- **Learn2PD** commits the baseline's top-1 plus every masked block position whose filter
  probability exceeds the threshold. On this task the oracle data say nearly every prediction
  is already final, and the filter learns to accept whole blocks: 3 NFE (one per 16-token
  block) at every threshold from 0.5 to 0.99, the same as the confidence rules. With its
  end-of-text stop the EOS padding block is filled in the first step (2 NFE, 24x), which is
  where the paper's headline (22.58x, with EoTP on long, padding-heavy generations) comes
  from too; on a task whose tokens are not all certain the filter's threshold would matter."""


def sweep() -> list[tuple[str, str, str, dict]]:
    """(family, label, sampler, config overrides)."""
    runs = [("llada", f"S={s}", "llada", {"steps_per_block": s}) for s in (16, 8, 4, 2)]
    runs += [("llada_random", "S=16", "llada_random", {})]
    runs += [("fast_dllm", f"tau={t}", "fast_dllm", {"threshold": t})
             for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)]
    runs += [("fast_dllm_dual_cache", f"tau={t}", "fast_dllm", {"threshold": t,
                                                                 "cache": "dual"})
             for t in (0.7, 0.9)]
    runs += [("prophet", f"gaps x{m}", "prophet",
              {"prophet_thresholds": (7.5 * m, 5.0 * m, 2.5 * m)}) for m in (0.5, 1.0, 2.0)]
    runs += [("prophet_fast_dllm", "tau=0.9", "fast_dllm", {"threshold": 0.9,
                                                           "prophet": True})]
    runs += [("localleap", f"k={k},t={t},r={r}", "localleap",
              {"kappa": k, "tau": t, "radius": r})
             for k, t, r in ((0.9, 0.75, 4), (0.9, 0.5, 4), (0.95, 0.8, 2), (0.8, 0.6, 8),
                             (0.9, 0.75, 1))]
    runs += [("freedave", f"K={k}", "freedave", {"draft_steps": k}) for k in (2, 4, 8)]
    runs += [("learn2pd", f"thr={t}", "learn2pd", {"filter_threshold": t})
             for t in (0.5, 0.8, 0.9, 0.96, 0.99)]
    runs += [("learn2pd_eot_stop", "thr=0.96", "learn2pd", {"eot_stop": True})]
    runs += [("llada_eot_stop", "S=16", "llada", {"eot_stop": True})]
    return runs


def verdicts(rows: list[dict], base: dict) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) from the measured rows."""
    def best(family, min_retained=0.99):
        # Learn2PD's headline is with its end-of-text stop, so that family counts too.
        families = (family, f"{family}_eot_stop") if family == "learn2pd" else (family,)
        ok = [r for r in rows if r["family"] in families
              and r["accuracy"] >= min_retained * base["accuracy"]]
        return max(ok, key=lambda r: r["nfe_reduction"]) if ok else None

    out = []
    for family, claim, factor in (
            ("prophet", "Prophet: up to 3.4x fewer decoding steps at preserved quality", 3.4),
            ("localleap", "LocalLeap: steps cut to 14.2% (~7x) with negligible loss", 7.0),
            ("fast_dllm", "Fast-dLLM threshold: 2.5-5.8x fewer steps at equal accuracy",
             2.5),
            ("learn2pd", "Learn2PD: up to 22.58x faster without a performance drop", 22.58)):
        b = best(family)
        if b is None:
            out.append((claim, "contradicted", f"no {family} setting kept 99% of the "
                        "baseline's accuracy"))
            continue
        evidence = (f"best setting within 1% of the baseline's accuracy: {b['family']} "
                    f"{b['label']}, "
                    f"{b['nfe_reduction']:.2f}x fewer NFE, accuracy {b['accuracy']:.3f} vs "
                    f"{base['accuracy']:.3f}")
        # Qualified: the task saturates these claims (see the notes).
        verdict = ("reproduced (on a saturated task, see notes)" if b["nfe_reduction"] >= factor
                   else "not at this scale")
        out.append((claim, verdict, evidence))
    fd = [r for r in rows if r["family"] == "freedave"]
    same = min(r["identical"] for r in fd)
    top = max(fd, key=lambda r: r["nfe_reduction"])
    out.append(("FreeDave: lossless (identical to one-token-per-step decoding), up to 2.83x",
                "reproduced" if same == 1.0 else "contradicted",
                f"identical outputs on {same:.0%} of prompts for every K; up to "
                f"{top['nfe_reduction']:.2f}x fewer NFE ({top['label']}), each NFE a K-row "
                "batched forward"))
    return out


def plot(rows: list[dict], base: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in dict.fromkeys(r["family"] for r in rows):
        pts = sorted((r["nfe"], r["accuracy"]) for r in rows if r["family"] == family)
        ax.plot(*zip(*pts), marker="o", label=family)
    ax.axhline(base["accuracy"], color="grey", ls=":", lw=1, label="baseline accuracy")
    ax.set_xscale("log")
    ax.set_xlabel("NFE per prompt (forward passes, log scale)")
    ax.set_ylabel("exact-match accuracy (held-out prompts)")
    ax.set_title("Masked diffusion samplers: accuracy vs NFE (tiny LM, synthetic tasks)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="workdirs/diffusion_task")
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (newest)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    task = bench.task_config(args.workdir)
    model, _ = bench.load_or_train(args.workdir, None, args.step)
    examples = st.held_out_examples(args.num_prompts, task)
    filter_path, _ = bench.learn2pd_filter(model, os.path.join(args.workdir, bench.FILTER),
                                           task, bench.FILTER_PROMPTS)
    rows, base = [], None
    for family, label, sampler, overrides in sweep():
        if sampler == "learn2pd":
            overrides = {**overrides, "learn2pd_filter": filter_path}
        config = DiffusionSamplerConfig(block_length=bench.BLOCK, **overrides)
        r = bench.decode(model, examples, sampler, config, task.gen_length, timed=False)
        base = base or r   # llada S=16: the one-token-per-step baseline
        row = {"family": family, "label": label, "accuracy": r["accuracy"], "nfe": r["nfe"],
               "nfe_reduction": base["nfe"] / r["nfe"],
               "identical": sum(a == b for a, b in zip(r["tokens"], base["tokens"]))
               / len(examples),
               "early_commits": r["early_commits"], "eot_stops": r["eot_stops"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    plot(rows, base)
    lines = [
        "# Masked diffusion samplers: accuracy vs forward passes",
        "",
        "Produced by `python -m experiments.reproduce.diffusion_samplers` "
        f"({time.perf_counter() - start:.0f} s on {platform.machine()}, {os.cpu_count()} "
        "cores, plus training when the workdir had no checkpoint).",
        "",
        "## Setup",
        "",
        f"- Model: the tiny masked diffusion LM of `experiments/configs/diffusion_task_tiny.gin`"
        f" (bidirectional, {model.config.n_layers} layers, d_model {model.config.d_model}, byte "
        f"vocabulary), trained with the LLaDA objective in SFT layout on "
        f"`train/synthetic_tasks.py` (tasks {', '.join(task.tasks)}, strings of "
        f"{task.min_len}-{task.max_len} letters; answers padded with EOS to "
        f"{task.gen_length}; see that module's docstring).",
        f"- {len(examples)} held-out prompts (never in the training split), decoded in one "
        f"batch per setting, greedy (argmax tokens), block length {bench.BLOCK}, generation "
        f"length {task.gen_length}. Exact-match accuracy of the answer up to the first EOS.",
        "- NFE = forward passes per prompt (what the prompt costs decoded alone); the baseline "
        f"is LLaDA low-confidence remasking with one token per step ({base['nfe']:.0f} NFE).",
        "- FreeDave's NFE counts its batched K-draft forward as one (as the paper does); its "
        "compute per NFE is K times the baseline's.",
        "- Learn2PD: the bench's filter (a 1-hidden-layer MLP of 16 block confidences, "
        "trained post hoc on the oracle data of "
        f"{bench.FILTER_PROMPTS} training-split prompts), swept over its acceptance "
        "threshold; with and without its end-of-text stop.",
        "",
        "## Results",
        "",
        "| family | setting | accuracy | NFE | NFE reduction | identical to baseline |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['family']} | {r['label']} | {r['accuracy']:.3f} | {r['nfe']:.1f} | "
              f"{r['nfe_reduction']:.2f}x | {r['identical']:.0%} |" for r in rows]
    lines += ["", f"![accuracy vs NFE]({os.path.basename(PLOT)})", "", "## Verdicts", "",
              "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {c} | {v} | {e} |" for c, v, e in verdicts(rows, base)]
    lines += ["", "## Notes", "", NOTES, ""]
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {OUT} and {PLOT}")


if __name__ == "__main__":
    main()

"""Reproduction of the Block Transformer's headline claims at CPU scale (Ho, Bae et al.,
arXiv 2406.02657): writes docs/results/block_transformer.md and its plots.

    python -m experiments.reproduce.block_transformer [--steps 300] [--bench_jsonl FILE]

Quality: trains, from the same seed on the embedded corpus (byte tokenizer, rows of 256
tokens, batch 8, the same number of steps, hence the same number of tokens):
  vanilla   block_vanilla_tiny.gin, 4 x 128 (0.81M non-embedding parameters)
  block_1x  block_tiny.gin, L_B = 4, 2 x 128 block + 2 x 128 token decoder (0.82M)
  block_2x  the same with 4 + 4 layers (1.61M)
  block_3x  the same with 6 + 6 layers (2.40M)
and reports validation bits per byte. The block runs read block-aligned rows
(train/block_packing.py, full first-block padding, so they score the same targets).
Throughput: read from the JSON lines of `python -m experiments.bench.block_transformer
--output FILE` (run under the exclusive CPU lock; this script does no timing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import gin_config, pipeline  # noqa: E402
from models import registry  # noqa: E402

RESULTS = "docs/results"
NAME = "block_transformer"
RUNS = (
    ("vanilla", "block_vanilla_tiny.gin", []),
    ("block_1x", "block_tiny.gin", []),
    ("block_2x", "block_tiny.gin", ["BlockTransformerConfig.block_layers = 4",
                                    "BlockTransformerConfig.token_layers = 4"]),
    ("block_3x", "block_tiny.gin", ["BlockTransformerConfig.block_layers = 6",
                                    "BlockTransformerConfig.token_layers = 6"]),
)


def train_all(steps: int, workdir_root: str, eval_batches: int) -> list[dict]:
    rows = []
    for case, gin_file, extra in RUNS:
        workdir = os.path.join(workdir_root, case)
        shutil.rmtree(workdir, ignore_errors=True)   # the same steps from scratch every time
        gin_config.parse([gin_file], extra + [
            "DataConfig.seq_len = 256", "DataConfig.batch_size = 8",
            f"TrainConfig.steps = {steps}", f"TrainConfig.warmup_steps = {max(steps // 10, 1)}",
            "TrainConfig.lr = 3e-3", f"TrainConfig.eval_batches = {eval_batches}",
            "TrainConfig.checkpoint_every = 0", "TrainConfig.eval_every = 0"])
        name = pipeline.experiment()
        config = registry.lookup(name)[0]()
        model = registry.build(name, config, seed=0)
        n_params = model.num_params(non_embedding=True)
        del model
        start = time.perf_counter()
        summary = pipeline.run(workdir, progress=False)
        row = {"case": case, "gin": gin_file, "extra": extra, "model": name,
               "non_embedding_params": n_params,
               "val_bits_per_byte": summary["eval"]["bits_per_byte"],
               "val_loss": summary["eval"]["loss"],
               "eval_tokens": summary["eval"].get("tokens"),
               "final_train_loss": summary["losses"][-1] if summary["losses"] else None,
               "steps": steps, "train_tokens": steps * 8 * 256,
               "train_seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def read_bench(path: str) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(rows: list[dict], bench: list[dict]) -> list[str]:
    written = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        marker = "s" if r["model"] == "transformer" else "o"
        ax.scatter(r["non_embedding_params"] / 1e6, r["val_bits_per_byte"], marker=marker)
        ax.annotate(r["case"], (r["non_embedding_params"] / 1e6, r["val_bits_per_byte"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("non-embedding parameters (M)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Block Transformer vs vanilla, same tokens")
    fig.tight_layout()
    path = os.path.join(RESULTS, f"{NAME}_loss_vs_params.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    lines = [b for b in bench if b["metric"] == "throughput_ratio"]
    if lines:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, regime in zip(axes, ("prefill_heavy", "decode_heavy")):
            sel = sorted((b for b in lines if b["case"].startswith(regime)),
                         key=lambda b: b["batch"])
            if not sel:
                continue
            batches = [b["batch"] for b in sel]
            ax.plot(batches, [b["vanilla_tokens_per_s"] for b in sel], "s-", label="vanilla")
            ax.plot(batches, [b["block_tokens_per_s"] for b in sel], "o-", label="block")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel("generated tokens / s")
            ax.set_title(f"{regime} (prompt {sel[0]['prompt_len']}, "
                         f"{sel[0]['new_tokens']} new)")
            ax.legend()
        fig.tight_layout()
        path = os.path.join(RESULTS, f"{NAME}_throughput.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _verdicts(rows: list[dict], bench: list[dict]) -> list[tuple[str, str, str]]:
    by = {r["case"]: r for r in rows}
    out = []
    ratios = {b["case"]: b for b in bench if b["metric"] == "throughput_ratio"}
    decode = [b for b in ratios.values() if b["case"].startswith("decode_heavy")]
    if decode:
        top = max(decode, key=lambda b: b["batch"])
        # The paper's claim is at equivalent perplexity: it holds here only if some block
        # model reached vanilla's loss (within 1%) as well as the throughput.
        vanilla = by.get("vanilla", {}).get("val_bits_per_byte")
        equal_quality = vanilla is not None and any(
            r["val_bits_per_byte"] <= vanilla * 1.01 for c, r in by.items() if c != "vanilla")
        verdict = ("reproduced" if top["value"] >= 10 and equal_quality
                   else "not at this scale")
        out.append(("10-20x inference throughput vs vanilla at equivalent perplexity",
                    verdict,
                    f"{top['value']:.2f}x generated tokens/s in {top['case']} (goal here 5x), "
                    "but at equal non-embedding parameters, where the block model's loss is "
                    "worse" + ("" if equal_quality else "; no block model reached vanilla's "
                               "loss at this scale (see the rows below)")))
    else:
        out.append(("10-20x inference throughput vs vanilla", "not at this scale",
                    "no bench lines were given (--bench_jsonl)"))
    if "vanilla" in by and "block_1x" in by:
        gap = by["block_1x"]["val_bits_per_byte"] - by["vanilla"]["val_bits_per_byte"]
        verdict = "reproduced" if gap > 0 else "contradicted"
        out.append(("at equal non-embedding parameters the Block Transformer has worse loss",
                    verdict, f"block_1x is {gap:+.3f} bits/byte from vanilla"))
    bigger = [by[c] for c in ("block_2x", "block_3x") if c in by]
    if bigger and "vanilla" in by:
        v = by["vanilla"]["val_bits_per_byte"]
        matched = [r["case"] for r in bigger if r["val_bits_per_byte"] <= v * 1.01]
        if matched:
            verdict, detail = "reproduced", f"{', '.join(matched)} within 1% of vanilla or better"
        else:
            verdict = "not at this scale"
            each = ", ".join(f"{r['case']} {r['val_bits_per_byte']:.3f}" for r in bigger)
            detail = (f"vanilla {v:.3f} bits/byte vs {each}: in {rows[0]['steps']} steps the "
                      "deeper block models are undertrained, so extra parameters close little "
                      "or none of the gap")
        out.append(("a Block Transformer needs about 2-3x the parameters to match vanilla "
                    "loss", verdict, detail))
    kv = [b for b in bench if b["metric"] == "kv_bytes_ratio"]
    if kv:
        k = max(kv, key=lambda b: b["buffer_length"])
        out.append(("KV cache: the block decoder keeps 1/L_B of the entries; the token "
                    "decoder O(L_B)", "reproduced" if k["value"] < 0.3 else "not at this scale",
                    f"cache bytes per token of context, block / vanilla = {k['value']:.3f} "
                    f"({k['case']}, buffer {k['buffer_length']})"))
    return out


def write_markdown(rows: list[dict], bench: list[dict], plots: list[str], args) -> str:
    lines = [
        "# Block Transformer (arXiv 2406.02657) at CPU scale",
        "",
        "Generated by `python -m experiments.reproduce.block_transformer` "
        f"(steps={args.steps}); throughput from `python -m experiments.bench.block_transformer "
        f"--output {args.bench_jsonl}` run under the exclusive CPU lock.",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} ({jax.default_backend()}).",
        "",
        "## Setup",
        "",
        "- Corpus: the embedded Python-stdlib corpus, byte tokenizer (V = 260), rows of 256 "
        "tokens, batch 8, AdamW lr 3e-3 with cosine decay, the same seed and the same number "
        "of steps for every model (so the same number of training tokens; block padding "
        "takes under 1% of the rows on these long files).",
        "- Block models read block-aligned rows (train/block_packing.py): every document is "
        "padded to whole blocks with a first block [pad, pad, pad, BOS], so every target the "
        "vanilla model scores is scored, except the first L_B - 1 targets of a document "
        "piece continued from the previous row (which has no earlier block).",
        "- Models: Llama-style layers for both (RMSNorm, RoPE, SwiGLU). vanilla = "
        "block_vanilla_tiny.gin; block_1x = block_tiny.gin (L_B = 4, R = 2, 1:1 split); "
        "block_2x / block_3x add layers to both decoders.",
        "",
        "## Quality (validation bits per byte)",
        "",
        "| run | non-embedding params | val bits/byte | val loss (nats/token) | "
        "train seconds (shared, busy CPU) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['non_embedding_params']:,} | "
                     f"{r['val_bits_per_byte']:.4f} | {r['val_loss']:.4f} | "
                     f"{r['train_seconds']} |")
    lines += ["", f"![loss vs params]({NAME}_loss_vs_params.png)", ""]
    thr = sorted((b for b in bench if b["metric"] == "throughput_ratio"),
                 key=lambda b: (b["case"].split("_b")[0], b["batch"]))
    kv = {b["case"]: b for b in bench if b["metric"] == "kv_bytes_ratio"}
    if thr:
        lines += [
            "## Throughput (generated tokens/s, whole batch, prefill included)",
            "",
            "block_tiny.gin vs block_vanilla_tiny.gin, random weights, greedy through "
            "`decoding.generate`, f32, both measured in the same run.",
            "",
            "| case | batch | vanilla tok/s | block tok/s | throughput ratio | vanilla prefill s "
            "| block prefill s | cache bytes ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for b in thr:
            k = kv.get(b["case"], {})
            lines.append(
                f"| {b['case']} | {b['batch']} | {b['vanilla_tokens_per_s']} | "
                f"{b['block_tokens_per_s']} | {b['value']:.2f} | {b['vanilla_prefill_s']} | "
                f"{b['block_prefill_s']} | {k.get('value', float('nan')):.3f} |")
        lines += ["", f"![throughput vs batch]({NAME}_throughput.png)", ""]
    lines += ["## Verdicts", "", "| claim | verdict | evidence |", "|---|---|---|"]
    for claim, verdict, detail in _verdicts(rows, bench):
        lines.append(f"| {claim} | **{verdict}** | {detail} |")
    lines += ["", "## Notes", "", NOTES]
    path = os.path.join(RESULTS, f"{NAME}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


NOTES = """\
- Why the ratio grows with batch in the decode-heavy case. Each vanilla decode step reads its
  whole KV cache (2 x 4 layers x 64 x 4 bytes = 2048 bytes per token of context per row), so
  its throughput stays flat near 1000 tokens/s from batch 8 to 64: it is bound by memory
  traffic, as on a GPU. The block model reads about 1/8 of those bytes (kv_bytes_ratio 0.127:
  a quarter of the entries in half as many layers, plus the small local rings), runs its block
  decoder once every L_B = 4 tokens and otherwise one query over at most R + L_B - 1 = 5 local
  positions, so its throughput keeps growing with the batch.
- What limits it on this CPU. At batch 1 both models are dominated by fixed per-step costs
  (the loop, the MLPs and output head of a d = 128 model, XLA:CPU's tiny matrix products), so
  the ratio is about 5-6x; the block model still runs its 2-layer token decoder every token.
  Only two cores, so batches past 64 add time linearly; the bench caps the largest batch at
  64 to fit its time budget (batch 128 would fit in memory).
- In the prefill-heavy case the vanilla model's dense O(T^2) prefill attention over 2048
  tokens (the decoding path attends with masked dense attention, no fused kernel) dominates
  its time; the block decoder attends over T / L_B = 512 blocks. The block model's prefill
  still runs the token decoder over every prompt block (the protocol returns logits for every
  prompt position), which is why its advantage shrinks at batch 16.
- The quality runs are tiny (300 steps, 0.6M training tokens each) and ran on a busy shared
  CPU; gaps at this scale are indicative, not the paper's scaling results.
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval_batches", type=int, default=16)
    p.add_argument("--workdir_root", default="workdirs/block_transformer_reproduce")
    p.add_argument("--bench_jsonl", default=os.path.join(RESULTS, f"{NAME}_bench.jsonl"))
    p.add_argument("--only_report", action="store_true",
                   help="skip training; rebuild the page from runs.jsonl in workdir_root")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps={args.steps} must be at least 1")
    os.makedirs(RESULTS, exist_ok=True)
    runs_file = os.path.join(args.workdir_root, "runs.jsonl")
    if args.only_report:
        with open(runs_file) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        rows = train_all(args.steps, args.workdir_root, args.eval_batches)
        with open(runs_file, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    bench = read_bench(args.bench_jsonl)
    plots = plot(rows, bench)
    print(write_markdown(rows, bench, plots, args))


if __name__ == "__main__":
    main()

"""Writes docs/results/double_sparsity.md and its plot from the measurements of
experiments/reproduce/double_sparsity.py (Double Sparsity, arXiv 2408.07092)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.results_pages import double_sparsity_speed as speed  # noqa: E402

PPL_GOAL = 1.05  # the goal at 1/8


def _attention(bench, batch, context):
    rows = [b for b in bench if b.get("metric") == "attention_speedup"
            and b["batch"] == batch and b["context"] == context]
    return {int(b["case"].rsplit("/", 1)[1]): b for b in rows}


def _plot(results, bench, path):
    ppl = results.get("perplexity", {})
    dense = ppl[1]["ppl"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    fracs = []
    curves = [("every layer sparse, r = D/16", "o:", results.get("perplexity_all_layers", {}))]
    table = _quality(results)
    styles = {"r4_dense2": ("r = D/16 (2 dense layers)", "o-"),
              "r4_dense2_query_head": ("r = D/16, per query head", "v--"),
              "r16_4bit_dense2": ("r = D/4 4-bit (README)", "D-"),
              "r16_4bit_dense2_query_head": ("r = D/4 4-bit, per query head", "^--"),
              "oracle_dense2": ("oracle (true q.k)", "*-")}
    curves += [(label, style, table[name]) for name, (label, style) in styles.items()
               if name in table]
    for label, style, part in curves:
        fs = sorted(f for f in part if f != 1)
        fracs = sorted(set(fracs) | set(fs))
        a.plot(fs, [part[f]["ppl"] / dense for f in fs], style, label=label, alpha=0.85)
    acc = results.get("retrieval", {})
    a.axhline(PPL_GOAL, color="red", lw=0.8, ls=":", label="ppl goal (1/8)")
    a.set_yscale("log")
    a.set_ylabel("perplexity ratio to dense (log)")
    if acc:  # accuracy on its own linear axis
        fr = sorted(f for f in acc if f != 1)
        r = a.twinx()
        r.plot(fr, [acc[f]["accuracy"] for f in fr], "s--", color="purple",
               label="retrieval accuracy (right)")
        r.axhline(acc[1]["accuracy"], color="purple", lw=0.8, ls=":",
                  label="dense retrieval (right)")
        r.set_ylim(-0.35, 1.05)  # keeps 0 clear of the ppl points near a ratio of 1
        r.legend(fontsize=7, loc="center right")
    if fracs:  # a partial run may have only the dense perplexity
        a.set_xscale("log", base=2)
        a.set_xticks(fracs, [f"1/{f}" for f in fracs])
    a.set_xlabel("token sparsity (fraction attended)")
    a.set_title("SmolLM2-135M quality vs dense")
    a.legend(fontsize=7, loc="upper left")
    for batch, marker in ((1, "o"), (8, "s")):
        for context in sorted({x["context"] for x in bench if "context" in x
                               and x.get("metric") == "attention_speedup"}):
            cases = _attention(bench, batch, context)
            if cases:
                fs = sorted(cases)
                b.plot(fs, [cases[f]["value"] for f in fs], marker + "-",
                       label=f"b{batch} {context // 1024}k")
    fs = [4, 8, 16]
    b.plot(fs, [2 * 128 / (8 + 2 * 128 / f) for f in fs], "k:", label="bandwidth ideal")
    b.set_xscale("log", base=2)
    b.set_xticks(fs, [f"1/{f}" for f in fs])
    b.set_xlabel("token sparsity (k / S), r = D/16")
    b.set_ylabel("attention speedup vs dense (CPU)")
    b.set_title("decode attention speedup")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verdict(ok: bool, partial: bool = False) -> str:
    return "reproduced" if ok else ("not at this scale" if partial else "contradicted")


# What DoubleSparse's own evaluation does (andy-yang-1/DoubleSparse @ b0575e6), read for the
# 1/8 investigation; each line names the file it comes from.
OFFICIAL = [
    "`evaluation/modify_llama.py` (the perplexity and retrieval evaluations): layers 0 and 1 "
    "always attend densely (`if self.layer_idx < 2: return self.flash_forward(...)`); the "
    "offloading variant keeps layers 0, 1 and 31 dense. **We lacked this**: now "
    "`ds_dense_layers` (default 2, the official value).",
    "Same file: selection is per *query head* (keys repeated with `repeat_kv`, channels "
    "`sorted_channel[num_heads, D]`); ours is per KV-head group by default (max over its 3 "
    "query heads, so each gathered row serves all of them), and per query head with "
    "`ds_selection=\"query_head\"` (the quality table's \"per query head\" rows). The "
    "attention-mass table's oracle is per query head: the official rule at its best.",
    "Same file: no attention sinks, no recent window, no minimum token count; a query keeps "
    "`heavy_const` tokens, an absolute number (128 in the README's command), so queries "
    "earlier than `heavy_const` are dense. Ours keeps a fraction of each query's context and "
    "is dense up to 256 keys.",
    "Same file: labels are quantized (`pseudo_quantize`, per-token min/max, 4 bits: "
    "`convert_kvcache_llama_heavy_recent` drops its `label_bits` argument when it recurses, "
    "so the default 4 applies), and the README's perplexity command uses `--group_factor 4`, "
    "i.e. r = D/4 channels at 4 bits: the same label bytes as r = D/16 at 16 bits. The "
    "paper's 3-D perplexity plot (`evaluation/perplexity_3d.py`) counts channel sparsity in "
    "bits, `log2(group_factor * 16 / qbit)`. We now have 4-bit labels (`ds_label_bits=4`, "
    "symmetric, int8 storage).",
    "`config/offline_calibration.py`: the \"qk\" ranking is mean |q * k| after RoPE per "
    "query head, as ours (per KV head, averaged over its query heads). Its accumulation "
    "tests `name` but stores `name + '.qk_proj'`, so each sample overwrites the last and the "
    "file holds the last sample's ranking; ours sums over all calibration rows. "
    "`evaluation/perplexity_eval.py` defaults to `--channel q` (rank by |q|), "
    "`models/generate.py` uses \"qk\".",
]


def _name(f) -> str:
    return "all (dense)" if f == 1 else f"1/{f}"


# The quality table's settings (experiments/reproduce/double_sparsity.py QUALITY), all with
# the first 2 layers dense.
QUALITY_NAMES = {
    "r4_dense2": "labels r = D/16 = 4, 16-bit, per KV-head group",
    "r4_dense2_query_head": "labels r = D/16 = 4, 16-bit, per query head (official rule)",
    "r16_4bit_dense2": "labels r = D/4 = 16, 4-bit, per KV-head group (README setting)",
    "r16_4bit_dense2_query_head": "labels r = D/4 = 16, 4-bit, per query head",
    "oracle_dense2": "oracle: true q.k over all 64 channels, per KV-head group",
}


def _quality(results) -> dict:
    """{setting: {fraction: measurement}}: the quality part, with the 2-dense-layer r = D/16
    runs of the perplexity part and the README setting of the ablation part folded in."""
    q = {name: dict(x) for name, x in results.get("quality", {}).items()}
    for f, x in results.get("perplexity", {}).items():
        if f != 1:
            q.setdefault("r4_dense2", {}).setdefault(f, x)
    abl = results.get("ablation", {})
    for name in ("r16_4bit_dense2", "oracle_dense2"):
        if name in abl:
            q.setdefault(name, {}).setdefault(8, abl[name])
    return q


def _ppl_lines(results, meta) -> list[str]:
    ppl, old = results["perplexity"], results.get("perplexity_all_layers", {})
    dense = ppl[1]["ppl"]
    table = _quality(results)
    fracs = sorted({f for x in table.values() for f in x} | {f for f in old if f != 1})
    lines = ["## Perplexity on held-out text", "",
             f"{meta['ppl_rows']} rows of {meta['ppl_len']} tokens of the corpus' validation "
             f"split (Python source), fed through `extend` {meta['chunk']} tokens at a time so "
             "every query selects its own tokens over its causal prefix, as a decode step "
             f"does; scored on the {ppl[1]['tokens']} next-token predictions past position "
             f"{meta['min_context']}. Dense perplexity {dense:.4f}. Each cell: ppl_ratio "
             "(perplexity); goal <= 1.05 at 1/8. The first 2 layers dense (the official "
             "evaluation's default) except the last row.", "",
             "| selection | " + " | ".join(f"1/{f}" for f in fracs) + " |",
             "|---|" + "---|" * len(fracs)]

    def row(label, by_fraction):
        cells = [f"{by_fraction[f]['ppl'] / dense:.3f} ({by_fraction[f]['ppl']:.2f})"
                 if f in by_fraction else "-" for f in fracs]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines += [row(label, table[name]) for name, label in QUALITY_NAMES.items() if name in table]
    if old:
        lines.append(row("labels r = D/16 = 4, 16-bit, per KV-head group, every layer sparse",
                         old))
    return lines


def _investigation_lines(results) -> list[str]:
    ppl, old = results["perplexity"], results.get("perplexity_all_layers", {})
    dense = ppl[1]["ppl"]
    abl, sweep = results.get("ablation", {}), results.get("channel_sweep")
    rows = [("labels r = 4 (D/16), 16-bit", "all", old.get(8)),
            ("labels r = 4 (D/16), 16-bit", "0-1", ppl.get(8))]
    if sweep:
        rows += [(f"labels r = {r} (D/{64 // r}), 16-bit", "all", x)
                 for r, x in sorted(sweep["ppl"].items())]
    names = {"r16_4bit_dense2": ("labels r = 16 (D/4), 4-bit (the README's setting)", "0-1"),
             "oracle": ("oracle: true q.k (r = D = 64)", "all"),
             "oracle_dense2": ("oracle: true q.k (r = D = 64)", "0-1")}
    rows += [names[k] + (abl[k],) for k in names if k in abl]
    lines = ["## Why 1/8 misses the goal", "",
             "Perplexity at 1/8 of the tokens, one change at a time. The *oracle* selects "
             "with the exact q.k over all 64 channels (same group-max rule, same budget), so "
             "its loss is the token-selection loss alone; the gap between a label row and the "
             "oracle is the label-approximation loss.", "",
             "| selection | dense layers | perplexity | ppl_ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {x['ppl']:.4f} | {x['ppl'] / dense:.4f} |"
              for a, b, x in rows if x]
    mass = results.get("attention_mass")
    if mass:
        lines += ["", f"The share of each query's dense attention mass on the 1/"
                  f"{mass['fraction']} of the tokens kept (mean over the last "
                  f"{mass['queries']} queries of a 1024-token validation row and all 9 heads; "
                  "all layers sparse), by layer:", "",
                  "| selection | " + " | ".join(f"layer {x}" for x in mass["layers"]) + " |",
                  "|---|" + "---|" * len(mass["layers"])]
        for name, values in mass["mass"].items():
            label = {"oracle": "oracle (true top tokens, per query head)"}.get(
                name, f"labels, {name}")
            lines.append(f"| {label} | " + " | ".join(f"{x:.3f}" for x in values) + " |")
    lines += ["", "What the official code does (read at b0575e6):", ""]
    lines += [f"- {x}" for x in OFFICIAL]
    return lines


_SETTINGS = {"r16_4bit_dense2": "1/8, r = D/4 4-bit labels (README setting)",
             "r16_4bit_dense2_query_head": "1/8, r = D/4 4-bit labels, per query head",
             "oracle": "1/8, oracle selection, all layers sparse",
             "oracle_dense2": "1/8, oracle selection"}


def _retrieval_lines(ret, meta, extra) -> list[str]:
    lines = ["## Key-value retrieval", ""]
    if not ret:
        return lines + ["**Not run**: " + meta.get("missing", "the run did not reach it") + "."]
    r1 = ret[1]
    lines += [f"{r1['trials']} prompts (`experiments/kv_retrieval.py`) of about "
              f"{r1['context_tokens']} tokens: {r1['pairs']} facts `The magic number for "
              "<word> is <4 digits>.` at random depths of filler text in one user turn of the "
              "chat template, then `What is the magic number for <word>?`, and the assistant "
              "turn opened with `The magic number for <word> is`. The context is prefilled "
              "densely once per prompt (as DoubleSparse prefills); the question and the 7 "
              "answer tokens are decoded token by token with the attention under test (r = 4, "
              "2 dense layers). Correct when the answer's first number is the value. Probes "
              "of the design with dense attention: 130-150 `ID <5 digits>: <5 digits>` lines "
              "got 0 of 8 and 0 of 4 right (too hard for a 135M model); the facts-in-filler "
              "format with 5-digit values got 2 of 4 (8 facts) and 1 of 4 (3 facts), the "
              "misses copying the first digits only, hence 4-digit values.", "",
              "| tokens kept | retrieval_accuracy | example answers (value: answer) |",
              "|---|---|---|"]
    for f in sorted(ret):
        ex = "; ".join(f"{e['value']}: {e['answer']!r}" for e in ret[f]["examples"][:3])
        lines.append(f"| {_name(f)} | {ret[f]['accuracy']:.3f} | {ex} |")
    for name, x in extra.items():  # the same prompts, other label settings
        ex = "; ".join(f"{e['value']}: {e['answer']!r}" for e in x["examples"][:3])
        lines.append(f"| {_SETTINGS.get(name, name)} | {x['accuracy']:.3f} | {ex} |")
    return lines


def write(results: dict, bench: list[dict], meta: dict, out: str) -> None:
    out_dir = os.path.dirname(out) or "."
    stem = os.path.splitext(os.path.basename(out))[0]
    png = f"{stem}_quality_speed.png"
    _plot(results, bench, os.path.join(out_dir, png))
    blk = results["block_error"]
    ret = results.get("retrieval", {})
    att = [b for b in bench if b.get("metric") == "attention_speedup"]
    dec = [b for b in bench if b.get("metric") == "decode_speedup"]
    runs = "; ".join(f"{'+'.join(r['parts'])} {r['minutes']:.1f} min (load {r['load_average']:.1f})"
                     for r in meta.get("runs", []))
    lines = [
        "# Double Sparsity (arXiv 2408.07092) on SmolLM2-135M", "",
        "Double Sparsity decodes with an exact softmax over the top-k tokens chosen by *label "
        "scores* over r calibrated channels per KV head. Here: SmolLM2-135M-Instruct in f32 "
        "(30 layers, 9 query / 3 KV heads of D = 64), r = D/16 = 4 channels ranked by mean "
        "|q*k| after RoPE on 8k tokens of the corpus' train split "
        f"(`{meta['calibration']}`), selection per KV-head group (the max over its 3 query "
        f"heads; per query head where a table says so), dense up to "
        f"{meta['min_context']} keys, and, as DoubleSparse's evaluation "
        "does, the first 2 layers dense. Produced by "
        "`python -m experiments.reproduce.double_sparsity` (in parts: `--parts`) on "
        f"{meta['machine']}; first run 43.3 min at load 10-16"
        + (f"; then {runs}" if runs else "") + ".", ""]
    lines += _ppl_lines(results, meta) + [""]
    lines += _investigation_lines(results) + [""]
    lines += _retrieval_lines(ret, meta, results.get("retrieval_ablation", {})) + [""]
    lines += speed.speed_lines(att, dec, meta)
    lines += ["", f"![quality and speed vs sparsity]({png})", "",
              "## TPU kernel: block-granular selection (an approximation)", "",
              f"Relative L2 error to dense attention of the last query of 2 validation rows "
              f"({blk['context']} tokens, k = {blk['top_k']} tokens = 1/16, layers "
              f"{blk['layers']}, real SmolLM2 queries/keys): token-level Double Sparsity "
              f"{blk['token']:.3f}; the TPU kernel's selection of whole blocks with the same "
              "token budget: " + ", ".join(f"{k[5:]}-token blocks {v:.3f}" for k, v in
                                           blk.items() if k.startswith("block")) + ".", ""]
    lines += _verdicts(ret, att, dec, blk, results)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


def _verdicts(ret, att, dec, blk, results) -> list[str]:
    v = ["## Verdicts", ""]
    dense = results["perplexity"][1]["ppl"]
    table = {name: {f: x["ppl"] / dense for f, x in by_f.items()}
             for name, by_f in _quality(results).items()}
    r4 = table.get("r4_dense2", {})
    abl = {k: x["ppl"] / dense for k, x in results.get("ablation", {}).items()}
    if 8 not in r4:
        v.append("- **Little quality loss at 1/8-1/16 token sparsity with r = D/16**: 1/8 not "
                 "measured: no verdict.")
    else:
        r8 = r4[8]
        # Partly reproduced when some label setting (not the oracle) comes near the goal.
        labels8 = {k: x[8] for k, x in table.items() if 8 in x and not k.startswith("oracle")}
        best = min(labels8.values())
        measured = ", ".join(f"{x:.3f} at 1/{f}" for f, x in sorted(r4.items()))
        text = (f"- **Little quality loss at 1/8-1/16 token sparsity** (paper: near-dense "
                f"perplexity at 1/16): with r = D/16 = 4 and the first 2 layers dense, "
                f"ppl_ratio {measured} (goal <= {PPL_GOAL} at 1/8): "
                f"**{_verdict(r8 <= PPL_GOAL, best <= 1.1)}** on this 135M model "
                "(head_dim 64) and Python text.")
        for name, what in (("r16_4bit_dense2", "The README's setting (r = D/4 at 4 bits, the "
                            "same label bytes)"),
                           ("r4_dense2_query_head", "Per-query-head selection (the official "
                            "rule) with r = D/16"),
                           ("r16_4bit_dense2_query_head", "Per query head with r = D/4 4-bit")):
            if name in table:
                text += f" {what}: " + ", ".join(f"{x:.3f} at 1/{f}" for f, x in
                                                 sorted(table[name].items())) + "."
        ora = table.get("oracle_dense2", {}).get(8, abl.get("oracle"))
        if ora is not None:
            where = ("most of the loss is the labels', not token sparsity itself"
                     if ora - 1 < (r8 - 1) / 2 else "token sparsity itself costs most of it")
            text += (f" Selecting with the true q.k instead of labels gives {ora:.3f} at 1/8: "
                     f"{where}.")
        text += (f" Best label setting at 1/8: {best:.3f} ("
                 + ("meets the goal" if best <= PPL_GOAL
                    else f"misses the goal by {best - PPL_GOAL:.3f}") + ").")
        v.append(text)
    if ret:
        acc = {f: ret[f]["accuracy"] for f in ret}
        worst = min(acc[f] for f in acc if f != 1)
        v.append("- **Retrieval survives sparsity**: retrieval_accuracy " + ", ".join(
            f"{'dense' if f == 1 else f'1/{f}'} {a:.2f}" for f, a in sorted(acc.items()))
            + f" ({ret[1]['trials']} prompts, so steps of 0.125; r = D/16 = 4, 2 dense "
              "layers): "
            + f"**{_verdict(worst >= acc[1] - 0.1, worst > 0)}**"
            + (" (dense itself is weak at this model size)" if acc[1] < 0.5 else "")
            + "".join(f"; {_SETTINGS.get(k, k)}: {x['accuracy']:.2f}"
                      for k, x in results.get("retrieval_ablation", {}).items()) + ".")
    else:
        v.append("- **Retrieval survives sparsity**: not measured in this run: no verdict.")
    goal = [b for b in att if b.get("goal") and b["batch"] == 1]
    if goal:  # judged on the lowest of the batch-1 runs of the goal case
        g = min(goal, key=lambda b: b["value"])
        runs = " and ".join(f"{b['value']:.2f}x (best of {b['repeats']})" for b in goal)
        runs += "".join(f" (batch {b['batch']}: {b['value']:.2f}x)" for b in att
                        if b.get("goal") and b["batch"] != 1)
        v.append(f"- **Attention speedup (paper: up to 14.1x on GPU with 4-bit labels; "
                 f"bandwidth ideal 10.7x with 16-bit labels)**: {runs} at batch "
                 f"{g['batch']}, {g['context'] // 1024}k, 1/16 on CPU (goal >= 5x; judged on the "
                 f"lowest): **{_verdict(g['value'] >= 5, g['value'] > 1)}** on CPU; the GPU "
                 "figure was not measured (no GPU lent to this task).")
    if dec:
        d = dec[0]
        v.append(f"- **End-to-end decode speedup (paper: 1.9x on GPU)**: {d['value']:.2f}x at "
                 f"{d['context'] // 1024}k context, batch 1, CPU: "
                 f"**{_verdict(d['value'] >= 1.9, d['value'] > 1)}**.")
    v.append("- **TPU block selection** is an approximation: error to dense "
             + ", ".join(f"{v_:.3f}" for k, v_ in blk.items() if k.startswith("block"))
             + f" vs {blk['token']:.3f} for token-level selection.")
    return v

"""docs/results/rmoe.md and its plots from the runs of experiments/reproduce/rmoe.py (RMoE,
arXiv 2408.06793): a table of validation bits per byte per depth and router, the seed spread,
router entropy and expert-load balance per layer, and a verdict per headline claim.

A gap counts as a result only when it is larger than the seed noise, taken as the larger of
the two compared variants' seed ranges (max - min over seeds).
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ORDER = ("SMoE", "RMoE", "RMoE-NP", "RMoE-detached")


def _by(rows, variant, depth):
    return [r for r in rows if r["variant"] == variant and r["depth"] == depth]


def _bpc(rows, variant, depth):
    return np.array([r["val_bits_per_byte"] for r in _by(rows, variant, depth)])


def _imbalance(load) -> np.ndarray:
    """Per layer: coefficient of variation of the expert load (0 = perfectly balanced)."""
    load = np.asarray(load)
    return load.std(axis=-1) / load.mean(axis=-1)


def _compare(rows, better, worse, depth):
    """(gap = mean(worse) - mean(better), noise) in bits per byte; None if a side is
    missing."""
    a, b = _bpc(rows, better, depth), _bpc(rows, worse, depth)
    if not a.size or not b.size:
        return None
    noise = max(np.ptp(a) if a.size > 1 else 0.0, np.ptp(b) if b.size > 1 else 0.0)
    return float(b.mean() - a.mean()), float(noise)


def _verdict(gap, noise) -> str:
    if gap > noise:
        return "reproduced"
    if gap < -noise:
        return "contradicted"
    return "not at this scale"


def _plots(rows, depths, out_dir, stem):
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / len(ORDER)
    for i, variant in enumerate(ORDER):
        means, lo, hi = [], [], []
        for d in depths:
            v = _bpc(rows, variant, d)
            if not v.size:           # a run that did not finish: leave a gap
                v = np.array([np.nan])
            means.append(v.mean())
            lo.append(v.mean() - v.min())
            hi.append(v.max() - v.mean())
        x = np.arange(len(depths)) + (i - (len(ORDER) - 1) / 2) * width
        ax.bar(x, means, width, yerr=[lo, hi], capsize=3, label=variant)
    all_bpc = np.array([r["val_bits_per_byte"] for r in rows])
    ax.set_ylim(all_bpc.min() - 0.05, all_bpc.max() + 0.03)
    ax.set_xticks(np.arange(len(depths)), [f"{d} layers" for d in depths])
    ax.set_ylabel("validation bits per byte")
    ax.set_title("SMoE vs RMoE and ablations (bars: seed mean, whiskers: min-max)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    bpc_png = f"{stem}_bpc.png"
    fig.savefig(os.path.join(out_dir, bpc_png), dpi=120)
    plt.close(fig)

    deepest = max(depths)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for variant in ORDER:
        runs = _by(rows, variant, deepest)
        if not runs:
            continue
        entropy = np.mean([r["router_entropy"] for r in runs], axis=0)
        imbalance = np.mean([_imbalance(r["expert_load"]) for r in runs], axis=0)
        layers = np.arange(1, len(entropy) + 1)
        ax1.plot(layers, entropy, marker="o", label=variant)
        ax2.plot(layers, imbalance, marker="o", label=variant)
    num_experts = rows[0]["num_experts"]
    ax1.axhline(np.log(num_experts), color="gray", ls=":", label=f"uniform (log {num_experts})")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("router entropy (nats)")
    ax1.set_title(f"router entropy, {deepest} layers")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("expert-load coefficient of variation")
    ax2.set_title(f"expert load imbalance, {deepest} layers (0 = balanced)")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    router_png = f"{stem}_router.png"
    fig.savefig(os.path.join(out_dir, router_png), dpi=120)
    plt.close(fig)
    return bpc_png, router_png


def write(rows: list[dict], out: str, *, machine: str, steps: int, seeds: list[int],
          stat_batches: int = 4) -> None:
    out_dir = os.path.dirname(out) or "."
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(out))[0]
    depths = sorted({r["depth"] for r in rows})
    bpc_png, router_png = _plots(rows, depths, out_dir, stem)
    r0 = rows[0]
    total_minutes = sum(r["train_seconds"] for r in rows) / 60
    lines = [
        "# RMoE: Layerwise Recurrent Router for Mixture-of-Experts (arXiv 2408.06793)",
        "",
        "Run by `python -m experiments.reproduce.rmoe` "
        f"({len(rows)} runs, {total_minutes:.1f} min of training summed over runs, on {machine}).",
        "",
        "## Setup",
        "",
        f"- Byte-level LM on the embedded corpus (the standard library's `.py` files), "
        f"sequence 128, batch 8, {steps} steps (AdamW, lr 3e-3, cosine), the same token "
        f"stream for every run; seeds {seeds} change only the initialisation.",
        f"- Llama blocks with MoE MLPs: d_model {r0['d_model']}, {r0['num_experts']} SwiGLU "
        f"experts of inner size {r0['d_model']}, top-{r0['top_k']}, Switch balance loss 0.01, "
        f"z-loss 1e-3; dispatch `{r0['dispatch']}` (capacity factor {r0['capacity_factor']}).",
        f"- SMoE: a linear router per layer. RMoE: per-layer W1 (d -> p = {r0['router_dim']}), "
        "one GRU cell shared by all layers with its state passed layer to layer per token, "
        "per-layer W2 (p -> E). RMoE-NP: the same with h reset to 0 at every layer. "
        "RMoE-detached: h passed but with no gradient through it.",
        "- Configs: `experiments/configs/{smoe,rmoe}_tiny.gin` (6 layers) and "
        "`{smoe,rmoe}_deep_tiny.gin` (12 layers); ablations bind `RMoEConfig.state_passing`.",
        f"- Router statistics: mean over {stat_batches} validation batches after training; "
        "load CV is the coefficient of variation of the 16 experts' token-slot shares "
        "(0 = balanced), dropped the fraction of token-slots over capacity.",
        "",
        "## Validation bits per byte",
        "",
        "| layers | router | " + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | spread (max-min) | vs SMoE | router entropy (nats) | load CV | dropped |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|---|---|---|",
    ]
    for d in depths:
        base = _bpc(rows, "SMoE", d).mean()
        for variant in ORDER:
            runs = sorted(_by(rows, variant, d), key=lambda r: r["seed"])
            if not runs:
                lines.append(f"| {d} | {variant} | not run |" + " |" * (len(seeds) + 5))
                continue
            v = np.array([r["val_bits_per_byte"] for r in runs])
            entropy = np.mean([np.mean(r["router_entropy"]) for r in runs])
            cv = np.mean([np.mean(_imbalance(r["expert_load"])) for r in runs])
            dropped = np.mean([r["dropped_fraction"] for r in runs])
            cells = {r["seed"]: f"{r['val_bits_per_byte']:.4f}" for r in runs}
            lines.append(
                f"| {d} | {variant} | " + " | ".join(cells.get(s, "not run") for s in seeds)
                + f" | {v.mean():.4f} | {np.ptp(v):.4f} | {v.mean() - base:+.4f} | "
                f"{entropy:.3f} | {cv:.3f} | {dropped:.3f} |")
    lines += ["", f"![bits per byte]({bpc_png})", "",
              f"![router entropy and expert load]({router_png})", "",
              "## Claims", ""]
    lines.append("| claim (paper) | here | verdict |")
    lines.append("|---|---|---|")
    gaps = {d: _compare(rows, "RMoE", "SMoE", d) for d in depths}
    for d in depths:
        if gaps[d] is None:
            continue
        gap, noise = gaps[d]
        lines.append(f"| RMoE beats SMoE ({d} layers; enwik8 "
                     f"{'1.214 -> 1.213' if d == 6 else '1.158 -> 1.151'} val BPC) | "
                     f"SMoE - RMoE = {gap:+.4f} bits/byte, seed noise {noise:.4f} | "
                     f"{_verdict(gap, noise)} |")
    if len(depths) > 1 and all(gaps[d] is not None for d in depths):
        shallow, deep = depths[0], depths[-1]
        growth = gaps[deep][0] - gaps[shallow][0]
        noise = max(gaps[deep][1], gaps[shallow][1])
        lines.append(f"| the gain grows with depth | gain at {deep} layers - gain at {shallow} "
                     f"= {growth:+.4f}, noise {noise:.4f} | {_verdict(growth, noise)} |")
    for ablation, what in (("RMoE-NP", "passing the state across layers helps (NP worse)"),
                           ("RMoE-detached", "gradients through the passed state help "
                                             "(detached worse; third-party summary)")):
        for d in depths:
            if _compare(rows, "RMoE", ablation, d) is None:
                lines.append(f"| {what}, {d} layers | not run | - |")
                continue
            gap, noise = _compare(rows, "RMoE", ablation, d)
            lines.append(f"| {what}, {d} layers | {ablation} - RMoE = {gap:+.4f}, noise "
                         f"{noise:.4f} | {_verdict(gap, noise)} |")
    lines += [
        "",
        "A gap is called reproduced only when it exceeds the seed noise (the larger of the two "
        "variants' max-min ranges over seeds); within the noise the verdict is \"not at this "
        "scale\", beyond it in the other direction \"contradicted\".",
        "",
        "## What explains the result",
        "",
        "The paper's own gains at 6 and 12 layers on enwik8 are 0.001 and 0.007 BPC after "
        "full training of d_model 264 models (the CompeteSMoE-s setting), i.e. 0.1-0.6 % "
        "relative. These runs are "
        f"{steps} steps of a d_model {r0['d_model']} model, a few minutes of CPU: the seed "
        "noise of such short runs is of the same order as or larger than the effect, so a gap "
        "this small can neither be confirmed nor ruled out here. The router statistics show "
        "what does differ: how peaked the routers are (entropy below log E) and how evenly "
        "they spread tokens, layer by layer.",
        "",
    ]
    deep = depths[-1]
    stats = {}
    for variant in ORDER:
        runs = _by(rows, variant, deep)
        if not runs:
            continue
        stats[variant] = (np.mean([np.mean(r["router_entropy"]) for r in runs]),
                          np.mean([np.mean(_imbalance(r["expert_load"])) for r in runs]),
                          np.mean([r["dropped_fraction"] for r in runs]))
    lines.append(f"Router statistics at {deep} layers (mean over layers and seeds; uniform "
                 f"routing has entropy log {r0['num_experts']} = "
                 f"{np.log(r0['num_experts']):.3f} nats): " + "; ".join(
                     f"{v} entropy {e:.3f}, load CV {c:.3f}, dropped {d:.3f}"
                     for v, (e, c, d) in stats.items()) + ".")
    lines.append("")
    if "RMoE" in stats and "SMoE" in stats and stats["RMoE"][0] > 0.99 * np.log(
            r0["num_experts"]) > stats["SMoE"][0]:
        lines += [
            "RMoE's routers stayed almost uniform in probability while SMoE's sharpened. "
            "The likely reason is scale: RMoE's logits are W2 h with W2 ~ N(0, 0.02) and "
            f"|h| < 1 over p = {r0['router_dim']} units, an order of magnitude smaller at "
            "initialisation than the linear router's x W on unit-RMS inputs, so within a few "
            "hundred steps top-k is decided by small logit differences; the balance loss acts "
            "through the probabilities, which then carry little signal, and the expert load "
            "is less even. The paper trains far longer (and at p = 128 against d = 1280), "
            "where this initial transient should not matter.", ""]
    lines += [
        "Caveats. (1) The capacity dispatch drops the token-slots an expert cannot take, and "
        "the less balanced routers drop more (the dropped column), so part of every gap here "
        "may be drops rather than routing quality; a dropless run (`RMoEConfig.dispatch = "
        "\"ragged\"` or `\"dense\"`) removes this at E/k times the expert compute on this "
        "CPU. (2) Two seeds give a range, not a significance test: a verdict of "
        "\"reproduced\" here means only that the gap exceeded both variants' seed ranges.", ""]
    with open(out, "w") as f:
        f.write("\n".join(lines))

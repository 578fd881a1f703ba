"""The results of a sweep (experiments/sweep_runner.py): results.csv, results.md (a markdown
table) and plot_METRIC_vs_AXIS.png, the metric against each axis with one line per value of
the other axes.
"""
from __future__ import annotations

import csv
import pathlib
from typing import Any, Sequence

from experiments.sweep_config import Sweep, short_names, slug


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_results(sweep: Sweep, rows: Sequence[dict[str, Any]], workdir: pathlib.Path
                  ) -> list[pathlib.Path]:
    """results.csv, results.md and the plots; returns their paths."""
    names = short_names(sweep)
    keys = [k for axis in sweep.axes for k in axis]
    columns = [*keys, *sweep.metrics, "status", "point"]
    with open(workdir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    header = [names[k] for k in keys] + list(sweep.metrics) + ["status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_fmt(row[k]) for k in keys] + [_fmt(row[m]) for m in sweep.metrics]
        lines.append("| " + " | ".join(cells + [row["status"]]) + " |")
    (workdir / "results.md").write_text("\n".join(lines) + "\n")
    return [workdir / "results.csv", workdir / "results.md", *plot_results(sweep, rows,
                                                                            workdir)]


def plot_results(sweep: Sweep, rows: Sequence[dict[str, Any]], workdir: pathlib.Path
                 ) -> list[pathlib.Path]:
    """plot_METRIC_vs_AXIS.png for every metric and axis (an axis of zipped bindings is
    plotted against its first binding): one line per value of the other axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = short_names(sweep)
    paths = []
    for metric in sweep.metrics:
        for i, axis in enumerate(sweep.axes):
            x_key = next(iter(axis))
            xs = list(axis[x_key])
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
            others = [k for j, a in enumerate(sweep.axes) if j != i for k in a]
            fig, ax = plt.subplots(figsize=(5, 3.5))
            groups: dict[tuple, list] = {}
            for row in rows:
                groups.setdefault(tuple(row[k] for k in others), []).append(row)
            for other, group in groups.items():
                pts = [(xs.index(r[x_key]), r[metric]) for r in group if r[metric] is not None]
                if not pts:
                    continue
                pts.sort()
                label = ", ".join(f"{names[k]}={v}" for k, v in zip(others, other)) or None
                ax.plot([xs[p] if numeric else p for p, _ in pts], [m for _, m in pts],
                        marker="o", label=label)
            if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
            if numeric:
                ax.set_xticks(xs, [f"{x:g}" for x in xs])   # the swept values, not 0.2 steps
                ax.minorticks_off()
            else:
                labels = [", ".join(f"{names[k]}={axis[k][j]}" for k in axis)
                          for j in range(len(xs))]
                ax.set_xticks(range(len(xs)), labels, rotation=15, fontsize=7)
            ax.set_xlabel(" + ".join(names[k] for k in axis))
            ax.set_ylabel(metric)
            if others:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = workdir / f"plot_{metric}_vs_{slug(names[x_key])}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")  # keep long tick labels
            plt.close(fig)
            paths.append(path)
    return paths

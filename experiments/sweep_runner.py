"""Gin sweeps, importable: expand a sweep file into points, run each point as its own
`python -m experiments.launch` in its own workdir, and collect a results table and plots.
experiments/sweep.py is the command line; notebooks and reproduction scripts call `run_sweep`.

A sweep file is gin, binding the `Sweep` configurable below:

    Sweep.base = ["baseline_tiny.gin"]                  # gin files of every point
    Sweep.bindings = ["TrainConfig.steps = 300"]        # bindings of every point
    Sweep.axes = [
        {"TrainConfig.lr": [1e-3, 3e-3, 1e-2]},         # one axis
        {"TransformerConfig.d_model": [64, 128],        # one axis of two zipped bindings
         "TransformerConfig.n_heads": [2, 4]},
    ]
    Sweep.metrics = ["eval_bits_per_byte", "train_loss"]

Bindings inside one axis move together (zip); the axes form a product. A point's workdir is
named by its values (`WORKDIR/points/lr=0.001,d_model=64`), so a re-run finds it again: a
point whose launch wrote a finished summary.json is skipped, and any other is launched again,
which resumes from its newest checkpoint (experiments/launch.py, train/checkpoint.py). The
results land in the sweep's workdir as results.csv, results.md (a markdown table) and one plot
per metric and axis (plot_METRIC_vs_AXIS.png: the metric against that axis, one line per
value of the other axes). The file format is experiments/sweep_config.py, the tables and
plots experiments/sweep_report.py.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import threading
from typing import Any, Callable, Sequence

import gin

from experiments.sweep_config import (METRICS, SWEEP_DIR, Point, Sweep, expand,  # noqa: F401
                                      load_sweep, shipped_sweeps, short_names)
from experiments.sweep_report import write_results

REPO_ROOT = pathlib.Path(__file__).parent.parent
POINTS_SUBDIR = "points"
SUMMARY_FILE = "summary.json"   # written by experiments/launch.py


def check_points(sweep: Sweep, points: Sequence[Point], extra_bindings: Sequence[str]) -> None:
    """Parses every point's config and builds its config objects here first, so a bad
    binding or value fails at once, naming it, before anything is launched."""
    from experiments import gin_config, pipeline
    from models import registry
    from train import data, trainer

    try:
        for point in points:
            gin_config.parse(sweep.base, [*sweep.bindings, *extra_bindings, *point.bindings()],
                             finalize=False)
            # Building the configs checks the values too (a window below 1, a bad preset).
            registry.lookup(pipeline.experiment())[0]()
            data.DataConfig()
            trainer.TrainConfig()
    finally:
        gin.clear_config()


def point_status(workdir: pathlib.Path) -> str:
    """'finished', 'partial' (started: it resumes from its checkpoints, if any) or 'new'."""
    summary = workdir / SUMMARY_FILE
    if summary.is_file() and json.loads(summary.read_text()).get("finished"):
        return "finished"
    return "partial" if workdir.exists() else "new"


def launch_command(sweep: Sweep, point: Point, workdir: pathlib.Path,
                   extra_bindings: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "experiments.launch", f"--workdir={workdir}",
            *[f"--gin_file={f}" for f in sweep.base],
            *[f"--gin_bindings={b}" for b in (*sweep.bindings, *extra_bindings,
                                               *point.bindings())]]


class _Children:
    """The running launches, so that a stopped sweep can stop them too."""

    def __init__(self):
        self._lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()

    def run(self, cmd: list[str], log_path: pathlib.Path, env: dict[str, str]) -> int:
        with open(log_path, "a") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            with self._lock:
                self.procs.add(proc)
            try:
                return proc.wait()
            finally:
                with self._lock:
                    self.procs.discard(proc)

    def terminate(self) -> None:
        # SIGTERM: each launch saves a checkpoint and exits, so a re-run resumes it.
        with self._lock:
            for proc in self.procs:
                proc.terminate()


def run_sweep(sweep: Sweep, workdir: str | os.PathLike, *, parallel: int = 1,
              extra_bindings: Sequence[str] = (), on_event: Callable[[str], None] = print,
              children: _Children | None = None) -> list[dict[str, Any]]:
    """Runs the points not yet finished (at most `parallel` at a time), then writes the
    results (see `write_results`) and returns their rows. A point whose launch fails gets
    status 'failed' (its launch.log says why), one stopped by SIGTERM 'stopped'; the others
    still run."""
    if parallel < 1:
        raise ValueError(f"parallel={parallel} must be >= 1")
    workdir = pathlib.Path(workdir).absolute()
    points = expand(sweep)
    check_points(sweep, points, extra_bindings)
    (workdir / POINTS_SUBDIR).mkdir(parents=True, exist_ok=True)
    (workdir / "sweep.json").write_text(json.dumps(
        {**dataclasses.asdict(sweep), "extra_bindings": list(extra_bindings),
         "points": [p.name for p in points]}, indent=1, default=repr))
    env = {**os.environ}
    # Points that share shapes share compiled programs across processes.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(workdir / "jax_cache"))
    children = children or _Children()
    status = {p.name: point_status(workdir / POINTS_SUBDIR / p.name) for p in points}
    todo = [p for p in points if status[p.name] != "finished"]
    on_event(f"sweep: {len(points)} points, {len(points) - len(todo)} finished, "
             f"{sum(status[p.name] == 'partial' for p in todo)} to resume, "
             f"{sum(status[p.name] == 'new' for p in todo)} new; running {parallel} at a time")

    def run_point(point: Point) -> None:
        pdir = workdir / POINTS_SUBDIR / point.name
        pdir.mkdir(parents=True, exist_ok=True)
        (pdir / "point.json").write_text(json.dumps(point.values, indent=1))
        verb = "resuming" if status[point.name] == "partial" else "starting"
        on_event(f"{verb} {point.name}")
        code = children.run(launch_command(sweep, point, pdir, extra_bindings),
                            pdir / "launch.log", env)
        # 143: the launch was stopped by SIGTERM and saved a checkpoint (a re-run resumes).
        status[point.name] = (point_status(pdir) if code == 0 else
                              "stopped" if code == 143 else "failed")
        on_event(f"{status[point.name]} {point.name}" + (
            f" (exit {code}; see {pdir / 'launch.log'})" if code else ""))

    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        for future in [pool.submit(run_point, p) for p in todo]:
            future.result()
    rows = collect(sweep, points, workdir, status)
    write_results(sweep, rows, workdir)
    return rows


def collect(sweep: Sweep, points: Sequence[Point], workdir: pathlib.Path,
            status: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per point: its axis values, its metrics (None where missing), its status."""
    rows = []
    for point in points:
        pdir = workdir / POINTS_SUBDIR / point.name
        summary = {}
        if (pdir / SUMMARY_FILE).is_file():
            summary = json.loads((pdir / SUMMARY_FILE).read_text())
        state = (status or {}).get(point.name) or point_status(pdir)
        rows.append({**point.values, **{m: summary.get(m) for m in sweep.metrics},
                     "status": state, "point": point.name})
    return rows


def failed_points(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [r["point"] for r in rows if r["status"] != "finished"]

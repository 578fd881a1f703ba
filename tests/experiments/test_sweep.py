"""experiments/sweep.py and sweep_runner.py: sweep files expand into the right points (product
and zip) and refuse bad ones at once; a tiny 2 x 2 sweep runs end to end as separate launches,
is killed mid-way, and a re-run skips the finished points, resumes the interrupted one from its
checkpoint and writes the table, CSV and plots."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import sweep_runner
from tests.experiments import tiny_corpus

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name", sweep_runner.shipped_sweeps())
def test_shipped_sweeps_expand_and_check(name):
    sweep = sweep_runner.load_sweep(name)
    points = sweep_runner.expand(sweep)
    sweep_runner.check_points(sweep, points, [])
    sizes = [len(next(iter(axis.values()))) for axis in sweep.axes]
    assert len(points) == len(set(p.name for p in points)) == sizes[0] * sizes[1]


def test_axes_zip_within_and_multiply_across(tmp_path):
    sweep = sweep_runner.Sweep(base=["baseline_tiny.gin"], axes=[
        {"TrainConfig.lr": [0.1, 0.2], "TrainConfig.warmup_steps": [1, 2]},
        {"TransformerConfig.d_model": [32, 64, 128]}], metrics=["eval_loss"])
    points = sweep_runner.expand(sweep)
    assert [tuple(p.values.values()) for p in points[:4]] == [
        (0.1, 1, 32), (0.1, 1, 64), (0.1, 1, 128), (0.2, 2, 32)]
    assert points[0].name == "lr=0.1,warmup_steps=1,d_model=32"
    assert points[0].bindings()[0] == "TrainConfig.lr = 0.1"
    with pytest.raises(ValueError, match=r"as many values.*'TrainConfig.warmup_steps': 3"):
        sweep_runner.Sweep(base=["x.gin"], axes=[{"TrainConfig.lr": [1, 2],
                                                  "TrainConfig.warmup_steps": [1, 2, 3]}])
    with pytest.raises(ValueError, match=r"\['eval_los'\] unknown; valid"):
        sweep_runner.Sweep(base=["x.gin"], axes=[{"TrainConfig.lr": [1]}],
                           metrics=["eval_los"])
    bad = sweep_runner.Sweep(base=["baseline_tiny.gin"], axes=[{"TrainConfig.stpes": [1]}])
    with pytest.raises(ValueError, match="stpes"):
        sweep_runner.check_points(bad, sweep_runner.expand(bad), [])
    bad_value = sweep_runner.Sweep(base=["baseline_tiny.gin"],
                                   axes=[{"TrainConfig.schedule": ["cosin"]}])
    with pytest.raises(ValueError, match="cosin"):
        sweep_runner.check_points(bad_value, sweep_runner.expand(bad_value), [])
    with pytest.raises(ValueError, match=r"nope\.gin.*lr_by_width\.gin"):
        sweep_runner.load_sweep("nope.gin")


def _committed_steps(point_dir):
    ckpt = point_dir / "checkpoints"
    return [d for d in os.listdir(ckpt) if d.isdigit()] if ckpt.is_dir() else []


def test_tiny_sweep_killed_then_resumed(tmp_path, tmp_path_factory):
    data_dir = tiny_corpus.build(tmp_path / "data")
    sweep_file = tmp_path / "tiny.gin"
    sweep_file.write_text(
        'Sweep.base = ["baseline_tiny.gin"]\n'
        'Sweep.axes = [{"TrainConfig.seed": [0, 1]}, {"DataConfig.seed": [0]}]\n'
        'Sweep.metrics = ["eval_loss", "train_loss", "start_step"]\n')
    workdir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "experiments.sweep", f"--sweep={sweep_file}",
           f"--workdir={workdir}",
           *[f"--gin_bindings={b}"
             for b in tiny_corpus.tiny_bindings(data_dir, steps=4, checkpoint_every=2)]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": tiny_corpus.compile_cache(tmp_path_factory)}
    first = subprocess.Popen([*cmd, "--parallel=1"], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    points = workdir / "points"
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and first.poll() is None and time.monotonic() < deadline:
        dirs = [points / d for d in os.listdir(points)] if points.is_dir() else []
        done = [d for d in dirs if sweep_runner.point_status(d) == "finished"]
        started = [d for d in dirs if d not in done and _committed_steps(d)]
        if done and started:
            os.killpg(first.pid, signal.SIGKILL)   # the sweep and its running launch
            killed = started[0]
        time.sleep(0.05)
    out = first.communicate()[0].decode()
    assert killed is not None, f"no point was caught mid-run:\n{out[-3000:]}"
    finished_before = [d.name for d in points.iterdir()
                       if sweep_runner.point_status(d) == "finished"]

    second = subprocess.run([*cmd, "--parallel=2"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"{len(finished_before)} finished, 1 to resume" in second.stdout
    with open(workdir / "results.csv") as f:
        rows = {r["point"]: r for r in csv.DictReader(f)}
    # Two points (the product over a one-value axis): one finished, one killed mid-run;
    # each launch costs seconds of imports and compilation.
    assert len(rows) == 2 and {r["status"] for r in rows.values()} == {"finished"}
    assert int(rows[killed.name]["start_step"]) >= 1           # resumed, not restarted
    for name in finished_before:                                 # skipped, not relaunched
        assert (points / name / "launch.log").read_text().count("gin files:") == 1
    summaries = {n: json.loads((points / n / "summary.json").read_text()) for n in rows}
    assert all(s["step"] == 4 for s in summaries.values())
    table = (workdir / "results.md").read_text().splitlines()
    assert table[0] == ("| TrainConfig.seed | DataConfig.seed | eval_loss | train_loss | "
                        "start_step | status |")
    assert len(table) == 4 and table[2].startswith("| 0 | 0 | ")
    assert float(table[2].split("|")[3]) == pytest.approx(
        summaries["TrainConfig.seed=0,DataConfig.seed=0"]["eval_loss"], rel=1e-3)
    plots = sorted(p.name for p in workdir.glob("plot_*.png"))
    assert len(plots) == 6 and "plot_eval_loss_vs_TrainConfig.seed.png" in plots


def test_clis_list_what_ships_and_fail_in_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, text=True,
                              capture_output=True, timeout=60,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})

    assert "baseline_tiny.gin" in run("experiments.launch", "--help").stdout
    assert "mswa_windows.gin" in run("experiments.sweep", "--help").stdout
    bad = run("experiments.sweep", "--sweep=nope.gin", f"--workdir={tmp_path}")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"sweep: error: sweep file 'nope.gin' not found; shipped sweeps: "
        f"{sweep_runner.shipped_sweeps()} (--verbose for the traceback)"]
    assert "Traceback" in run("experiments.sweep", "--sweep=nope.gin", f"--workdir={tmp_path}",
                              "--verbose").stderr

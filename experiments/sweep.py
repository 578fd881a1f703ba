"""Run a gin sweep: every point its own training launch, then a results table and plots.

    python -m experiments.sweep --sweep=experiments/sweeps/lr_by_width.gin --workdir=DIR \
        [--parallel=2] [--gin_bindings='TrainConfig.steps = 50'] [--report_only]

Re-running the same command skips finished points and resumes interrupted ones from their
checkpoints. Results: DIR/results.csv, DIR/results.md, DIR/plot_METRIC_vs_AXIS.png; each
point's workdir and launch.log are under DIR/points/. The sweep file format and the work live
in experiments/sweep_runner.py (importable); the flags live only here.
"""
import signal
import sys

from absl import app, flags

from experiments import sweep_runner
from experiments.cli_errors import USER_ERRORS, one_line_error

SWEEP = flags.DEFINE_string(
    "sweep", None, "A sweep file, or the name of a shipped one: "
    f"{', '.join(sweep_runner.shipped_sweeps())}.", required=True)
WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory (points, results).",
                              required=True)
PARALLEL = flags.DEFINE_integer("parallel", 1, "Points run at the same time.")
BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings for every point, "
                                     "after the sweep file's (e.g. fewer steps for a try).")
REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild the table and plots from "
                                "the points' summaries; launch nothing.")
VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks of errors.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    children = sweep_runner._Children()

    def stop(signum, frame):
        del frame
        print(f"sweep: signal {signum}; stopping the running points (they save a "
              "checkpoint; re-run to resume)", flush=True)
        children.terminate()

    signal.signal(signal.SIGTERM, stop)
    try:
        sweep = sweep_runner.load_sweep(SWEEP.value)
        if REPORT_ONLY.value:
            import pathlib
            workdir = pathlib.Path(WORKDIR.value).absolute()
            rows = sweep_runner.collect(sweep, sweep_runner.expand(sweep), workdir)
            sweep_runner.write_results(sweep, rows, workdir)
        else:
            rows = sweep_runner.run_sweep(
                sweep, WORKDIR.value, parallel=PARALLEL.value, extra_bindings=BINDINGS.value,
                on_event=lambda line: print(line, flush=True), children=children)
    except USER_ERRORS as err:
        raise SystemExit(one_line_error(err, VERBOSE.value, "sweep")) from None
    with open(f"{WORKDIR.value}/results.md") as f:
        print(f.read(), end="")
    missing = sweep_runner.failed_points(rows)
    if missing:
        print(f"sweep: {len(missing)} point(s) not finished: {missing}", file=sys.stderr)
        raise SystemExit(1)
    print(f"results: {WORKDIR.value}/results.csv, results.md and plot_*.png")


if __name__ == "__main__":
    app.run(main)

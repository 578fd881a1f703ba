"""Launch a training run from gin configs: the only place with flags.

    python -m experiments.launch --gin_file=experiments/configs/quickstart.gin \
        [--gin_file=...] [--gin_bindings='TrainConfig.steps = 100'] --workdir=DIR [--demo]

Later --gin_file and --gin_bindings override earlier ones; a shipped config can be named
without its directory (--gin_file=quickstart.gin). The run says which files and bindings it
uses at the start, writes the operative config to DIR/config.gin and a summary (steps, losses,
eval metrics) to DIR/summary.json at the end (what experiments/sweep.py collects). --demo
also prints a greedy continuation of a code prompt decoded from the saved checkpoint, then a
chat answer from the packaged real model (SmolLM2-135M-Instruct) through the same loop.

Several processes (hosts) train one data-parallel run when jax.distributed is initialised:
--coordinator_address=HOST:PORT --num_processes=N --process_id=I on each, or
--distributed=on where jax finds them itself (TPU pod slices, SLURM); see docs/multihost.md.
Only process 0 prints, logs and writes event files; every process takes part in saving the
orbax checkpoints, as orbax requires.

Errors from bad flags, configs or workdirs are one line; --verbose shows the traceback.
"""
import json
import logging
import os
import pathlib
import time

from absl import app, flags

from experiments.cli_errors import USER_ERRORS, one_line_error

_CONFIG_DIR = pathlib.Path(__file__).parent / "configs"
_SHIPPED = ", ".join(sorted(p.name for p in _CONFIG_DIR.glob("*.gin")))

FLAGS = flags.DEFINE_multi_string(
    "gin_file", [], f"Gin config files, applied in order. Shipped configs (name them without "
    f"a directory): {_SHIPPED}.")
BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after files.")
WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and event files go.",
                              required=True)
DEMO = flags.DEFINE_bool("demo", False, "Print a greedy continuation after training, then a "
                         "real model's chat answer.")
PROMPT = flags.DEFINE_string("prompt", None, "Prompt for --demo (default: a code prompt).")
VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks of errors.")
DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Initialise jax.distributed for a multi-process run. auto: when --coordinator_address is "
    "given or a SLURM job has several tasks; on: always (jax detects TPU pod slices, SLURM "
    "and other clusters itself); off: never.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                  "HOST:PORT of process 0, reachable from every process.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")

SUMMARY_FILE = "summary.json"
OPERATIVE_CONFIG_FILE = "config.gin"


def _wants_distributed() -> bool:
    if DISTRIBUTED.value != "auto":
        return DISTRIBUTED.value == "on"
    if COORDINATOR.value or NUM_PROCESSES.value:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1


def init_distributed() -> None:
    """jax.distributed.initialize from the flags (unset ones are detected by jax). Must run
    before anything touches a jax backend."""
    import jax

    if not _wants_distributed():
        return
    # CPU processes exchange collectives over gloo (localhost tests, CPU clusters); the
    # setting only concerns the CPU backend, so GPU and TPU runs are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=COORDINATOR.value,
                               num_processes=NUM_PROCESSES.value,
                               process_id=PROCESS_ID.value)


def write_summary(workdir: str, summary: dict, steps: int, seconds: float) -> dict:
    """Writes DIR/summary.json (atomically: a sweep reads it to tell finished runs) and
    returns it."""
    ev = summary.get("eval", {})
    out = {"model": summary["model_name"], "step": summary["step"], "steps": steps,
           # Finished: ran to the end (all steps, or the data ran out), not stopped by SIGTERM.
           "finished": not summary["preempted"],
           "preempted": summary["preempted"], "start_step": summary["start_step"],
           "num_params": summary["num_params"], "seconds": seconds,
           "train_loss": summary["losses"][-1] if summary["losses"] else None,
           "losses": summary["losses"], **{f"eval_{k}": v for k, v in ev.items()}}
    path = os.path.join(workdir, SUMMARY_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    return out


def _run(main_process: bool) -> None:
    from experiments import gin_config, pipeline  # after flag parsing: keeps --help fast

    files = [gin_config.resolve_config_file(f) for f in FLAGS.value]
    gin_config.parse(files, BINDINGS.value)
    if main_process:
        print(gin_config.describe(files, BINDINGS.value), flush=True)
    import gin

    from train import trainer

    steps = trainer.TrainConfig().steps
    os.makedirs(WORKDIR.value, exist_ok=True)
    if main_process:
        with open(os.path.join(WORKDIR.value, OPERATIVE_CONFIG_FILE), "w") as f:
            f.write(gin.config_str())
    start = time.perf_counter()
    summary = pipeline.run(WORKDIR.value, progress=main_process)
    if not main_process:
        return
    out = write_summary(WORKDIR.value, summary, steps, time.perf_counter() - start)
    if summary["preempted"]:
        # SIGTERM: train() saved a checkpoint; rerunning the same command resumes from it.
        print(f"stopped by SIGTERM at step {summary['step']}; checkpoint saved in "
              f"{WORKDIR.value}")
        raise SystemExit(143)
    print(json.dumps({"workdir": WORKDIR.value,
                      **{k: v for k, v in out.items() if k != "losses"}}))
    ev = summary.get("eval", {})
    if "bits_per_byte" in ev:
        print(f"validation bits per byte: {ev['bits_per_byte']:.3f} (step {summary['step']})")
    if DEMO.value:
        _demo()


def _demo() -> None:
    from experiments import pipeline

    prompt = PROMPT.value or pipeline.DEFAULT_PROMPT
    text = pipeline.greedy_continuation(WORKDIR.value, prompt)
    print("greedy continuation from the checkpoint:\n" + "-" * 60)
    print(prompt + text)
    print("-" * 60)
    print(f"a real pretrained model, {pipeline.DEMO_QUESTION!r} through the same loop "
          "(SmolLM2-135M-Instruct, chat template, greedy):\n" + "-" * 60, flush=True)
    _, stats = pipeline.real_model_chat(on_text=lambda d: print(d, end="", flush=True))
    rate = stats["decode_tokens_per_second"]
    print("\n" + "-" * 60)
    print(f"{stats['new_tokens'][0]} tokens in {stats['seconds_incl_compile']:.1f} s "
          "including compilation; "
          + (f"{rate:.1f} tokens/s once compiled" if rate else "too short to time"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        init_distributed()
        import jax

        main_process = jax.process_index() == 0
        logging.basicConfig(level=logging.INFO if main_process else logging.ERROR,
                            format="%(levelname)s %(name)s: %(message)s")
        # orbax reports every save and restore at INFO through absl; keep the console readable.
        logging.getLogger("absl").setLevel(logging.WARNING)
        _run(main_process)
    except USER_ERRORS as err:
        raise SystemExit(one_line_error(err, VERBOSE.value, "launch")) from None


if __name__ == "__main__":
    app.run(main)

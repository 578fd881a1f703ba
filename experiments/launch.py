"""Launch a training run from gin configs: the only place with flags.

    python -m experiments.launch --gin_file=experiments/configs/quickstart.gin \
        [--gin_file=...] [--gin_bindings='TrainConfig.steps = 100'] --workdir=DIR [--demo]

Later --gin_file and --gin_bindings override earlier ones. --demo also prints a greedy
continuation of a code prompt decoded from the saved checkpoint, then a chat answer from the
packaged real model (SmolLM2-135M-Instruct) decoded through the same loop, with its tokens/s.
"""
import json
import logging

from absl import app, flags

FLAGS = flags.DEFINE_multi_string("gin_file", [], "Gin config files, applied in order.")
BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after files.")
WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and event files go.",
                              required=True)
DEMO = flags.DEFINE_bool("demo", False, "Print a greedy continuation after training, then a "
                         "real model's chat answer.")
PROMPT = flags.DEFINE_string("prompt", None, "Prompt for --demo (default: a code prompt).")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # orbax reports every save and restore at INFO through absl; keep the console readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from experiments import gin_config, pipeline  # after flag parsing: keeps --help fast

    gin_config.parse(FLAGS.value, BINDINGS.value)
    summary = pipeline.run(WORKDIR.value)
    if summary["preempted"]:
        # SIGTERM: train() saved a checkpoint; rerunning the same command resumes from it.
        print(f"stopped by SIGTERM at step {summary['step']}; checkpoint saved in "
              f"{WORKDIR.value}")
        raise SystemExit(143)
    ev = summary.get("eval", {})
    print(json.dumps({"workdir": WORKDIR.value, "model": summary["model_name"],
                      "step": summary["step"], "num_params": summary["num_params"],
                      **{f"eval_{k}": v for k, v in ev.items()}}))
    if "bits_per_byte" in ev:
        print(f"validation bits per byte: {ev['bits_per_byte']:.3f} (step {summary['step']})")
    if DEMO.value:
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


if __name__ == "__main__":
    app.run(main)

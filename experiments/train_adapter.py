"""Train Kangaroo's early-exit adapter (arXiv 2404.18911) for a trained target or an imported
real one: the only place with flags; the work is train.adapter_distill (distill_workdir,
distill_target).

    python -m experiments.train_adapter --target_workdir=DIR [--exit_layer=2] [--steps=300] \
        [--lr=3e-3] [--out_dir=DIR/adapter_l2]
    python -m experiments.train_adapter --pretrained=smollm2 | --gguf=FILE --out_dir=DIR \
        [--exit_layer=8] [--steps=60] [--seq_len=128]

A real target trains on the embedded corpus tokenized with its own tokenizer.

Prints the distillation loss as it trains, then one JSON line with held-out soft cross-entropy,
KL, prob_acc (Kangaroo's expected one-step acceptance) and top-1 agreement of the plain early
exit (before) and of the trained adapter (after). Decode with it:

    python -m experiments.generate --workdir=DIR --sampler=self_spec_greedy \
        --adapter_dir=DIR/adapter_l2 --gin_bindings='SelfSpecConfig.exit_layer = 2'
"""
import json
import os

from absl import app, flags

TARGET = flags.DEFINE_string("target_workdir", None, "Workdir of the trained target.")
PRETRAINED = flags.DEFINE_string("pretrained", None, "A packaged real target (e.g. smollm2).")
GGUF = flags.DEFINE_string("gguf", None, "A real target's GGUF file.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per row (real targets).")
OUT = flags.DEFINE_string("out_dir", None, "Where to save the adapter (default: "
                          "<target_workdir>/adapter_l<exit_layer>).")
EXIT_LAYER = flags.DEFINE_integer("exit_layer", 2, "Target blocks the draft runs.")
STEPS = flags.DEFINE_integer("steps", 300, "Training steps (batches of 8 x 256 tokens).")
LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate (AdamW, cosine schedule).")
SEED = flags.DEFINE_integer("seed", 0, "Data order and adapter initialisation.")


def main(argv):
    del argv
    from train import adapter_distill

    config = adapter_distill.AdapterTrainConfig(exit_layer=EXIT_LAYER.value,
                                                steps=STEPS.value, lr=LR.value,
                                                seed=SEED.value)
    given = {k: v.value for k, v in (("target_workdir", TARGET), ("pretrained", PRETRAINED),
                                     ("gguf", GGUF)) if v.value}
    if len(given) != 1:
        raise app.UsageError(f"give exactly one of --target_workdir, --pretrained or --gguf; "
                             f"got {given or 'none'}")
    log = lambda m: print(json.dumps(m), flush=True)  # noqa: E731
    if TARGET.value:
        out_dir = OUT.value or os.path.join(TARGET.value, f"adapter_l{EXIT_LAYER.value}")
        summary = adapter_distill.distill_workdir(TARGET.value, out_dir, config, log=log)
    else:
        if not OUT.value:
            raise app.UsageError("a real target needs --out_dir")
        from experiments.pretrained import load_pretrained

        pre = load_pretrained(name=PRETRAINED.value, gguf=GGUF.value)
        out_dir = OUT.value
        data_config = adapter_distill.pretrained_data_config(pre.source, config,
                                                             seq_len=SEQ_LEN.value)
        summary = adapter_distill.distill_target(pre.model, out_dir, config,
                                                 data_config=data_config, eval_batches=4,
                                                 log=log)
    print(json.dumps({**given, "out_dir": out_dir, **summary}))


if __name__ == "__main__":
    app.run(main)

"""Distil a draft model for a real target (speculative decoding; arXiv 2211.17192): the only
place with flags; the work is train.draft_distill.

    python -m experiments.train_draft --workdir=DIR [--target=smollm2 | --gguf=FILE] \
        [--keep_layers=0,10,20,29] [--steps=300] [--max_new_steps=N] [--lr=1e-3] \
        [--head_steps=60]

Resumable: each call continues from DIR's newest checkpoint and runs at most --max_new_steps
more (so a long run can be split into short jobs). When the run reaches --steps it prints one
JSON line with held-out KL, top-1 agreement and prob_acc of the layer-dropped draft before
training and after, and writes DIR/draft.gguf (the target's vocabulary and chat template) so
HF assisted generation and `--draft_gguf` can use the same weights; --head_steps then trains
SpecDec++'s acceptance head on it (DIR/acceptance_head). Decode with it:

    python -m experiments.generate --model=smollm2 --sampler=speculative_greedy \
        --draft_workdir=DIR --chat --prompt='...'
"""
import json
import os

from absl import app, flags

WORKDIR = flags.DEFINE_string("workdir", None, "Where the draft's checkpoints go.",
                              required=True)
TARGET = flags.DEFINE_string("target", "smollm2", "Packaged target model by short name.")
GGUF = flags.DEFINE_string("gguf", None, "A target GGUF file (instead of --target).")
KEEP = flags.DEFINE_string("keep_layers", "0,10,20,29", "Target blocks the draft starts from.")
STEPS = flags.DEFINE_integer("steps", 300, "Total training steps of the run.")
MAX_NEW = flags.DEFINE_integer("max_new_steps", None, "At most this many steps this call.")
LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate (AdamW, cosine schedule).")
SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per row.")
BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
CHAT_EVERY = flags.DEFINE_integer("chat_every", 4, "Every n-th batch is chat-formatted "
                                  "(0: never).")
EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 4, "Held-out batches for before/after.")
SEED = flags.DEFINE_integer("seed", 0, "Data order.")
HEAD_STEPS = flags.DEFINE_integer("head_steps", 0, "Then train SpecDec++'s acceptance head "
                                  "(DIR/acceptance_head) for this many steps (0: none).")


def main(argv):
    del argv
    from train import draft_distill

    config = draft_distill.DraftTrainConfig(
        keep_layers=tuple(int(x) for x in KEEP.value.split(",")), steps=STEPS.value,
        lr=LR.value, seq_len=SEQ_LEN.value, batch_size=BATCH.value,
        chat_every=CHAT_EVERY.value, seed=SEED.value)
    from experiments.pretrained import load_pretrained

    pre = load_pretrained(name=None if GGUF.value else TARGET.value, gguf=GGUF.value)
    summary = draft_distill.run(WORKDIR.value, config, pre.model, pre.tokenizer,
                                target_gguf=pre.source, max_new_steps=MAX_NEW.value,
                                eval_batches=EVAL_BATCHES.value,
                                log=lambda m: print(json.dumps(m), flush=True))
    if HEAD_STEPS.value and summary.get("steps_done", 0) >= config.steps:
        summary["acceptance_head"] = draft_distill.add_acceptance_head(
            WORKDIR.value, pre.model, pre.source, steps=HEAD_STEPS.value,
            seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed,
            log=lambda m: print(json.dumps(m), flush=True))
    print(json.dumps({"workdir": os.path.abspath(WORKDIR.value), **summary}))


if __name__ == "__main__":
    app.run(main)

"""Export a checkpoint trained here as a GGUF file that llama.cpp runs: the only place with
flags; the work is models.convert_gguf.save_gguf and train.gguf_vocab.gguf_vocab.

    python -m experiments.export_gguf --workdir=DIR --output=model.gguf [--dtype=f16] \
        [--tokenizer=byte | --spm_model=data/spm/stdlib4096.model] [--step=N]

Prints one JSON line: the file, its size and the model's shape. Llama-style Transformers only
(no attention windows: llama.cpp's llama architecture has full causal attention).
"""
import json
import os

from absl import app, flags

WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the checkpoint.", required=True)
OUTPUT = flags.DEFINE_string("output", None, "The .gguf file to write.", required=True)
DTYPE = flags.DEFINE_enum("dtype", "f32", ["f32", "f16"], "Weight type of 2-D tensors.")
SPM = flags.DEFINE_string("spm_model", None, "The SentencePiece model the checkpoint was "
                          "trained with (default: the byte tokenizer).")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")


def export(workdir: str, output: str, *, dtype: str = "f32", spm_model: str | None = None,
           step: int | None = None) -> dict:
    """Writes the workdir's model with its tokenizer's vocabulary; returns a summary."""
    from models import convert_gguf
    from train.checkpoint import restore_model
    from train.gguf_vocab import gguf_vocab
    from train.tokenizer import make_tokenizer

    tokenizer = (make_tokenizer("sentencepiece", model_path=spm_model) if spm_model
                 else make_tokenizer("byte"))
    model, name, _ = restore_model(workdir, step)
    vocab = gguf_vocab(tokenizer, model.config.vocab_size)
    convert_gguf.save_gguf(model, output, dtype=dtype, vocab=vocab,
                           name=f"swiftlm-{name}-{os.path.basename(os.path.normpath(workdir))}")
    return {"workdir": workdir, "output": output, "dtype": dtype, "model": name,
            "tokenizer": repr(tokenizer), "bytes": os.path.getsize(output),
            "num_params": model.num_params()}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        summary = export(WORKDIR.value, OUTPUT.value, dtype=DTYPE.value, spm_model=SPM.value,
                         step=STEP.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)

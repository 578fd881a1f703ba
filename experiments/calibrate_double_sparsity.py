"""Offline channel calibration for Double Sparsity decode attention (arXiv 2408.07092).

    python -m experiments.calibrate_double_sparsity --workdir=DIR        # a trained checkpoint
    python -m experiments.calibrate_double_sparsity --pretrained=smollm2  # a packaged model

Runs calibration text from the embedded corpus (the *train* split of the standard library's
.py files, so held-out evaluation on the validation split stays unseen) through the model and
ranks, per layer and KV head, the channels by mean |q * k| after RoPE
(models/double_sparse_calibration.py). The ranking is written, with the model's architecture
hash, to DIR/double_sparse_channels.json for a workdir, or to
$SWIFTLM_DATA_DIR/double_sparsity/<name>-<hash>.json for a packaged model (`default_path`),
where `with_double_sparse` and the benchmarks find it. `decoding_model` applies it for
`python -m experiments.generate --decode_attention=double_sparse`.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
from absl import app, flags

from models import double_sparse_calibration as dsc
from train import corpus

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags, defined only when run as a program: importing `run` (tests, notebooks)
    must not claim flag names such as --workdir that other CLIs define too."""
    flags.DEFINE_string("workdir", None, "Workdir of a trained checkpoint to calibrate.")
    flags.DEFINE_string("pretrained", None, "Packaged pretrained model to calibrate (smollm2).")
    flags.DEFINE_integer("num_rows", 16, "Calibration sequences.")
    flags.DEFINE_integer("seq_len", 512, "Tokens per calibration sequence.")
    flags.DEFINE_string("out", None, "Output file (default: see the module docstring).")


def default_path(name: str, config) -> str:
    """Where a packaged model's calibration lives: keyed by its name and architecture hash."""
    return os.path.join(corpus.default_data_dir(), "double_sparsity",
                        f"{name}-{dsc.architecture_hash(config)}.json")


def corpus_rows(encode, num_rows: int, seq_len: int, split: str = "train",
                skip_tokens: int = 0) -> np.ndarray:
    """[num_rows, seq_len] token ids: the corpus' `split` files (sorted by path) encoded and
    concatenated, after skipping the first skip_tokens."""
    root = corpus.stdlib_root()
    need = num_rows * seq_len + skip_tokens
    ids: list[int] = []
    for rel in corpus.list_stdlib_files(root):
        if corpus.split_of(rel) != split:
            continue
        ids.extend(encode(corpus.read_source(root / rel)))
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the corpus' {split} split has {len(ids)} tokens; need {need}")
    return np.asarray(ids[skip_tokens:need], np.int32).reshape(num_rows, seq_len)


def load_model(workdir: str | None, pretrained: str | None):
    """(model, encode, output path, source) for exactly one of workdir / pretrained."""
    if bool(workdir) == bool(pretrained):
        raise ValueError(f"give exactly one of --workdir or --pretrained; got workdir={workdir!r}"
                         f", pretrained={pretrained!r}")
    if workdir:
        from train.checkpoint import restore_model
        from train.tokenizer import make_tokenizer
        model, name, _ = restore_model(workdir)
        return model, make_tokenizer("byte").encode, dsc.calibration_path(workdir), workdir
    from experiments.pretrained import load_pretrained
    pre = load_pretrained(name=pretrained)
    return pre.model, pre.tokenizer.encode, default_path(pretrained, pre.model.config), pre.source


def run(workdir: str | None = None, pretrained: str | None = None, *, num_rows: int = 16,
        seq_len: int = 512, out: str | None = None, model=None, encode=None) -> str:
    """Calibrates and writes the file; returns its path. model/encode: skip loading (tests)."""
    source = "given model"
    if model is None:
        model, encode, path, source = load_model(workdir, pretrained)
    else:
        path = None
    path = out or path
    if path is None:
        raise ValueError("give out= when passing a model directly")
    rows = corpus_rows(encode, num_rows, seq_len)
    ranking = dsc.calibrate(model, rows)
    return dsc.save_calibration(path, model, ranking, source=source, num_tokens=rows.size)


def decoding_model(model, decode_attention: str = "dense", calibration: str | None = None, *,
                   workdir: str | None = None, pretrained: str | None = None,
                   token_sparsity: float | None = None, dense_layers: int | None = None,
                   selection: str | None = None, label_channels: int | None = None,
                   label_bits: int | None = None):
    """`model` set up for `decode_attention` (experiments.generate --decode_attention): itself
    for "dense"; for "double_sparse" a double-sparse copy with the channels of `calibration`
    (a file or a workdir), by default the file this CLI writes for `workdir` or the packaged
    model `pretrained`. token_sparsity / dense_layers / selection / label_channels /
    label_bits: the config's ds_* fields (None keeps the config's default: 1/16, 2 dense
    layers, "kv_group", r = D/16, 16-bit labels). A missing or foreign calibration is a
    ValueError saying what to run."""
    from models.core import double_sparse
    double_sparse.check_decode_attention(decode_attention)
    settings = {k: v for k, v in (("ds_token_sparsity", token_sparsity),
                                  ("ds_dense_layers", dense_layers),
                                  ("ds_selection", selection),
                                  ("ds_label_channels", label_channels),
                                  ("ds_label_bits", label_bits)) if v is not None}
    if decode_attention == "dense":
        given = {**settings, **({"ds_calibration": calibration} if calibration else {})}
        if given:
            raise ValueError(f"{sorted(given)} apply only with decode_attention="
                             f"'double_sparse'; got decode_attention='dense'")
        return model
    if calibration is None:
        if workdir:
            calibration = dsc.calibration_path(workdir)
        elif pretrained:
            calibration = default_path(pretrained, model.config)
        else:
            raise ValueError("decode_attention='double_sparse' on a --gguf/--hf_dir model needs "
                             "--ds_calibration=FILE; " + double_sparse.CALIBRATE_HINT)
    return dsc.with_double_sparse(model, calibration, **settings)


def main(argv: Sequence[str]) -> None:
    del argv
    try:
        path = run(FLAGS.workdir, FLAGS.pretrained, num_rows=FLAGS.num_rows,
                   seq_len=FLAGS.seq_len, out=FLAGS.out)
    except ValueError as e:  # one line naming the problem, like the other CLIs
        sys.exit(f"error: {e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""Text datasets by name, and the grain pipeline that turns them into packed LM batches.

Datasets are tfds datasets in ArrayRecord format, read by name through train/text_source.py and
grain, so TensorFlow is never imported. "python_stdlib" (train/corpus.py) is built on first
use; any other tfds text dataset works by name once prepared in the data dir, e.g.
`tfds build lm1b --file_format=array_record --data_dir=data`.

A training batch is a dict of int32 numpy arrays, all [batch_size, seq_len]:

    inputs       token ids fed to the model (pad_id on padding)
    targets      the next token of the same document (never one from another document)
    segment_ids  1, 2, 3, ... per document piece within a row, 0 on padding
    positions    position within its document piece, restarting at 0 at each piece
    loss_mask    1 where a target should be scored, 0 on padding

Each document becomes BOS + tokens + EOS, and the (input, target) pairs are formed *before*
packing: inputs = doc[:-1], targets = doc[1:]. Packing (grain's ConcatThenSplit) then fills rows
back to back; a document longer than what is left of a row continues in the next row as a new
segment with positions from 0 (it cannot attend to its earlier part there anyway). So no
target ever crosses a document boundary, no token is dropped, and loss_mask is 0 only on
padding (the last token of a document, EOS, only ever appears as a target).

Resuming. The iterator is a grain `DatasetIterator`; its state is a small JSON-able dict.
The trainer checkpoints it next to the model with orbax, using grain's handler:

    import grain, orbax.checkpoint as ocp
    it = make_iterator(config)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), data=grain.checkpoint.CheckpointSave(it)))
    ...
    it = make_iterator(config)   # same config
    manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))   # sets `it`'s state in place

(or `iterator_state_to_bytes` / `restore_iterator_state` anywhere bytes can be stored). A
restored iterator yields exactly the batches the uninterrupted one would have yielded.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import gin
import grain
import numpy as np

from train import corpus, synthetic_tasks
from train import block_packing
from train.text_source import known_dataset_names, load_text_source  # noqa: F401 (API)
from train.tokenizer import TOKENIZER_NAMES, Tokenizer, encode_document, make_tokenizer

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
default_data_dir = corpus.default_data_dir


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything that decides which batches a run sees (so the same config resumes exactly).

    num_epochs=None repeats forever. Shuffling permutes documents each epoch (seed-derived,
    different per epoch) and then, since one long file fills many consecutive rows, shuffles
    packed rows within windows of `shuffle_buffer_size` rows (0 turns that off). Keep windows
    large: grain's index_shuffle costs ~65 ms per window (or per epoch of documents) whatever
    its size, i.e. ~30 us/row at 2048 rows but ~1 ms/row at 64.
    """

    dataset: str = corpus.DATASET_NAME
    feature: str = "text"
    split: str = "train"
    eval_split: str = "validation"
    tokenizer: str = "byte"
    tokenizer_path: str | None = None
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    num_epochs: int | None = None
    shuffle: bool = True
    shuffle_buffer_size: int = 2048
    data_dir: str | None = None
    read_threads: int = 2
    prefetch_batches: int = 2
    # Block Transformer (arXiv 2406.02657): pad documents to blocks of this many tokens so no
    # block straddles two documents (train/block_packing.py); 0 = plain packing.
    block_length: int = 0
    block_first_padding: str = "full"

    def __post_init__(self):
        if self.tokenizer not in TOKENIZER_NAMES:
            raise ValueError(f"unknown tokenizer {self.tokenizer!r}; valid names: "
                             f"{list(TOKENIZER_NAMES)}")
        if self.tokenizer == "sentencepiece" and not self.tokenizer_path:
            raise ValueError("DataConfig.tokenizer='sentencepiece' needs tokenizer_path "
                             "(a .model file from `python -m train.tokenizer`)")
        if self.tokenizer == "pretrained" and not self.tokenizer_path:
            raise ValueError("DataConfig.tokenizer='pretrained' needs tokenizer_path (a .gguf "
                             "file, a Hugging Face tokenizer folder, or a packaged model name "
                             "such as 'smollm2')")
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"DataConfig.num_epochs must be None (forever) or >= 1, "
                             f"got {self.num_epochs}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"DataConfig.seed must be in [0, 2**32), got {self.seed}")
        block_packing.check(self.block_length, self.seq_len, self.block_first_padding)


def load_tokenizer(config: DataConfig) -> Tokenizer:
    """The tokenizer `config` names (the trainer takes vocab_size and special ids from it)."""
    if config.tokenizer == "sentencepiece":
        return make_tokenizer("sentencepiece", model_path=config.tokenizer_path)
    if config.tokenizer == "pretrained":
        # A real model's own tokenizer (distilling drafts and adapters for it): its GGUF file,
        # its HF folder, or the short name of a packaged model.
        from models.packaged import PACKAGED, packaged_gguf

        path = config.tokenizer_path
        if path in PACKAGED:
            path = packaged_gguf(path)
        if os.path.isdir(path):
            return make_tokenizer("pretrained", hf_dir=path)
        return make_tokenizer("pretrained", gguf_path=path)
    return make_tokenizer(config.tokenizer)


# ----------------------------------------------------------------------------- sources


# ----------------------------------------------------------------------------- pipeline


@dataclasses.dataclass(frozen=True)
class _ToPairs:
    """Document -> {"inputs": doc[:-1], "targets": doc[1:]} with doc = BOS + tokens + EOS."""
    tokenizer: Tokenizer

    def __call__(self, text: bytes | str) -> dict[str, np.ndarray]:
        ids = encode_document(self.tokenizer, text)
        return {"inputs": ids[:-1], "targets": ids[1:]}


@dataclasses.dataclass(frozen=True)
class _Finalize:
    """Renames grain's packing outputs to the batch contract and pads with pad_id."""
    pad_id: int

    def __call__(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segment_ids = packed["inputs_segment_ids"].astype(np.int32)
        real = segment_ids > 0
        return {
            "inputs": np.where(real, packed["inputs"], self.pad_id).astype(np.int32),
            "targets": np.where(real, packed["targets"], self.pad_id).astype(np.int32),
            "segment_ids": segment_ids,
            "positions": np.where(real, packed["inputs_positions"], 0).astype(np.int32),
            "loss_mask": real.astype(np.int32),
        }


def _packed_rows(config: DataConfig, tokenizer: Tokenizer, split: str, shuffle: bool,
                 num_epochs: int | None) -> grain.IterDataset:
    docs = load_text_source(config.dataset, split, config.feature, config.data_dir)
    if shuffle:
        # Shuffling before repeat gives every epoch its own permutation.
        docs = docs.shuffle(seed=config.seed)
    docs = docs.repeat(num_epochs).map(_ToPairs(tokenizer))
    read = grain.ReadOptions(num_threads=config.read_threads,
                             prefetch_buffer_size=max(4 * config.read_threads, 1))
    if config.block_length:
        return block_packing.packed_rows(
            docs, block_length=config.block_length, first_padding=config.block_first_padding,
            seq_len=config.seq_len, pad_id=tokenizer.pad_id, seed=config.seed, read=read)
    length = {"inputs": config.seq_len, "targets": config.seq_len}
    rows = grain.experimental.ConcatThenSplitIterDataset(
        docs.to_iter_dataset(read), length_struct=length)
    return rows.map(_Finalize(tokenizer.pad_id))


def _restore_tuples(state: Any) -> Any:
    """Undoes what a JSON round trip does to grain 0.2.18's ConcatThenSplit state.

    The packer marks "no remainder" with the tuple (-1, -1) and tests `slice != (-1, -1)`; every
    checkpoint route (grain's orbax handler included) stores state as JSON, which brings the
    tuple back as a list, and the restored packer then emits a bogus remainder first.
    """
    if not isinstance(state, dict):
        return state
    return {key: ({f: tuple(s) for f, s in value.items()} if key == "remainder_slices"
                  else _restore_tuples(value))
            for key, value in state.items()}


class _JsonRestorableIterDataset(grain.IterDataset):
    """Outermost pipeline stage: passes elements through, repairs states given to set_state."""

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonRestorableIterator(self._parent.__iter__())


class _JsonRestorableIterator(grain.DatasetIterator):
    _MUTATES_ELEMENT_SPEC = False

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_restore_tuples(state))


def make_dataset(config: DataConfig, tokenizer: Tokenizer | None = None) -> grain.IterDataset:
    """Training batches of `config.split` (see the module docstring for their contents).

    Batches are always full: with finite num_epochs the last partial batch is dropped.
    """
    if config.dataset == synthetic_tasks.DATASET_NAME:  # generated in code, not a tfds source
        return synthetic_tasks.make_batches(
            config.split, seq_len=config.seq_len, batch_size=config.batch_size,
            seed=config.seed).to_iter_dataset()
    tokenizer = tokenizer or load_tokenizer(config)
    rows = _packed_rows(config, tokenizer, config.split, config.shuffle, config.num_epochs)
    if config.shuffle and config.shuffle_buffer_size > 1:
        rows = grain.experimental.WindowShuffleIterDataset(
            rows, window_size=config.shuffle_buffer_size, seed=(config.seed + 1) % 2**32)
    batches = rows.batch(config.batch_size, drop_remainder=True)
    if config.prefetch_batches > 0:
        # Keeps the next batches ready while the device runs a step; checkpointable.
        batches = grain.experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=config.prefetch_batches)
    return _JsonRestorableIterDataset(batches)


def make_iterator(config: DataConfig, tokenizer: Tokenizer | None = None
                  ) -> grain.DatasetIterator:
    """A fresh iterator over `make_dataset(config)`; has get_state()/set_state()."""
    return iter(make_dataset(config, tokenizer))


def _pad_batch(batch: Batch, batch_size: int, pad_id: int) -> Batch:
    # Fixed shapes keep a jitted eval step from recompiling on the last, short batch.
    missing = batch_size - batch["inputs"].shape[0]
    if missing == 0:
        return batch
    fill = {"inputs": pad_id, "targets": pad_id}
    return {k: np.concatenate([v, np.full((missing, v.shape[1]), fill.get(k, 0), v.dtype)])
            for k, v in batch.items()}


def eval_batches(config: DataConfig, tokenizer: Tokenizer | None = None,
                 max_batches: int | None = None) -> Iterator[Batch]:
    """Deterministic, finite batches of `config.eval_split`: one epoch, file order, no shuffle.

    Every document is scored exactly once; the last batch is padded with fully masked rows
    so all batches have shape [batch_size, seq_len].
    """
    if config.dataset == synthetic_tasks.DATASET_NAME:
        batches = synthetic_tasks.make_batches(
            config.eval_split, seq_len=config.seq_len, batch_size=config.batch_size,
            seed=config.seed, num_examples=256)
        yield from (_pad_batch(batches[i], config.batch_size, synthetic_tasks.PAD)
                    for i in range(len(batches))
                    if max_batches is None or i < max_batches)
        return
    tokenizer = tokenizer or load_tokenizer(config)
    rows = _packed_rows(config, tokenizer, config.eval_split, shuffle=False, num_epochs=1)
    for i, batch in enumerate(rows.batch(config.batch_size, drop_remainder=False)):
        if max_batches is not None and i >= max_batches:
            return
        yield _pad_batch(batch, config.batch_size, tokenizer.pad_id)


# ----------------------------------------------------------------------------- metrics, state


def target_byte_count(batch: Batch, byte_lengths: np.ndarray) -> int:
    """UTF-8 bytes the scored targets of `batch` stand for.

    `byte_lengths` is `tokenizer.token_byte_lengths()` (1 per byte token for the byte
    tokenizer, the decoded piece length for SentencePiece, 0 for specials).
    bits/byte = sum of target NLL in nats / (ln 2 * target_byte_count); EOS targets count in
    the loss but carry no bytes, the usual convention.
    """
    return int((byte_lengths[batch["targets"]] * batch["loss_mask"]).sum())


def bits_per_byte(total_nll_nats: float, total_bytes: int) -> float:
    """Bits per UTF-8 byte from a summed negative log-likelihood in nats."""
    return total_nll_nats / (math.log(2) * max(total_bytes, 1))


def iterator_state_to_bytes(iterator: grain.DatasetIterator) -> bytes:
    """The iterator's position as JSON bytes (what grain's orbax handler stores, too)."""
    return json.dumps(iterator.get_state()).encode("utf-8")


def restore_iterator_state(iterator: grain.DatasetIterator, state: bytes) -> None:
    """Moves a fresh iterator of the same config to a position from iterator_state_to_bytes."""
    iterator.set_state(json.loads(state.decode("utf-8")))

"""Block-aligned packing for the Block Transformer (Ho, Bae et al., arXiv 2406.02657).

A block of L_B tokens must never straddle two documents: the block decoder embeds a block as
one vector, so a block holding the end of one file and the start of the next would leak across
documents. As in the official data pipeline (custom_dataset/language_modeling_dataset.py),
every document's (input, target) pairs are padded on the left of its first block and on the
right up to a block boundary before packing; with rows of a multiple of L_B tokens, grain's
ConcatThenSplit then only ever cuts at block boundaries.

First-block padding (`DataConfig.block_first_padding`):
  "full"    L_B - 1 pads, so the first block is [pad .. pad, BOS] and every real target of the
            document is scored (the default here; comparisons with a vanilla model then score
            the same targets).
  "random"  the official `random_pad_first_block`: randint(0, L_B - 1) pads (inclusive),
            drawn per document from the config seed, so block boundaries vary.
  "none"    no left padding.
The Block Transformer never predicts a segment's first block (its positions 0 .. L_B - 2 have
no context), so loss_mask is 0 there as well as on every pad; a document cut by a row boundary
continues in the next row as a new segment whose first L_B - 1 targets are unscored.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

FIRST_BLOCK_PADDING = ("full", "random", "none")


def check(block_length: int, seq_len: int, first_padding: str) -> None:
    """Raises a one-line ValueError for settings block packing cannot honour."""
    if block_length < 0:
        raise ValueError(f"DataConfig.block_length={block_length} must be >= 1 (or 0: no "
                         "block alignment)")
    if block_length and seq_len % block_length:
        raise ValueError(f"DataConfig.seq_len={seq_len} is not a multiple of "
                         f"block_length={block_length}; blocks would straddle rows")
    if first_padding not in FIRST_BLOCK_PADDING:
        raise ValueError(f"unknown block_first_padding {first_padding!r}; valid: "
                         f"{FIRST_BLOCK_PADDING}")


@dataclasses.dataclass(frozen=True)
class BlockAlign:
    """{"inputs", "targets"} of one document -> the same padded to whole blocks, plus
    "loss_mask" (1 on real targets). Called by grain's random_map with a seeded Generator."""
    block_length: int
    first_padding: str
    pad_id: int

    def __call__(self, pair: dict[str, np.ndarray], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
        lb = self.block_length
        left = {"full": lb - 1, "none": 0}.get(self.first_padding)
        if left is None:
            left = int(rng.integers(0, lb))   # randint(0, L_B - 1), both ends included
        size = pair["inputs"].size
        right = -(left + size) % lb

        def pad(x: np.ndarray, fill: int) -> np.ndarray:
            return np.concatenate([np.full(left, fill, np.int32), x.astype(np.int32),
                                   np.full(right, fill, np.int32)])

        return {"inputs": pad(pair["inputs"], self.pad_id),
                "targets": pad(pair["targets"], self.pad_id),
                "loss_mask": pad(np.ones(size, np.int32), 0)}


def unpredicted(segment_ids: np.ndarray, block_length: int) -> np.ndarray:
    """bool [..., T]: positions 0 .. L_B - 2 of the first block of every segment, which a
    Block Transformer cannot predict (no earlier block of the same document)."""
    lb = block_length
    block_seg = segment_ids[..., ::lb]
    first = np.ones(block_seg.shape, bool)
    first[..., 1:] = block_seg[..., 1:] != block_seg[..., :-1]
    t = np.arange(segment_ids.shape[-1])
    return (t % lb < lb - 1) & first[..., t // lb]


@dataclasses.dataclass(frozen=True)
class Finalize:
    """Grain's packing outputs -> the batch contract of train/data.py, with the padding and
    every segment's unpredicted first-block positions masked out of the loss."""
    pad_id: int
    block_length: int

    def __call__(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segment_ids = packed["inputs_segment_ids"].astype(np.int32)
        real = segment_ids > 0
        mask = real & (packed["loss_mask"] > 0) & ~unpredicted(segment_ids, self.block_length)
        return {
            "inputs": np.where(real, packed["inputs"], self.pad_id).astype(np.int32),
            "targets": np.where(real, packed["targets"], self.pad_id).astype(np.int32),
            "segment_ids": segment_ids,
            "positions": np.where(real, packed["inputs_positions"], 0).astype(np.int32),
            "loss_mask": mask.astype(np.int32),
        }


def packed_rows(pairs: grain.MapDataset, *, block_length: int, first_padding: str,
                seq_len: int, pad_id: int, seed: int, read: grain.ReadOptions
                ) -> grain.IterDataset:
    """Documents' (input, target) pairs -> block-aligned packed rows of seq_len tokens."""
    check(block_length, seq_len, first_padding)
    pairs = pairs.random_map(BlockAlign(block_length, first_padding, pad_id), seed=seed)
    length = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
    rows = grain.experimental.ConcatThenSplitIterDataset(pairs.to_iter_dataset(read),
                                                         length_struct=length)
    return rows.map(Finalize(pad_id, block_length))

"""Block-aligned packing (train/block_packing.py) for the Block Transformer (arXiv
2406.02657): no block straddles two documents, padding and unpredicted first-block positions
are out of the loss, the official random first-block padding, and the DataConfig hook."""
import grain
import numpy as np
import pytest

from tests.train.test_data import _config, fake  # noqa: F401 (fake is a fixture)
from train import block_packing, data

PAD, BOS, L_B, SEQ = 0, 1, 4, 24


def _pairs(lengths):
    docs = [np.concatenate([[BOS], 10 + 100 * d + np.arange(n)]).astype(np.int32)
            for d, n in enumerate(lengths)]   # BOS + body (token ids name their document)
    return [{"inputs": doc, "targets": np.append(doc[1:], 2).astype(np.int32)} for doc in docs]


def _rows(lengths, padding, seed=0):
    source = grain.MapDataset.source(_pairs(lengths))
    rows = block_packing.packed_rows(
        source, block_length=L_B, first_padding=padding, seq_len=SEQ, pad_id=PAD, seed=seed,
        read=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return list(rows)


def _check_aligned(rows):
    for row in rows:
        seg = row["segment_ids"].reshape(-1, L_B)
        assert np.all(seg == seg[:, :1]), seg                  # blocks never straddle
        unpredicted = block_packing.unpredicted(row["segment_ids"], L_B)
        assert not np.any(row["loss_mask"][unpredicted | (row["segment_ids"] == 0)])


def test_full_padding_scores_every_target_but_continuations_first_block():
    lengths = [5, 2, 30, 9]
    rows = _rows(lengths, "full")
    _check_aligned(rows)
    first = rows[0]
    np.testing.assert_array_equal(first["inputs"][:L_B], [PAD, PAD, PAD, BOS])
    np.testing.assert_array_equal(first["loss_mask"][:L_B], [0, 0, 0, 1])
    scored = np.concatenate([r["targets"][r["loss_mask"] > 0] for r in rows])
    expected = np.concatenate([p["targets"] for p in _pairs(lengths)])
    # Document 2 (31 inputs + 3 pads = 34) is cut by row boundaries into a continuation that
    # loses its first L_B - 1 targets; every other target is scored exactly once, in order.
    cut = [r for r in rows if r["segment_ids"][0] > 0 and r["inputs"][0] != PAD]
    assert len(cut) >= 1
    assert scored.size == expected.size - (L_B - 1) * len(cut)
    assert set(scored.tolist()) <= set(expected.tolist())


def test_random_first_block_padding_is_official_range_and_deterministic():
    lengths = [7] * 12
    rows = _rows(lengths, "random", seed=3)
    _check_aligned(rows)
    again = _rows(lengths, "random", seed=3)
    for a, b in zip(rows, again):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    pads = []
    for row in rows:
        for s in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
            start = np.flatnonzero(row["segment_ids"] == s)[0]
            if row["positions"][start] == 0 and BOS in row["inputs"][start:start + L_B]:
                pads.append(int(np.argmax(row["inputs"][start:] == BOS)))
    assert set(pads) <= set(range(L_B)) and len(set(pads)) > 1, pads


@pytest.mark.parametrize("overrides,match", [
    ({"block_length": 5}, "seq_len=32 is not a multiple of block_length=5"),
    ({"block_length": -1}, "block_length=-1"),
    ({"block_length": 4, "block_first_padding": "left"}, "block_first_padding 'left'"),
])
def test_bad_block_settings_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config("unused", **overrides)


def test_data_config_hook_packs_the_corpus_in_blocks(fake):  # noqa: F811
    _, data_dir = fake
    batch = next(data.make_iterator(_config(data_dir, block_length=L_B)))
    assert set(batch) == set(data.BATCH_KEYS)
    _check_aligned([{k: v[i] for k, v in batch.items()} for i in range(len(batch["inputs"]))])
    plain = next(data.make_iterator(_config(data_dir)))
    assert batch["loss_mask"].sum() < plain["loss_mask"].sum()   # block padding takes room

"""Tests for the embedded-corpus builder (train/corpus.py) and the grain pipeline (train/data.py).

The builder runs against a tiny fake stdlib tree, so the suite never walks or builds the real
standard library; one test checks the real listing (exclusions, ~98/2 split) without building.
"""
import dataclasses
import json
import pathlib

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from train import corpus, data
from train.tokenizer import ByteTokenizer

SEQ_LEN = 32


def make_fake_stdlib(root: pathlib.Path) -> dict[str, str]:
    """Writes a small stdlib-like tree; returns {relative path: text} of the files to keep."""
    real = (corpus.stdlib_root() / "textwrap.py").read_text(encoding="utf-8")
    keep = {}
    # Lengths straddle SEQ_LEN so documents both share rows and span several rows.
    for i in range(8):
        keep[f"pkg/mod_{i}.py"] = f"# module {i}: héllo ✓ 漢字\n" + real[:i * 97]
    keep["encodings/utf_7.py"] = "'''UTF-7 🐍'''\n" + real[2000:2600]
    keep["venv/__init__.py"] = "# the stdlib's own venv package stays\n"
    for rel, text in keep.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    # Declared-encoding file: read by its coding cookie, not as UTF-8.
    latin = "# -*- coding: latin-1 -*-\nname = 'café'\n"
    (root / "latin.py").write_bytes(latin.encode("latin-1"))
    keep["latin.py"] = latin
    skipped = {"site-packages/third_party.py": "x = 1\n", "dist-packages/deb.py": "y = 2\n",
               "myenv/lib/mod.py": "z = 3\n", "pkg/__init__.py": "\n", "pkg/notes.txt": "no\n"}
    for rel, text in skipped.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "myenv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    return keep


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """(texts by path, data_dir) with python_stdlib built from the fake tree."""
    root = tmp_path_factory.mktemp("stdlib")
    texts = make_fake_stdlib(root)
    data_dir = tmp_path_factory.mktemp("data")
    corpus.build_stdlib_dataset(data_dir, root=root)
    return texts, str(data_dir)


def _config(data_dir: str, **overrides) -> data.DataConfig:
    base = dict(seq_len=SEQ_LEN, batch_size=2, data_dir=data_dir, shuffle=False,
                num_epochs=1, shuffle_buffer_size=64, read_threads=0, prefetch_batches=0)
    return data.DataConfig(**{**base, **overrides})


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b))


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


# ----------------------------------------------------------------------------- corpus


def test_real_stdlib_listing_excludes_site_packages_and_splits_98_2():
    files = corpus.list_stdlib_files()
    assert len(files) > 500 and "os.py" in files
    assert not any(part in ("site-packages", "dist-packages") for f in files
                   for part in f.split("/"))
    assert files == corpus.list_stdlib_files()
    validation = [f for f in files if corpus.split_of(f) == "validation"]
    assert 0.01 < len(validation) / len(files) < 0.04
    # Pinned values: the split must not drift with PYTHONHASHSEED, machine or version.
    assert corpus.split_of("os.py") == "train"
    assert corpus.split_of("encodings/utf_7.py") == "validation"


def test_fake_listing_exclusions(tmp_path):
    keep = make_fake_stdlib(tmp_path)
    # Listing keeps the empty pkg/__init__.py; only the builder drops empty documents.
    assert corpus.list_stdlib_files(tmp_path) == sorted([*keep, "pkg/__init__.py"])


def test_builder_writes_array_record_per_split_and_reuses_cache(fake):
    texts, data_dir = fake
    builder = corpus.build_stdlib_dataset(data_dir)  # same version already there: no rebuild
    assert builder.name == "python_stdlib"
    assert str(builder.version) == corpus.python_version()
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    files = sorted(p.name for p in epath.Path(builder.data_dir).iterdir())
    assert any(f.startswith("python_stdlib-train.array_record") for f in files)
    got = {}
    for split in ("train", "validation"):
        for record in builder.as_data_source(split):
            path = record["path"].decode()
            assert corpus.split_of(path) == split
            got[path] = record["text"].decode("utf-8")
    assert got == texts  # empty files and excluded dirs dropped; latin-1 decoded


def test_load_text_source_and_errors(fake):
    texts, data_dir = fake
    source = data.load_text_source("python_stdlib", "validation", "text", data_dir)
    assert sorted(t.decode() for t in source) == sorted(
        t for p, t in texts.items() if corpus.split_of(p) == "validation")
    with pytest.raises(ValueError, match=r"'pytohn_stdlib'.*python_stdlib"):
        data.load_text_source("pytohn_stdlib", "train", "text", data_dir)
    with pytest.raises(ValueError, match=r"'body'.*\['path', 'text'\]"):
        data.load_text_source("python_stdlib", "train", "body", data_dir)
    with pytest.raises(ValueError, match=r"'test'.*\['train', 'validation'\]"):
        data.load_text_source("python_stdlib", "test", "text", data_dir)
    with pytest.raises(ValueError, match=r"'mnist' is not prepared"):
        data.load_text_source("mnist", "train", "image", data_dir)


class ToyTextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for "any other tfds text dataset" prepared by the user."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = corpus.PythonStdlib.code_path  # same tfds workaround as the real builder

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"body": tfds.features.Text(), "label": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"body": f"doc {i} ünïcode", "label": i}


def test_other_tfds_dataset_by_name(tmp_path):
    ToyTextCorpus(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    # Not registered in this process: found through the files in data_dir alone.
    source = data.load_text_source("toy_text_corpus", "train", "body", tmp_path)
    assert sorted(source) == [f"doc {i} ünïcode".encode() for i in range(3)]
    with pytest.raises(ValueError, match=r"'label'.*Scalar, not Text"):
        data.load_text_source("toy_text_corpus", "train", "label", tmp_path)
    with pytest.raises(ValueError, match=r"'toy_text_corpsu'.*Did you mean.*toy_text_corpus"):
        data.load_text_source("toy_text_corpsu", "train", "body", tmp_path)


# ----------------------------------------------------------------------------- pipeline


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"'bpe'.*\['byte', 'sentencepiece', 'pretrained'\]"):
        data.DataConfig(tokenizer="bpe")
    with pytest.raises(ValueError, match="tokenizer_path"):
        data.DataConfig(tokenizer="sentencepiece")
    with pytest.raises(ValueError, match="'pretrained' needs tokenizer_path"):
        data.DataConfig(tokenizer="pretrained")
    with pytest.raises(ValueError, match="seq_len"):
        data.DataConfig(seq_len=0)
    with pytest.raises(ValueError, match="num_epochs"):
        data.DataConfig(num_epochs=0)


def test_packing_covers_every_document_once_without_crossing(fake):
    texts, data_dir = fake
    config = _config(data_dir, eval_split="train")
    batches = list(data.eval_batches(config))
    for b in batches:
        assert set(b) == set(data.BATCH_KEYS)
        for v in b.values():
            assert v.dtype == np.int32 and v.shape == (2, SEQ_LEN)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in data.BATCH_KEYS}
    seg, pos, mask = rows["segment_ids"], rows["positions"], rows["loss_mask"]
    assert np.array_equal(mask, (seg > 0).astype(np.int32))
    assert np.all(rows["inputs"][seg == 0] == ByteTokenizer.pad_id)
    for r in range(seg.shape[0]):
        starts = np.flatnonzero(np.diff(seg[r], prepend=0) != 0)
        for s, e in zip(starts, list(starts[1:]) + [SEQ_LEN]):
            if seg[r, s] == 0:
                continue
            # Ids count 1, 2, 3... along the row; positions restart at each segment.
            assert seg[r, s] == seg[r, :s].max(initial=0) + 1
            assert np.array_equal(pos[r, s:e], np.arange(e - s))
            # Within a segment each target is the next input.
            assert np.array_equal(rows["targets"][r, s:e - 1], rows["inputs"][r, s + 1:e])
    # In order (no shuffle) the scored pairs are exactly (doc[i], doc[i+1]) of each document:
    # no target from another document, nothing dropped or repeated.
    source = data.load_text_source("python_stdlib", "train", "text", data_dir)
    docs = [np.array([256, *raw, 257], np.int32) for raw in source]
    assert np.array_equal(rows["inputs"][mask == 1], np.concatenate([d[:-1] for d in docs]))
    assert np.array_equal(rows["targets"][mask == 1], np.concatenate([d[1:] for d in docs]))
    # Bits/byte denominators: every UTF-8 byte of the split is counted once.
    lengths = ByteTokenizer().token_byte_lengths()
    assert sum(data.target_byte_count(b, lengths) for b in batches) == sum(
        len(raw) for raw in source)


def test_packs_with_a_real_models_tokenizer(fake):
    """DataConfig(tokenizer="pretrained") reads a packaged model's tokenizer by short name:
    documents are that tokenizer's ids between its BOS and EOS (what a draft distilled for
    the real model trains on)."""
    from train.pretrained_tokenizer import PretrainedTokenizer

    texts, data_dir = fake
    config = _config(data_dir, tokenizer="pretrained", tokenizer_path="smollm2")
    tokenizer = data.load_tokenizer(config)
    assert isinstance(tokenizer, PretrainedTokenizer) and tokenizer.vocab_size == 49152
    batch = next(data.make_iterator(config, tokenizer))
    first = batch["inputs"][0]
    assert first[0] == tokenizer.bos_id
    segment = batch["segment_ids"][0]
    body = first[segment == segment[0]][1:].tolist()  # the first document's ids after BOS
    decoded = tokenizer.decode(body).rstrip("\ufffd")  # a row may end inside a character
    assert len(body) > 10 and any(text.startswith(decoded) for text in texts.values()), decoded


def test_eval_batches_deterministic_and_padded(fake):
    _, data_dir = fake
    config = _config(data_dir, batch_size=4, shuffle=True)  # eval ignores shuffle
    first, second = list(data.eval_batches(config)), list(data.eval_batches(config))
    assert _equal(first, second) and first
    last = first[-1]
    assert last["inputs"].shape == (4, SEQ_LEN)
    assert last["loss_mask"][-1].sum() == 0  # tiny split: the last row is padding
    assert len(list(data.eval_batches(config, max_batches=1))) == 1


def test_shuffle_seed_determinism(fake):
    _, data_dir = fake
    config = _config(data_dir, shuffle=True, num_epochs=None)
    a = _take(data.make_iterator(config), 6)
    assert _equal(a, _take(data.make_iterator(config), 6))
    other = _take(data.make_iterator(dataclasses.replace(config, seed=1)), 6)
    assert not _equal(a, other)


def test_multiple_epochs_and_forever(fake):
    _, data_dir = fake
    def tokens(batches):
        return sum(int(b["loss_mask"].sum()) for b in batches)

    per_epoch = tokens(data.eval_batches(_config(data_dir, eval_split="train")))
    one = list(data.make_dataset(_config(data_dir, num_epochs=1)))
    two = list(data.make_dataset(_config(data_dir, num_epochs=2)))
    # Epochs are packed back to back; only the last partial batch (< 2 rows) is dropped.
    assert per_epoch - 2 * SEQ_LEN < tokens(one) <= per_epoch
    assert 2 * per_epoch - 2 * SEQ_LEN < tokens(two) <= 2 * per_epoch
    forever = data.make_iterator(_config(data_dir, num_epochs=None, shuffle=True))
    assert len(_take(forever, 3 * len(one))) == 3 * len(one)


# Fresh; mid first shuffle window (64 rows = 32 batches); third window in the second epoch
# (an epoch of the fake corpus is 38 batches).
@pytest.mark.parametrize("skip", [0, 3, 70])
def test_resume_yields_the_same_batches(fake, skip):
    _, data_dir = fake
    # Everything on: doc shuffle, row window shuffle, read threads, batch prefetch.
    config = _config(data_dir, shuffle=True, num_epochs=None, read_threads=2,
                     prefetch_batches=2)
    reference = _take(data.make_iterator(config), skip + 6)
    iterator = data.make_iterator(config)
    _take(iterator, skip)
    saved = data.iterator_state_to_bytes(iterator)
    json.loads(saved)  # plain JSON, as orbax / grain store it
    resumed = data.make_iterator(config)
    data.restore_iterator_state(resumed, saved)
    assert _equal(_take(resumed, 6), reference[skip:])


def test_resume_through_orbax_with_grain_handler(fake, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    _, data_dir = fake
    config = _config(data_dir, shuffle=True, num_epochs=None)
    iterator = data.make_iterator(config)
    _take(iterator, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = _take(iterator, 4)
        resumed = data.make_iterator(config)
        manager.restore(2, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(resumed)))
    assert _equal(_take(resumed, 4), expected)


def test_bits_per_byte():
    assert data.bits_per_byte(np.log(2) * 10, 10) == pytest.approx(1.0)
